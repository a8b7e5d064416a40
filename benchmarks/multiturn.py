"""Multi-turn reasoning chat against SGLang's prefix cache: `--radix-eviction-policy` lru, lfu and crystal compared.

Workload: conversations of several turns that share a system prompt. Each turn's prompt ends by opening a think
block (`<think>`, as DeepSeek-R1-style chat templates end the generation prompt), and the server generates the
turn's reasoning (greedy, a fixed number of tokens): the cache sees it generated and inserted as a real server
does, a leaf under the prompt. The conversation then continues with a short scripted answer: the next turn's
prompt carries the answer but not the think block, as reasoning chat templates build it. Turns are replayed
round-robin over the conversations (users take turns), one request at a time, so every policy sees the same
sequence of cache operations. Every policy runs on its own fresh server with the same small pool (every
conversation's history plus about one turn's reasoning), policies alternated round by round. Every policy runs on
the same radix tree core (`--tree-core`, default python: `crystal` needs it), so throughput compares like with like.

Per policy: prefix-cache hit rate of the turn prompts (`cached_tokens` / prompt tokens, from meta_info), the share
of the reusable history that hit (an unbounded cache's hits), tokens recomputed, time to first token and prompt
throughput, turns per second, and the memory the cache holds usefully at the end: how much of every
conversation's last prompt is still cached.

    python -m benchmarks.multiturn [--quick] [--policies lru,lfu,crystal] [--rounds N] [--tree-core python|rust]
                                   [--out results/multiturn]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from crystal_sglang.models import prepare_default_model
from crystal_sglang.prompts import load_problems
from crystal_sglang.server import CPU_SERVER_ARGS, SGLangServer

THINK_START = "<think>"
SYSTEM = ("You are a patient mathematics tutor. Work through every problem carefully, explain your reasoning in "
          "plain words, check each intermediate result, and end with a short final answer.")
FOLLOW_UPS = (
    "Can you check that result another way?",
    "What changes if every number in the problem is doubled?",
    "Explain the key step again, more briefly.",
    "Which step is the easiest to get wrong, and why?",
    "Give me a similar problem with its answer.",
)
MODES = {
    "quick": dict(conversations=5, turns=3, think_tokens=96, rounds=1),
    "full": dict(conversations=6, turns=5, think_tokens=192, rounds=2),
}


def build_prompts(tokenizer, conversations: int, turns: int) -> list[list[list[int]]]:
    """Prompt token ids per conversation and turn: the model's chat template, then the think-start marker (tokenized
    on its own, as a reasoning model emits it). Earlier turns appear as their scripted answers only."""

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    problems = load_problems()
    result = []
    for c in range(conversations):
        messages = [{"role": "system", "content": SYSTEM}]
        prompts = []
        for t in range(turns):
            question = problems[c % len(problems)] if t == 0 else FOLLOW_UPS[(c + t) % len(FOLLOW_UPS)]
            messages.append({"role": "user", "content": question})
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompts.append([*ids(text), *ids(THINK_START), *ids("\n")])
            messages.append({"role": "assistant", "content": f"So the answer to part {t + 1} is "
                                                             f"\\boxed{{{(c + 3) * (t + 7)}}}."})
        result.append(prompts)
    return result


def reusable_prefix(prompt: list[int], earlier: list[list[int]]) -> int:
    """Tokens of `prompt` an unbounded prefix cache would serve: its longest common prefix with anything sent
    before, short of the last token (SGLang always computes at least one)."""
    best = 0
    for sequence in earlier:
        n = min(len(prompt) - 1, len(sequence))
        common = next((i for i in range(n) if prompt[i] != sequence[i]), n)
        best = max(best, common)
    return best


def stream_turn(base_url: str, prompt: list[int], think_tokens: int) -> dict:
    """One turn, streamed: time to first token, and the final meta info (cached tokens)."""
    payload = {"input_ids": prompt, "stream": True,
               "sampling_params": {"temperature": 0, "max_new_tokens": think_tokens, "ignore_eos": True}}
    request = urllib.request.Request(base_url + "/generate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    begin = time.monotonic()
    first, meta = None, {}
    with urllib.request.urlopen(request, timeout=3600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            meta = json.loads(line[5:])["meta_info"]
            if first is None and meta["completion_tokens"] > 0:
                first = time.monotonic() - begin
    return {"ttft": first, "seconds": time.monotonic() - begin, "meta": meta}


def replay(server: SGLangServer, prompts: list[list[list[int]]], think_tokens: int, label: str) -> list[dict]:
    sent: list[list[int]] = []
    records = []
    order = [(t, c) for t in range(len(prompts[0])) for c in range(len(prompts))]
    for t, c in tqdm(order, desc=label, unit="turn", leave=False):
        prompt = prompts[c][t]
        reusable = reusable_prefix(prompt, sent)
        turn = stream_turn(server.base_url, prompt, think_tokens)
        sent.append(prompt)
        records.append({"conversation": c, "turn": t, "prompt_tokens": len(prompt), "reusable": reusable,
                        "cached": turn["meta"]["cached_tokens"], "ttft": turn["ttft"], "seconds": turn["seconds"],
                        "generated": turn["meta"]["completion_tokens"]})  # fmt: skip
    return records


def history_held(server: SGLangServer, prompts: list[list[list[int]]]) -> int:
    """After the last turn: tokens of every conversation's last prompt still cached (the pool is full either way;
    this is the part of it that later turns can reuse). Probed in turn order; a miss pays what a turn would."""
    held = 0
    for conversation in prompts:
        reply = server.post("/generate", {"input_ids": conversation[-1],
                                          "sampling_params": {"temperature": 0, "max_new_tokens": 1}})
        held += reply["meta_info"]["cached_tokens"]
    return held


def summarize(records: list[dict], held: int, prompts: list[list[list[int]]], pool: int) -> dict:
    prompt = sum(r["prompt_tokens"] for r in records)
    cached = sum(r["cached"] for r in records)
    reusable = sum(r["reusable"] for r in records)
    later = [r for r in records if r["turn"] > 0]
    seconds = sum(r["seconds"] for r in records)
    return {
        "hit_rate": cached / prompt,
        "later_turn_hit_rate": sum(r["cached"] for r in later) / sum(r["prompt_tokens"] for r in later),
        "history_reused": cached / reusable if reusable else 1.0,
        "recomputed_tokens": prompt - cached,
        "avoidable_recomputed_tokens": sum(max(0, r["reusable"] - r["cached"]) for r in records),
        "ttft_mean_s": statistics.mean(r["ttft"] for r in records),
        "prompt_tok_per_s": prompt / sum(r["ttft"] for r in records),
        "turns_per_s": len(records) / seconds,
        "seconds": seconds,
        "history_held_tokens": held,
        "history_held_share": held / sum(len(conversation[-1]) - 1 for conversation in prompts),
        "history_held_pool_share": held / pool,
    }  # fmt: skip


def pool_size(prompts: list[list[list[int]]], think_tokens: int) -> int:
    """Every conversation's full history plus one turn's reasoning: all histories fit, but not with the
    reasoning of several turns cached beside them."""
    return sum(len(conversation[-1]) for conversation in prompts) + think_tokens + 16


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 conversations x 3 turns, 96 reasoning tokens, "
                        "1 round (default: 6 x 5, 192, 2 rounds)")  # fmt: skip
    parser.add_argument("--policies", default="lru,lfu,crystal", help="comma-separated radix eviction policies")
    parser.add_argument("--rounds", type=int, help="policy alternations (default: 1 quick, 2 full)")
    parser.add_argument("--model", help="model folder (default: the prepared SmolLM2-135M-Instruct)")
    parser.add_argument("--gpu", action="store_true", help="FlashInfer and compiled Triton instead of CPU args")
    parser.add_argument("--tree-core", choices=("python", "rust"), default="python",
                        help="radix tree core for every policy (crystal always takes python)")
    parser.add_argument("--out", default="results/multiturn")
    args = parser.parse_args(argv)

    mode = dict(MODES["quick" if args.quick else "full"])
    mode["rounds"] = args.rounds or mode["rounds"]
    model = args.model or prepare_default_model()
    from transformers import AutoTokenizer

    prompts = build_prompts(AutoTokenizer.from_pretrained(model), mode["conversations"], mode["turns"])
    pool = pool_size(prompts, mode["think_tokens"])
    policies = [p for p in args.policies.split(",") if p]
    device = [] if args.gpu else list(CPU_SERVER_ARGS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"model": Path(model).name, **mode, "pool_tokens": pool, "tree_core": args.tree_core,
              "runs": {p: [] for p in policies}}
    print(f"{mode['conversations']} conversations x {mode['turns']} turns, {mode['think_tokens']} reasoning tokens "
          f"per turn, pool {pool} tokens; {', '.join(policies)} alternated over {mode['rounds']} round(s), "
          f"{args.tree_core} tree core", flush=True)

    for round_index in range(mode["rounds"]):
        for policy in policies:
            label = f"round {round_index + 1} {policy}"
            server_args = [*device, "--max-total-tokens", str(pool), "--radix-eviction-policy", policy,
                           "--log-level", "info"]
            with SGLangServer(model, server_args, log_path=out / f"server-{policy}.log",
                              env={"SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND": args.tree_core}) as server:
                records = replay(server, prompts, mode["think_tokens"], label)
                held = history_held(server, prompts)
            summary = summarize(records, held, prompts, pool)
            report["runs"][policy].append({"summary": summary, "turns": records})
            print(f"{label}: hit rate {summary['hit_rate']:.1%} (later turns {summary['later_turn_hit_rate']:.1%}, "
                  f"history reused {summary['history_reused']:.1%}), recomputed {summary['recomputed_tokens']} "
                  f"tokens, TTFT {summary['ttft_mean_s']:.2f} s, {summary['turns_per_s']:.3f} turns/s, history "
                  f"held {summary['history_held_tokens']} tokens ({summary['history_held_pool_share']:.0%} of the "
                  f"pool)", flush=True)

    report["summary"] = {p: mean_summary([run["summary"] for run in runs]) for p, runs in report["runs"].items()}
    if "lru" in report["summary"]:
        base = report["summary"]["lru"]
        for summary in report["summary"].values():
            summary["prompt_tok_per_s_vs_lru"] = summary["prompt_tok_per_s"] / base["prompt_tok_per_s"]
            summary["turns_per_s_vs_lru"] = summary["turns_per_s"] / base["turns_per_s"]
            summary["recomputed_vs_lru"] = summary["recomputed_tokens"] / max(1, base["recomputed_tokens"])
    for policy, summary in report["summary"].items():
        ratios = (f"; vs lru: recomputed x{summary['recomputed_vs_lru']:.2f}, prompt throughput "
                  f"x{summary['prompt_tok_per_s_vs_lru']:.2f}, turns/s x{summary['turns_per_s_vs_lru']:.2f}"
                  if "lru" in report["summary"] else "")
        print(f"{policy:>8}: hit rate {summary['hit_rate']:.1%}, history reused {summary['history_reused']:.1%}, "
              f"recomputed {summary['recomputed_tokens']:.0f} tokens{ratios}", flush=True)

    name = "multiturn-quick" if args.quick else "multiturn"
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    plot(report, out / f"{name}.png")
    print(f"wrote {out / name}.json and .png")
    return 0


def mean_summary(summaries: list[dict]) -> dict:
    return {key: statistics.mean(s[key] for s in summaries) for key in summaries[0]}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    names = list(summary)
    colors = ["tab:blue" if name == "crystal" else "grey" for name in names]
    metrics = [("hit_rate", "prompt hit rate"), ("history_reused", "reusable history that hit"),
               ("recomputed_tokens", "prompt tokens recomputed"), ("ttft_mean_s", "time to first token, mean (s)"),
               ("history_held_pool_share", "pool holding history at the end")]  # fmt: skip
    figure, axes = plt.subplots(1, len(metrics) + 1, figsize=(3.6 * (len(metrics) + 1), 3.6))
    for axis, (key, label) in zip(axes, metrics):
        axis.bar(names, [summary[name][key] for name in names], color=colors)
        axis.set_title(label)
    turns = report["turns"]
    for name in names:
        per_turn = []
        for t in range(turns):
            rows = [r for run in report["runs"][name] for r in run["turns"] if r["turn"] == t]
            per_turn.append(sum(r["cached"] for r in rows) / sum(r["prompt_tokens"] for r in rows))
        axes[-1].plot(range(1, turns + 1), per_turn, "o-", label=name)
    axes[-1].set_xticks(range(1, turns + 1))
    axes[-1].set_xlabel("turn")
    axes[-1].set_title("prompt hit rate per turn")
    axes[-1].legend()
    figure.suptitle(f"{report['model']}: {report['conversations']} conversations x {turns} turns, "
                    f"{report['think_tokens']} reasoning tokens per turn, pool {report['pool_tokens']} tokens, "
                    f"{report['rounds']} round(s), {report['tree_core']} tree core")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
