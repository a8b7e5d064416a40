"""How well does a signal a policy can see predict the attention an entry will still receive?

The hindsight ceiling shows that keeping the entries the full cache's later queries attend to most would bring a
policy close to the full cache; this study asks how much of that a causal signal recovers, one eviction at a time,
on the full cache's own attention (no replay): at every 16th position past both the budget and the prompt, per
(layer, KV head), the signal's top entries (the benchmark's 4 sinks and 8-entry window aside, which every policy
keeps) are compared with the entries of most future attention. `captured` is the future attention on the signal's choice over that on the ideal choice
(1 = as good as foresight); `prompt share` is the share of the chosen entries that lie in the prompt.

Signals: our policies' own rankings (`crystal-lite`'s LRFU worth, `h2o`'s accumulated attention, driven through the
policy classes on the full cache's attention rows), attention decayed by a constant factor per step without a
nucleus, the attention of the last 32 queries, and recency. As in the policies, only decode-step queries are seen.
`--answer-queries` counts as the future only the attention of the queries that predict answer-part tokens (what the
answer-first principle protects).

    python -m benchmarks.fidelity.predictability --problems ../shared/data/math500.jsonl --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity.recall import FullAttention
from benchmarks.fidelity.replay import EVICTABLE_PROMPT
from benchmarks.fidelity.scoring import ANSWER
from crystal_sglang.config import Budget, parse_budget
from crystal_sglang.policies import create_policy, make_spec
from crystal_sglang.policies.base import CacheShape, SelectionInput, StepScores

SINKS, WINDOW, EVERY = 4, 8, 16
IDEAL = "hindsight (ideal)"
DECAYS = (0.8, 0.9, 0.97)
QUERY_WINDOW = 32

# A signal maps one layer's attention rows [H, N, N] (row t: the query at t over positions <= t) and the prompt
# length P to its score at every position t >= P: [H, N (t), N (entry)], higher kept.
Signal = Callable[[torch.Tensor, int], torch.Tensor]


def policy_signal(name: str, config: dict | None = None) -> Signal:
    """The priority of one of our policies (with `config`), fed the attention rows of the decode queries one step at a
    time."""

    def scores(rows: torch.Tensor, prompt: int) -> torch.Tensor:
        heads, length, _ = rows.shape
        policy = create_policy(make_spec(name, Budget(entries=length), {**EVICTABLE_PROMPT, **(config or {})}))
        state = policy.new_state(CacheShape(layers=1, kv_heads=heads, group=1, head_dim=1))
        state.entries.append(policy.initial_entries(state, prompt, prompt - 1))
        result = torch.zeros(heads, length, length)
        for step in range(prompt, length):
            state.entries.append(policy.initial_entries(state, 1, step))
            valid = torch.ones(1, heads, step + 1, dtype=torch.bool)
            policy.observe(state, StepScores(attention=rows[None, :, step, : step + 1]), step, valid)
            positions = torch.arange(step + 1).expand(1, heads, step + 1)
            selection = SelectionInput(budgets=torch.zeros(1, heads, dtype=torch.int64), protected=~valid,
                                       valid=valid, positions=positions, step=step)  # fmt: skip
            result[:, step, : step + 1] = policy.priority(state, selection)[0].float()
        return result

    return scores


def decayed_signal(lam: float) -> Signal:
    """Each decode query's attention added to an entry's score, every score multiplied by `lam` per step."""

    def scores(rows: torch.Tensor, prompt: int) -> torch.Tensor:
        result = torch.zeros_like(rows)
        running = torch.zeros_like(rows[:, 0])
        for step in range(prompt, rows.shape[1]):
            running = lam * running + rows[:, step]
            result[:, step] = running
        return result

    return scores


def window_signal(rows: torch.Tensor, prompt: int) -> torch.Tensor:
    """The attention of the last `QUERY_WINDOW` decode queries, summed."""
    seen = rows.clone()
    seen[:, :prompt] = 0
    total = seen.cumsum(1)
    return total - torch.cat([torch.zeros_like(total[:, :QUERY_WINDOW]), total[:, :-QUERY_WINDOW]], dim=1)


def recency_signal(rows: torch.Tensor, prompt: int) -> torch.Tensor:
    return torch.arange(rows.shape[-1], dtype=rows.dtype).expand_as(rows)


SIGNALS: dict[str, Signal] = {
    "crystal-lite (LRFU worth)": policy_signal("crystal-lite", {"redundancy": 0}),  # attention rows only, no keys
    "h2o (accumulated)": policy_signal("h2o"),
    **{f"decayed attention {lam}": decayed_signal(lam) for lam in DECAYS},
    f"last {QUERY_WINDOW} queries": window_signal,
    "recency": recency_signal,
}


def study(attention: FullAttention, budgets: dict[str, int], signals: dict[str, Signal] = SIGNALS,
          queries: torch.Tensor | None = None) -> dict:
    """Per budget label and signal, sums over (eviction point, layer, KV head) of `captured` and `prompt share`,
    and their count. `queries` [N] bool: the future is the attention of these queries only (the points where none
    of them is still to come are skipped); the signals still see every decode query."""
    prompt = attention.prompt_length
    layers, _, length, _ = attention.keys.shape
    totals = {label: {name: [0.0, 0.0, 0] for name in [IDEAL, *signals]} for label in budgets}
    for layer in range(layers):
        rows = attention.layer_rows(layer)
        counted = rows if queries is None else rows * queries[None, :, None]
        future = counted.flip(1).cumsum(1).flip(1)  # future[:, s, j]: attention to j from the queries at s and after
        scores = {name: signal(rows, prompt) for name, signal in signals.items()}
        for label, budget in budgets.items():
            keep = budget - SINKS - WINDOW
            for step in range(max(budget, prompt), length - 1, EVERY):
                candidates = slice(SINKS, step + 1 - WINDOW)
                still = future[:, step + 1, candidates]
                if not bool(still.any()):
                    continue
                best = still.topk(keep, -1)
                in_prompt = torch.arange(SINKS, step + 1 - WINDOW) < prompt
                chosen = {IDEAL: best.indices}
                chosen.update({name: s[:, step, candidates].topk(keep, -1).indices for name, s in scores.items()})
                for name, indices in chosen.items():
                    captured = torch.gather(still, -1, indices).sum(-1) / best.values.sum(-1).clamp_min(1e-12)
                    total = totals[label][name]
                    total[0] += float(captured.sum())
                    total[1] += float(in_prompt[indices].float().mean(-1).sum())
                    total[2] += captured.numel()
    return totals


def answer_queries(sequence) -> torch.Tensor:
    """[N] bool over the positions of the full cache's forward: those whose query predicts an answer-part token."""
    prompt = len(sequence.prompt_ids)
    mask = torch.zeros(prompt + len(sequence.continuation_ids) - 1, dtype=torch.bool)
    for index, label in enumerate(sequence.labels):
        mask[prompt + index - 1] = label == ANSWER
    return mask


def mean_over_sequences(per_sequence: list[dict]) -> dict:
    """{budget: {signal: {"captured", "prompt_share", "points"}}} over all sequences."""
    result = {}
    for label in per_sequence[0]:
        result[label] = {}
        for name in per_sequence[0][label]:
            captured, prompt, count = (sum(totals[label][name][i] for totals in per_sequence) for i in range(3))
            result[label][name] = {"captured": captured / max(count, 1), "prompt_share": prompt / max(count, 1),
                                   "points": count}  # fmt: skip
    return result


def study_over_sequences(model, sequences, budget_labels: list[str], signals: dict[str, Signal],
                         answer_only: bool) -> dict:  # fmt: skip
    """`mean_over_sequences` of the study of `signals` on `sequences` (their full-cache forwards run here), at each
    budget label resolved against each sequence's full length; `answer_only`: the answer queries' future only."""
    from benchmarks.fidelity.workload import full_cache_reference

    per_sequence = []
    for sequence, reference in zip(tqdm(sequences, desc="predictability", unit="seq"),
                                   full_cache_reference(model, sequences)):  # fmt: skip
        full = len(sequence.prompt_ids) + len(sequence.continuation_ids)
        budgets = {label: parse_budget(label).resolve(full) for label in budget_labels}
        queries = answer_queries(sequence) if answer_only else None
        per_sequence.append(study(reference.attention, budgets, signals, queries=queries))
    return mean_over_sequences(per_sequence)


def one_off_study(signals: dict[str, Signal], threads: int = 1, prompts: int = 8,
                  problems: Path = Path("../shared/data/math500.jsonl")) -> None:  # fmt: skip
    """The one-off studies' harness (their scripts under results/fidelity/): `signals` on the first `prompts` chained
    MATH-500 solutions conversations at 64 / 10 % / 20 %, all queries' future then the answer queries', printed as
    one line of captured shares per budget."""
    from benchmarks.fidelity.workload import load_default_model, solution_records, solution_sequences

    torch.set_num_threads(threads)
    _, tokenizer, model = load_default_model()
    sequences = solution_sequences(tokenizer, solution_records(problems), prompts, 512)
    for answer_only in (False, True):
        result = study_over_sequences(model, sequences, ["64", "10%", "20%"], signals, answer_only)
        print("ANSWER QUERIES" if answer_only else "ALL QUERIES")
        for label, by_signal in result.items():
            print(label, "  ".join(f"{name}={row['captured']:.3f}" for name, row in by_signal.items()))
        sys.stdout.flush()


def plot(result: dict, path: Path, answer_queries: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result)
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name in result[labels[0]]:
        axis.plot(labels, [result[label][name]["captured"] for label in labels], marker="o", label=name)
    axis.set_xlabel("budget (entries per layer and KV head)")
    axis.set_ylabel("future attention kept / ideal")
    future = "the answer part's attention" if answer_queries else "future attention"
    axis.set_title(f"How well past attention predicts {future} (one eviction)", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=Path, help="MATH-500 JSONL: chained solutions (default: greedy traces "
                        "of the built-in prompts)")  # fmt: skip
    parser.add_argument("--prompts", type=int, help="sequences (default: 8 solutions conversations, 20 traces)")
    parser.add_argument("--budgets", default="64,10%,20%")
    parser.add_argument("--answer-queries", action="store_true",
                        help="the future is the attention of the queries that predict answer-part tokens only")
    parser.add_argument("--out", type=Path, default=Path("results/fidelity/predictability"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from benchmarks.fidelity.workload import greedy_traces, load_default_model, solution_records, solution_sequences
    from crystal_sglang.prompts import load_problems

    _, tokenizer, model = load_default_model()
    if args.problems:
        sequences = solution_sequences(tokenizer, solution_records(args.problems), args.prompts or 8, 512)
    else:
        sequences = greedy_traces(model, tokenizer, load_problems(None, args.prompts or 20), 512)
    result = study_over_sequences(model, sequences, args.budgets.split(","), SIGNALS, args.answer_queries)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.fidelity.predictability " + " ".join(sys.argv[1:])
    (args.out / "predictability.json").write_text(json.dumps({"command": command, "results": result}, indent=1))
    plot(result, args.out / "predictability.png", args.answer_queries)
    for label, signals in result.items():
        print(f"budget {label}: captured / prompt share")
        for name, row in sorted(signals.items(), key=lambda item: -item[1]["captured"]):
            print(f"  {name:28s} {row['captured']:.3f}  {row['prompt_share']:.3f}")


if __name__ == "__main__":
    main()
