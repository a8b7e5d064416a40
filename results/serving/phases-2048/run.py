"""Where eviction's time goes inside a served decode step: 8 requests at 2K, crystal held at the context (budget
2048) or evicting at 128 (prompt unprotected), as `benchmarks.serving --only overhead` runs them, three rounds of 48
tokens on one server. Needs the timers of `phase-timers.patch` applied to `patches/runtime.py` (they log each step's
milliseconds per phase, 48 steps per line, to the server log); take the patch out again afterwards.

    patch -p1 < results/serving/phases-2048/phase-timers.patch   # from the repository root
    PYTHONPATH=. python results/serving/phases-2048/run.py held      # then: evicting
    PYTHONPATH=. python results/serving/phases-2048/run.py summary held.json evicting.json   # > summary.txt

`before-*.json`: the same at a9e3653, before key redundancy's cost was brought down (docs/PERFORMANCE.md).
"""
import ast
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
KEYS = ("steps", "scoring", "record_layer", "begin_decode", "observe", "decide", "after")


def measure(variant: str) -> None:
    from transformers import AutoTokenizer

    from benchmarks.serving import OVERHEAD_TOKENS, step_latency
    from crystal_sglang.models import prepare_default_model
    from crystal_sglang.prompts import load_problems
    from crystal_sglang.server import CPU_SERVER_ARGS, SGLangServer

    model = prepare_default_model()
    filler = AutoTokenizer.from_pretrained(model)(" ".join(load_problems()) * 200)["input_ids"]
    context, batch = 2048, 8
    args = [*CPU_SERVER_ARGS, "--max-total-tokens", str(batch * (context + OVERHEAD_TOKENS + 32) + 64),
            "--kv-evict", "crystal", "--kv-evict-budget", str(context * 2), "--disable-radix-cache",
            "--context-length", str(context + OVERHEAD_TOKENS), "--enable-metrics"]
    custom = {"kv_budget": context if variant == "held" else 128, "kv_evict_config": {"protect_prompt": False}}
    log = HERE / f"server-{variant}.log"
    with SGLangServer(model, args, log_path=log) as server:
        for _ in range(3):
            print(variant, step_latency(server, filler[:context], batch, OVERHEAD_TOKENS, custom, True), flush=True)
    lines = [line.split("PHASES ", 1)[1] for line in log.read_text().splitlines() if "PHASES" in line]
    (HERE / f"{variant}.json").write_text(json.dumps([step for line in lines for step in ast.literal_eval(line)]))
    log.unlink()


def summary(names: list[str]) -> None:
    for name in names:
        steps = json.loads((HERE / name).read_text())
        first = [s for s in steps if s.get("decide", 0) > 300]  # evicting: the first eviction, from 2K down to 128
        steady = [s for s in steps if s not in first]
        mean = {key: sum(s.get(key, 0) for s in steady) / len(steady) for key in KEYS}
        policy = mean["after"] + mean["scoring"] + mean["record_layer"] + mean["begin_decode"]
        parts = {"scoring (in the attention)": mean["scoring"], "observe": mean["observe"],
                 "decide (incl. key redundancy)": mean["decide"],
                 "rest of the step's eviction work": policy - mean["scoring"] - mean["observe"] - mean["decide"]}
        print(f"{name}: {len(steady)} steps (first evictions left out: {len(first)}), step {mean['steps']:.1f} ms, "
              f"eviction {policy:.1f} ms ({100 * policy / mean['steps']:.1f} %)")
        for part, value in parts.items():
            print(f"  {part}: {value:.1f} ms ({100 * value / policy:.0f} % of eviction)")


if __name__ == "__main__":
    summary(sys.argv[2:]) if sys.argv[1] == "summary" else measure(sys.argv[1])
