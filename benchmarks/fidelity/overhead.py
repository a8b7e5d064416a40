"""Cost of a policy in the reference path, as a share of one decode step of the default model at a long context.

One request holding `--context` entries (2K by default) decodes `--steps` tokens through `EvictingCache` with
`none` and with each policy, alternated over `--rounds` rounds:
- "scoring": a budget above what the request reaches in the measured steps, so nothing is evicted and only scoring
  and bookkeeping run (the request is declared to go on past them, so it could outgrow that budget: a request
  that cannot is not scored at all);
- "evicting": a budget `--evict-below` entries under the context with the usual buffer (16), so the cache
  evicts once every 17 steps; its mean step includes the evictions, amortised.
Each step is timed whole (median); its ratio to `none`'s is the policy's whole cost. The policy's own work inside
it is timed directly as well: the scores of every layer (`_step_scores`) plus observe, decide and compaction (the
rest of `_finish_step`). An observed row that can evict is attended by hand, its softmax being both its attention
and its scores (`EvictingCache.attend`): that product and softmax count as the model's time, and what attending by
hand costs over SDPA shows only in the ratio.

    python -m benchmarks.fidelity.overhead [--context 2048] [--policies crystal] [--config JSON]
        [--out results/fidelity]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.fidelity.replay import EVICTABLE_PROMPT
from benchmarks.fidelity.workload import load_default_model
from crystal_sglang.config import parse_budget
from crystal_sglang.policies import make_spec
from crystal_sglang.prompts import DEFAULT_PROBLEMS, chat_messages
from crystal_sglang.reference.cache import EvictingCache, RowRequest, evicting_attention, model_rotary


def long_prompt(tokenizer, length: int) -> list[int]:
    """`length` tokens of real chat prompts, one after the other."""
    ids: list[int] = []
    while len(ids) < length:
        for problem in DEFAULT_PROBLEMS:
            ids += tokenizer.apply_chat_template(chat_messages(problem), add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]  # fmt: skip
    return ids[:length]


class PolicyTimer:
    """Wall time the cache spends per step in scoring every layer ("scoring": `_step_scores`) and in the policy's
    observe/decide and the compaction ("policy": the rest of `_finish_step`, which calls `_step_scores`)."""

    def __init__(self, cache: EvictingCache):
        self.seconds = {"scoring": 0.0, "step_end": 0.0}
        cache._step_scores = self._timed(cache._step_scores, "scoring")
        cache._finish_step = self._timed(cache._finish_step, "step_end")

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def parts(self) -> dict[str, float]:
        return {"scoring": self.seconds["scoring"], "policy": self.seconds["step_end"] - self.seconds["scoring"]}

    def _timed(self, method, part: str):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - started

        return timed


@torch.no_grad()
def time_steps(model, prompt: list[int], policy: str, budget: str, steps: int, warmup: int,
               config: dict | None = None) -> dict:  # fmt: skip
    spec = make_spec(policy, parse_budget(budget), {**EVICTABLE_PROMPT, **(config or {})})
    going_on = 2 * len(prompt) + warmup + steps  # its full length: it continues past the measured steps
    cache = EvictingCache(model.config, [RowRequest(spec, len(prompt), going_on)], rotary=model_rotary(model))
    timer = PolicyTimer(cache)
    step_ms, parts_ms = [], {"scoring": [], "policy": []}
    with evicting_attention(model):
        output = model(input_ids=torch.tensor([prompt]), past_key_values=cache, logits_to_keep=1)
        for step in range(warmup + steps):
            token = output.logits[:, -1].argmax(-1, keepdim=True)
            position = torch.tensor([[cache.evictors[0].length]])
            timer.reset()
            started = time.perf_counter()
            output = model(input_ids=token, position_ids=position, past_key_values=cache, logits_to_keep=1)
            if step >= warmup:
                step_ms.append((time.perf_counter() - started) * 1e3)
                for part, seconds in timer.parts().items():
                    parts_ms[part].append(seconds * 1e3)
    return {"step_ms": step_ms, **{f"{part}_ms": ms for part, ms in parts_ms.items()},
            "evictions": cache.evictors[0].stats.evictions}  # fmt: skip


def summarize(runs: dict[tuple[str, str], list[dict]]) -> list[dict]:
    baseline = statistics.median(ms for run in runs[("none", "baseline")] for ms in run["step_ms"])
    results = []
    for (policy, kind), policy_runs in runs.items():
        ms = {key: [v for run in policy_runs for v in run[key]] for key in ("step_ms", "scoring_ms", "policy_ms")}
        spent = statistics.fmean(ms["scoring_ms"]) + statistics.fmean(ms["policy_ms"])
        results.append({
            "policy": policy, "case": kind,
            "median_step_ms": statistics.median(ms["step_ms"]), "mean_step_ms": statistics.fmean(ms["step_ms"]),
            "median_step_vs_none": statistics.median(ms["step_ms"]) / baseline,
            **{f"{stat}_{key}": fn(ms[key]) for key in ("scoring_ms", "policy_ms")
               for stat, fn in (("median", statistics.median), ("mean", statistics.fmean), ("max", max))},
            "share_of_step": spent / statistics.fmean(ms["step_ms"]),
            "evictions_per_round": statistics.fmean(run["evictions"] for run in policy_runs),
        })  # fmt: skip
    return results


def print_table(results: list[dict]) -> None:
    print(f"{'policy':<10} {'case':<9} {'step':>7} {'vs none':>8} {'scoring':>17} {'observe+decide':>17} "
          f"{'share of step':>14} {'evictions':>9}")  # fmt: skip
    for r in results:
        parts = [f"{r[f'median_{key}']:.1f}/{r[f'mean_{key}']:.1f}/{r[f'max_{key}']:.1f}"
                 for key in ("scoring_ms", "policy_ms")]  # fmt: skip
        print(f"{r['policy']:<10} {r['case']:<9} {r['median_step_ms']:>7.1f} {r['median_step_vs_none']:>8.2f} "
              f"{parts[0]:>17} {parts[1]:>17} {r['share_of_step']:>13.1%} {r['evictions_per_round']:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=34, help="timed decode steps per round (two eviction cycles)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--policies", default="crystal")
    parser.add_argument("--evict-below", type=int, default=64, help="evicting budget = context - this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--config", type=json.loads, default={}, help="policy settings (JSON), as --kv-evict-config")
    parser.add_argument("--out", type=Path, default=Path("results/fidelity"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_path, tokenizer, model = load_default_model()
    prompt = long_prompt(tokenizer, args.context)
    evicting_budget = str(args.context - args.evict_below)
    within_budget = str(args.context + args.warmup + args.steps)  # never exceeded in the measured steps
    cases = [("none", "baseline", within_budget)]
    for policy in args.policies.split(","):
        cases += [(policy, "scoring", within_budget), (policy, "evicting", evicting_budget)]
    runs: dict[tuple[str, str], list[dict]] = {(policy, kind): [] for policy, kind, _ in cases}
    for round_index in range(args.rounds):
        for policy, kind, budget in cases:
            print(f"round {round_index + 1}/{args.rounds}: {policy} ({kind}, budget {budget})", flush=True)
            config = args.config if policy != "none" else None
            runs[(policy, kind)].append(time_steps(model, prompt, policy, budget, args.steps, args.warmup, config))
    results = summarize(runs)
    print(f"\ndecode step at {args.context} entries, batch 1, {args.threads} threads, {args.rounds} x {args.steps} "
          "steps; ms (median / mean / max for the parts)")  # fmt: skip
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"overhead-{args.context}.json"
    path.write_text(json.dumps({"context": args.context, "threads": args.threads, "steps": args.steps,
                                "rounds": args.rounds, "config": args.config, "model": model_path.name,
                                "results": results}, indent=1))
    plot(results, args.context, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(results: list[dict], context: int, path: Path) -> None:
    """Mean step time per case, split into the model's own work, the score kernel and observe/decide."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['policy']}\n{r['case']}" for r in results]
    scoring = [r["mean_scoring_ms"] for r in results]
    policy = [r["mean_policy_ms"] for r in results]
    model = [r["mean_step_ms"] - a - b for r, a, b in zip(results, scoring, policy)]
    figure, axis = plt.subplots(figsize=(2 + 1.6 * len(results), 4))
    axis.bar(labels, model, label="model (attention included, by hand for an observed row)")
    axis.bar(labels, scoring, bottom=model, label="scores of every layer beyond the attention")
    axis.bar(labels, policy, bottom=[m + s for m, s in zip(model, scoring)], label="observe + decide + compaction")
    axis.set_ylabel("mean decode step, ms")
    axis.set_title(f"policy cost in the reference path at {context} entries (batch 1)")
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
