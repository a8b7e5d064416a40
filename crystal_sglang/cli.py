"""`crystal-sglang`: prepare the default model, manage the CPU support hook, run the demo."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEMO_QUESTION = (
    "A train travels 120 km in 1.5 hours, then 80 km in 1 hour. What is its average speed for the whole trip? "
    "Think step by step, then give the final answer on a last line starting with 'Answer:'."
)


def _prepare_model(args: argparse.Namespace) -> int:
    from crystal_sglang.models import prepare_default_model

    print(prepare_default_model(force=args.force))
    return 0


def _server_device_args() -> list[str]:
    import torch

    from crystal_sglang.server import CPU_SERVER_ARGS

    return [] if torch.cuda.is_available() else list(CPU_SERVER_ARGS)


def _demo(args: argparse.Namespace) -> int:
    """Serve the default model with `--kv-evict`, ask one reasoning question through the OpenAI API, print it."""
    import openai

    from crystal_sglang.models import prepare_default_model
    from crystal_sglang.server import SGLangServer

    model = args.model_path or prepare_default_model()
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    server_args = [
        *_server_device_args(), "--kv-evict", args.policy, "--kv-evict-budget", args.budget,
        "--max-total-tokens", str(args.max_total_tokens), "--served-model-name", "default",
    ]  # fmt: skip
    print(f"starting SGLang with --kv-evict {args.policy} --kv-evict-budget {args.budget} (log: {log}) ...",
          flush=True)
    with SGLangServer(model, server_args, log_path=log) as server:
        print(f"server ready on {server.base_url} in {server.started_in:.0f} s", flush=True)
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none")
        begin = time.monotonic()
        reply = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": args.question}],
            max_tokens=args.max_tokens,
            temperature=0,
        )
        seconds = time.monotonic() - begin
    print(f"\nQ: {args.question}\n\nA: {reply.choices[0].message.content}\n")
    usage = reply.usage
    print(f"{usage.completion_tokens} tokens in {seconds:.1f} s ({usage.completion_tokens / seconds:.1f} tok/s), "
          f"prompt {usage.prompt_tokens} tokens, finish: {reply.choices[0].finish_reason}")
    return 0


def _calibrate_thinkv(args: argparse.Namespace) -> int:
    from crystal_sglang.calibration import calibrate_thinkv

    calibrate_thinkv(output=args.output, prompts=args.prompts, max_new_tokens=args.max_new_tokens)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from crystal_sglang.policies import DEFAULT_POLICY, POLICY_NAMES

    parser = argparse.ArgumentParser(prog="crystal-sglang", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare-model", help="write the default model's Hugging Face folder (once)")
    prepare.add_argument("--force", action="store_true", help="rebuild it even if it is already prepared")
    prepare.set_defaults(run=_prepare_model)

    demo = commands.add_parser("demo", help="serve the default model with eviction and answer one question")
    demo.add_argument("--policy", default=DEFAULT_POLICY, choices=POLICY_NAMES)
    demo.add_argument("--budget", default="128")
    demo.add_argument("--model-path", default=None, help="default: the prepared SmolLM2-135M-Instruct")
    demo.add_argument("--question", default=DEMO_QUESTION)
    demo.add_argument("--max-tokens", type=int, default=384)
    demo.add_argument("--max-total-tokens", type=int, default=4096)
    demo.add_argument("--log", default="results/demo-server.log")
    demo.set_defaults(run=_demo)

    calibrate = commands.add_parser("calibrate-thinkv", help="derive ThinKV's sparsity thresholds from real runs")
    calibrate.add_argument("--output", default=None, help="default: the packaged calibration file")
    calibrate.add_argument("--prompts", type=int, default=8)
    calibrate.add_argument("--max-new-tokens", type=int, default=256)
    calibrate.set_defaults(run=_calibrate_thinkv)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # one line for the user; the traceback helps nobody here
        from crystal_sglang.models import ModelPreparationError
        from crystal_sglang.server import ServerError

        if isinstance(error, (ModelPreparationError, ServerError)):
            print(f"crystal-sglang: {error}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
