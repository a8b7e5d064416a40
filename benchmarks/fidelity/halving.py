"""What halving a running request's budget costs, against what the scheduler could read when it chooses whom to halve.

Under memory pressure the scheduler halves evicting requests' budgets one at a time until the next step fits; the
order matters only if something it can read predicts the cost. Per chained-solutions conversation, a served
`crystal` row (one slot count for every head, as in SGLang) is replayed as is and, beside it, once per checkpoint
with its budget halved there. The cost of a halving is the drop in top-1 agreement with the full cache (and the
rise in KL) over the next `--window` scored tokens; the signals are the row's CRF per held slot, its size, and the
LRFU worth of the entries the halving drops. Their Spearman correlations with the cost say which, if any, should
order the scheduler's halvings. With `--twice` a further row per checkpoint is halved twice there: what a second
halving of the same request costs beyond the first, against what the first cost, per slot each frees.

    python -m benchmarks.fidelity.halving --problems ../shared/data/math500.jsonl --prompts 24 --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity.replay import EVICTABLE_PROMPT, budget_entries, replay_rows
from benchmarks.fidelity.workload import (Reference, Sequence, full_cache_reference, load_default_model,
                                          solution_records, solution_sequences)
from crystal_sglang.config import Budget
from crystal_sglang.eviction import SHARED_SLOTS, RequestEvictor
from crystal_sglang.policies import make_spec
from crystal_sglang.reference.cache import EvictingCache, RowRequest

SIGNALS = ("crf_per_slot", "held", "dropped_worth")
COSTS = ("top1_loss", "kl_gain")


def signals(evictor: RequestEvictor, halved_budget: int) -> dict:
    """What the scheduler could read of a row just before halving it: its CRF per held slot (Crystal-KV's stored
    CRF), entries held per head, and the summed LRFU worth of the entries the halving will drop (mean over heads)."""
    selection = evictor.selection_input()
    held = evictor.valid.sum(-1)
    keep = torch.maximum(torch.full_like(held, halved_budget), selection.protected.sum(-1))
    drop = (held - keep).clamp_min(0)
    worth = evictor.policy.worth(evictor.state, selection.step)
    worth = worth.masked_fill(~evictor.valid | selection.protected, float("inf")).sort(-1).values
    lowest = torch.arange(worth.shape[-1]).expand_as(worth) < drop.unsqueeze(-1)
    crf = evictor.policy.utilisation(evictor.state, evictor.length - 1, evictor.valid)
    return {"crf_per_slot": float(crf.sum()) / max(1, int(held.sum())), "held": float(held.float().mean()),
            "dropped_worth": float(worth.masked_fill(~lowest, 0.0).sum(-1).mean())}  # fmt: skip


def halving_costs(model, sequence: Sequence, reference: Reference, budget: str, shares: list[float], window: int,
                  pad_id: int, progress, settings: dict = EVICTABLE_PROMPT,
                  twice: bool = False) -> list[dict]:  # fmt: skip
    """One sequence: a row kept at `budget` and a row per checkpoint (a share of the continuation) halved there;
    with `twice`, also a row per checkpoint halved twice there (a quarter), whose cost beyond the halved row's is
    what a second halving of the same request costs."""
    prompt, length = len(sequence.prompt_ids), len(sequence.continuation_ids)
    spec = make_spec("crystal", Budget(entries=budget_entries(budget, sequence)), settings)
    checkpoints = [int(share * length) for share in shares]
    halvings = [(checkpoint, times) for times in ((1, 2) if twice else (1,)) for checkpoint in checkpoints]
    requests = [RowRequest(spec, prompt, prompt + length, layout=SHARED_SLOTS) for _ in range(1 + len(halvings))]
    seen: dict[int, dict] = {}

    def halve(step: int, cache: EvictingCache) -> None:
        for row, (checkpoint, times) in enumerate(halvings, start=1):
            if step == checkpoint:
                evictor = cache.evictors[row]
                reduced = max(evictor.settings.protected_window + 1, evictor.budget >> times)
                if times == 1:
                    seen[checkpoint] = {**signals(evictor, reduced), "freed": evictor.budget - reduced}
                else:  # after the halved row of the same checkpoint (`halvings` lists those first)
                    seen[checkpoint]["second_freed"] = evictor.budget - reduced - seen[checkpoint]["freed"]
                evictor.set_budget(reduced)

    rows = replay_rows(model, [sequence], [0] * len(requests), requests, [reference], pad_id, progress, halve)
    result = []
    for row, checkpoint in enumerate(checkpoints, start=1):
        after = [i for i in range(checkpoint + 1, min(length, checkpoint + 1 + window)) if sequence.labels[i]]
        if checkpoint not in seen or not after:
            continue  # no scored token follows this checkpoint within the window

        def mean(values: list) -> float:
            return statistics.fmean(values[i] for i in after)

        def cost(before: int, reduced: int) -> dict:
            return {"top1_loss": mean(rows[before].agree) - mean(rows[reduced].agree),
                    "kl_gain": mean(rows[reduced].kl) - mean(rows[before].kl)}  # fmt: skip

        point = {"sequence": sequence.name, "checkpoint": checkpoint, "tokens": len(after), **seen[checkpoint],
                 **cost(0, row)}  # fmt: skip
        if twice:
            point.update({f"second_{name}": value for name, value in cost(row, row + len(checkpoints)).items()})
        result.append(point)
    return result


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        for rank, index in enumerate(order):
            result[index] = float(rank)
        return result

    return statistics.correlation(ranks(xs), ranks(ys))


def permutation_p(xs: list[float], ys: list[float], draws: int = 4000) -> float:
    """Share of random pairings whose |Spearman| reaches the observed one."""
    observed, generator, hits = abs(spearman(xs, ys)), torch.Generator().manual_seed(0), 0
    for _ in range(draws):
        shuffled = [ys[i] for i in torch.randperm(len(ys), generator=generator).tolist()]
        hits += abs(spearman(xs, shuffled)) >= observed - 1e-12
    return hits / draws


def summarize(points: list[dict]) -> dict:
    """Per signal and cost, Spearman and its permutation p; per signal, the share of checkpoint pairs from different
    sequences where halving the one with the lower signal cost less top-1 (ties in cost left out); with second
    halvings, their mean cost, how often one costs more than the first halving at its checkpoint, and the top-1 lost
    per slot freed by each."""
    result = {"checkpoints": len(points), "mean": {cost: statistics.fmean(p[cost] for p in points) for cost in COSTS}}
    for signal in SIGNALS:
        xs = [p[signal] for p in points]
        entry = {cost: {"spearman": spearman(xs, [p[cost] for p in points]),
                        "p": permutation_p(xs, [p[cost] for p in points])} for cost in COSTS}  # fmt: skip
        pairs = [(a, b) for a, b in itertools.combinations(points, 2)
                 if a["sequence"] != b["sequence"] and a["top1_loss"] != b["top1_loss"] and a[signal] != b[signal]]
        lower_costs_less = sum((a[signal] < b[signal]) == (a["top1_loss"] < b["top1_loss"]) for a, b in pairs)
        entry["lower_halved_costs_less"] = lower_costs_less / len(pairs) if pairs else None
        result[signal] = entry
    if points and "second_top1_loss" in points[0]:
        freeing = [p for p in points if p["second_freed"]]  # a quarter floored at the protected window frees none
        result["second_halving"] = {
            "mean": {cost: statistics.fmean(p[f"second_{cost}"] for p in points) for cost in COSTS},
            "costs_more_top1_than_the_first": statistics.fmean(p["second_top1_loss"] > p["top1_loss"] for p in points),
            "top1_loss_per_freed_slot": {
                "first": statistics.fmean(p["top1_loss"] / p["freed"] for p in points),
                "second": statistics.fmean(p["second_top1_loss"] / p["second_freed"] for p in freeing) if freeing
                else None,
            },
        }
    return result


def plot(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(SIGNALS), figsize=(5 * len(SIGNALS), 4), sharey=True)
    for axis, signal in zip(axes, SIGNALS):
        axis.scatter([p[signal] for p in points], [p["top1_loss"] for p in points], s=14)
        axis.set_xlabel(signal.replace("_", " "))
    axes[0].set_ylabel("top-1 agreement lost over the next tokens")
    figure.suptitle("what halving a request's budget costs, against what the scheduler can read")
    figure.tight_layout()
    figure.savefig(out)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=Path, required=True, help="MATH-500-style JSONL with `solution`s")
    parser.add_argument("--prompts", type=int, default=24, help="conversations (default 24)")
    parser.add_argument("--solution-tokens", type=int, default=512, help="min tokens per conversation (default 512)")
    parser.add_argument("--budget", default="20%", help="budget before halving (default 20%%)")
    parser.add_argument("--at", default="0.35,0.65", help="checkpoints, shares of each continuation")
    parser.add_argument("--window", type=int, default=128, help="scored tokens after a checkpoint (default 128)")
    parser.add_argument("--twice", action="store_true", help="also halve twice at each checkpoint (a second row)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--out", type=Path, default=Path("results/fidelity/halving"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _, tokenizer, model = load_default_model()
    sequences = solution_sequences(tokenizer, solution_records(args.problems), args.prompts, args.solution_tokens)
    if not sequences:
        sys.exit(f"{args.problems}: no conversation could be built")
    shares = [float(share) for share in args.at.split(",")]
    points = []
    with tqdm(total=sum(len(s.continuation_ids) for s in sequences), desc="halving", unit="token") as progress:
        for sequence in sequences:
            reference = full_cache_reference(model, [sequence])[0]
            points += halving_costs(model, sequence, reference, args.budget, shares, args.window,
                                    tokenizer.pad_token_id or 0, progress, twice=args.twice)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.fidelity.halving", *sys.argv[1:]])
    summary = summarize(points)
    (args.out / "halving.json").write_text(json.dumps({"command": command, "summary": summary, "points": points},
                                                      indent=1))  # fmt: skip
    plot(points, args.out / "halving.png")
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out / 'halving.json'} and {args.out / 'halving.png'}")


if __name__ == "__main__":
    main()
