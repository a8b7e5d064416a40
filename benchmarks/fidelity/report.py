"""Tables (printed and markdown) and plots of the fidelity results: one line per policy, budgets on the x axis,
fixed budgets and ratio budgets as two panels; and paired comparisons of one policy against the others."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch

# (title, how to read one configuration's metric, format)
METRICS = {
    "top1_agreement": ("top-1 agreement with the full cache", lambda m: m["all"]["top1_agreement"], "{:.3f}"),
    "answer_top1_agreement": ("top-1 agreement, answer part", lambda m: m["answer"]["top1_agreement"], "{:.3f}"),
    "mean_kl": ("mean KL(full || policy), nats", lambda m: m["all"]["mean_kl"], "{:.4f}"),
    "answer_top1_accuracy": ("top-1 accuracy on the replayed text, answer part (the full cache's row: its own)",
                             lambda m: m["answer"].get("top1_accuracy"), "{:.3f}"),
    "greedy_match": ("greedy match before the first divergence, tokens",
                     lambda m: m.get("greedy_match", {}).get("mean"), "{:.1f}"),
    "entries_held": ("KV entries held per layer and KV head (mean over steps)",
                     lambda m: m.get("entries_held", {}).get("mean"), "{:.0f}"),
    "attention_recall": ("attention recall: share of the full cache's attention on the entries held",
                         lambda m: m["all"].get("attention_recall"), "{:.3f}"),
    "repeated_4grams": ("free-running: share of repeated 4-grams in the output",
                        lambda m: m.get("free_running", {}).get("repeated_4grams"), "{:.3f}"),
    "free_running_length": ("free-running: mean output length, tokens",
                            lambda m: m.get("free_running", {}).get("mean_length"), "{:.0f}"),
}  # fmt: skip
# The ceilings' rows in the results (benchmarks/fidelity/oracle.py, hindsight.py), drawn apart: not policies.
ORACLE = "oracle-topk"
HINDSIGHT = "hindsight"
CEILING_STYLES = {ORACLE: "-.", HINDSIGHT: ":"}
PLOTTED = ("top1_agreement", "answer_top1_agreement", "mean_kl", "greedy_match", "attention_recall", "repeated_4grams")


def has_values(results: dict, metric: str) -> bool:
    """Whether any configuration measured `metric` (greedy match and free running exist only on greedy traces)."""
    return any(metric_value(m, metric) is not None for by_budget in results.values() for m in by_budget.values())


def metric_value(metrics: dict, metric: str):
    return METRICS[metric][1](metrics)


def budget_columns(results: dict) -> list[str]:
    columns = []
    for by_budget in results.values():
        columns += [budget for budget in by_budget if budget not in columns and budget != "full"]
    return sorted(columns, key=lambda b: (b.endswith("%"), float(b.rstrip("%"))))


def cell(results: dict, policy: str, budget: str, metric: str) -> str:
    by_budget = results[policy]
    metrics = by_budget.get(budget, by_budget.get("full"))
    value = None if metrics is None else metric_value(metrics, metric)
    return "-" if value is None else METRICS[metric][2].format(value)


def table_rows(results: dict, metric: str) -> tuple[list[str], list[list[str]]]:
    columns = budget_columns(results)
    header = ["policy"] + columns
    rows = [[policy + (" (full cache)" if set(results[policy]) == {"full"} else "")]
            + [cell(results, policy, budget, metric) for budget in columns] for policy in results]  # fmt: skip
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(results: dict, metric: str) -> str:
    return markdown(*table_rows(results, metric))


def text_table(results: dict, metric: str) -> str:
    return text(*table_rows(results, metric))


def text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def render(row: list[str]) -> str:
        return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths)))

    return "\n".join([render(header)] + [render(row) for row in rows])


# What a paired comparison compares: (per-sequence sum field, summary field, format, higher is better)
PAIRED = {
    "top1_agreement": ("agreed", "top-1 agreement", "{:+.3f}", True),
    "mean_kl": ("kl_sum", "mean KL", "{:+.4f}", False),
}
RESAMPLES = 2000


def paired_difference(ours: dict, peer: dict, metric: str, part: str = "all", seed: int = 0):
    """`ours` minus `peer` on a token-weighted metric over the same sequences, with a 95 % bootstrap interval that
    resamples whole sequences (a sequence's tokens share one cache history, so they are not independent draws).
    None when either side lacks per-sequence data or the sequences differ."""
    field = PAIRED[metric][0]
    a, b = ours[part].get("per_sequence"), peer[part].get("per_sequence")
    if a is None or b is None or a["tokens"] != b["tokens"] or sum(a["tokens"]) == 0:
        return None
    tokens = torch.tensor(a["tokens"], dtype=torch.float64)
    gap = torch.tensor(a[field], dtype=torch.float64) - torch.tensor(b[field], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.randint(len(tokens), (RESAMPLES, len(tokens)), generator=generator)
    resampled = gap[draws].sum(1) / tokens[draws].sum(1).clamp_min(1)
    low, high = torch.quantile(resampled, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(gap.sum() / tokens.sum()), low, high


def comparison_rows(results: dict, policy: str, metric: str) -> tuple[list[str], list[list[str]]]:
    """`policy` against every other policy at each budget: difference and interval, with a verdict where the
    interval excludes zero ("better" or "worse" for `policy`)."""
    columns = budget_columns(results)
    header = [f"{policy} minus"] + columns
    _, _, form, higher_better = PAIRED[metric]
    rows = []
    for peer in results:
        if peer == policy or set(results[peer]) == {"full"}:
            continue
        row = [peer]
        for budget in columns:
            pair = None
            if budget in results[policy] and budget in results[peer]:
                pair = paired_difference(results[policy][budget], results[peer][budget], metric)
            if pair is None:
                row.append("-")
                continue
            difference, low, high = pair
            verdict = "" if low <= 0 <= high else " better" if (low > 0) == higher_better else " worse"
            row.append(f"{form.format(difference)} [{form.format(low)}, {form.format(high)}]{verdict}")
        rows.append(row)
    return header, rows


def plot_metric(results: dict, metric: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = budget_columns(results)
    panels = [("fixed budget (entries)", [c for c in columns if not c.endswith("%")]),
              ("ratio budget (% of prompt + continuation)", [c for c in columns if c.endswith("%")])]  # fmt: skip
    colors = dict(zip(results, plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]))
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for axis, (label, budgets) in zip(axes, panels):
        xs = [float(b.rstrip("%")) for b in budgets]
        for policy, by_budget in results.items():
            if set(by_budget) == {"full"}:
                value = metric_value(by_budget["full"], metric)
                if value is not None and xs:
                    axis.axhline(value, color="black", linestyle=":", linewidth=1, label=f"{policy} (full cache)")
                continue
            ys = [metric_value(by_budget[b], metric) if b in by_budget else None for b in budgets]
            ceiling = policy in CEILING_STYLES
            style = CEILING_STYLES.get(policy, "--" if policy.startswith("kvpress") else "-")
            width = 2.5 if policy == "crystal" else 1.2
            axis.plot(xs, [float("nan") if y is None else y for y in ys], style, marker="o", linewidth=width,
                      color="dimgray" if ceiling else colors[policy],
                      label=f"{policy} (ceiling)" if ceiling else policy)  # fmt: skip
        axis.set_xlabel(label)
        axis.set_xticks(xs)
        axis.set_xticklabels(budgets)
        axis.set_ylabel(textwrap.fill(METRICS[metric][0], 40))
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
