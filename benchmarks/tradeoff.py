"""Fidelity and capacity side by side: for each served policy, its agreement with the full cache (a fidelity report)
against what it serves (a serving capacity report: output tokens/s and peak running requests relative to `none`).

The two reports come from their own benchmarks (`benchmarks.fidelity`, `benchmarks.serving --only capacity`); this
joins them by policy name, at one fidelity budget, into a table (printed and markdown) and one PNG. Several fidelity
reports may be given: a policy is read from the first that holds it at that budget; and several serving reports
(runs of the same workload), whose ratios to their own `none` are averaged.

    python -m benchmarks.tradeoff --serving results/serving/peers/serving-capacity.json \
        results/serving/peers-reversed/serving-capacity.json \
        --fidelity results/fidelity/solutions-24-merged/fidelity.json \
        results/fidelity/solutions-24-lookahead/fidelity.json --budget 20% --out results/tradeoff
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

from benchmarks.fidelity.report import markdown, metric_value, text

FIDELITY_METRICS = ("top1_agreement", "answer_top1_agreement", "mean_kl")
FULL_CACHE = "none"


def fidelity_by_policy(paths: list[Path], budget: str) -> dict[str, dict[str, float]]:
    """{policy: {metric: value}} at `budget`, each policy from the first report (and protocol) that holds it."""
    found: dict[str, dict[str, float]] = {}
    for path in paths:
        for protocol in json.loads(path.read_text())["protocols"].values():
            for policy, by_budget in protocol["results"].items():
                metrics = by_budget.get(budget)
                if metrics is not None and policy not in found:
                    found[policy] = {name: metric_value(metrics, name) for name in FIDELITY_METRICS}
    return found


def joined_rows(servings: list[dict], fidelity: dict[str, dict[str, float]]) -> list[dict]:
    """One row per policy every serving report measured, `none` first, with its fidelity where a report has it.
    Throughput and peak are read against each report's own `none` run (measured on the same host within the hour)
    and the ratios averaged over the reports; `tok_per_s` keeps each report's figure."""
    for serving in servings:
        if FULL_CACHE not in serving["capacity"]:
            raise SystemExit(f"a serving report has no `{FULL_CACHE}` run to compare with: rerun it with none")
    exact = {name: 0.0 if name == "mean_kl" else 1.0 for name in FIDELITY_METRICS}  # the full cache against itself
    unmeasured = {name: None for name in FIDELITY_METRICS}
    rows = []
    for policy in servings[0]["capacity"]:
        runs = [serving["capacity"][policy] for serving in servings if policy in serving["capacity"]]
        if len(runs) < len(servings):
            continue
        bases = [serving["capacity"][FULL_CACHE] for serving in servings]
        rows.append({
            "policy": policy,
            **(exact if policy == FULL_CACHE else fidelity.get(policy, unmeasured)),
            "tok_per_s": [run["output_tok_per_s"] for run in runs],
            "throughput_ratios": [run["output_tok_per_s"] / base["output_tok_per_s"] for run, base in zip(runs, bases)],
            "peak_running": max(run["peak_running"] for run in runs),
            "peak_ratio": mean(run["peak_running"] / base["peak_running"] for run, base in zip(runs, bases)),
            # Reports made before the serving benchmark read it lack it.
            "state_bytes": max((run["state_bytes_per_request"] for run in runs if "state_bytes_per_request" in run),
                               default=None),
            "retractions": sum(run["retractions"] for run in runs),
            "leaked_slots": sum(run["leaked_slots"] for run in runs),
        })  # fmt: skip
    for row in rows:
        row["throughput_ratio"] = mean(row["throughput_ratios"])
    return rows


def table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells; the eviction state's column only where a serving report measured it."""

    def number(value, form: str) -> str:
        return "-" if value is None else form.format(value)

    with_state = any(row["state_bytes"] is not None for row in rows)
    header = ["policy", "top-1 (answer part)", "mean KL", "output tok/s per run (mean x none)", "peak running (x none)",
              *(["eviction state per request"] if with_state else []), "retractions", "leaked slots"]  # fmt: skip
    body = [[
        row["policy"],
        f"{number(row['top1_agreement'], '{:.3f}')} ({number(row['answer_top1_agreement'], '{:.3f}')})",
        number(row["mean_kl"], "{:.3f}"),
        f"{' / '.join(f'{value:.1f}' for value in row['tok_per_s'])} ({row['throughput_ratio']:.2f}x)",
        f"{row['peak_running']} ({row['peak_ratio']:.0f}x)",
        *([number(row["state_bytes"] and row["state_bytes"] / 1e3, "{:.0f} KB")] if with_state else []),
        str(row["retractions"]), str(row["leaked_slots"]),
    ] for row in rows]  # fmt: skip
    return header, body


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    panels = (("top1_agreement", "top-1 agreement with the full cache"),
              ("answer_top1_agreement", "top-1 agreement, answer part"))  # fmt: skip
    for axis, (metric, label) in zip(axes, panels):
        # Labels of neighbours in the metric alternate above and below their points.
        placed = sorted((row for row in rows if row[metric] is not None), key=lambda row: row[metric])
        for index, row in enumerate(placed):
            color = "black" if row["policy"] == FULL_CACHE else "tab:red" if row["policy"] == "crystal" else "tab:blue"
            ratios = row["throughput_ratios"]
            axis.errorbar(row["throughput_ratio"], row[metric], color=color, zorder=2, linewidth=1,
                          xerr=[[row["throughput_ratio"] - min(ratios)], [max(ratios) - row["throughput_ratio"]]])
            axis.scatter(row["throughput_ratio"], row[metric], color=color, s=30 * row["peak_ratio"], zorder=3)
            axis.annotate(row["policy"], (row["throughput_ratio"], row[metric]), textcoords="offset points",
                          xytext=(6, 4 if index % 2 else -11), fontsize=8)  # fmt: skip
        axis.set_xlabel("served output tokens/s relative to the full cache (mean; bar: the runs' range)\n"
                        "marker area: peak running requests")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serving", type=Path, nargs="+", required=True,
                        help="serving reports with capacity runs (ratios are taken within each, then averaged)")
    parser.add_argument("--fidelity", type=Path, nargs="+", required=True, help="fidelity reports (first one wins)")
    parser.add_argument("--budget", default="20%", help="the fidelity budget to read (a column of the reports)")
    parser.add_argument("--out", type=Path, default=Path("results/tradeoff"))
    args = parser.parse_args(argv)
    servings = [json.loads(path.read_text()) for path in args.serving]
    rows = joined_rows(servings, fidelity_by_policy(args.fidelity, args.budget))
    header, body = table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    serving = servings[0]
    title = (f"Fidelity at a {args.budget} budget against serving at {serving['budget']} entries "
             f"({serving['requests']} requests x {serving['new_tokens']} new tokens, pool {serving['pool_tokens']}; "
             f"{len(servings)} run{'s' if len(servings) > 1 else ''})")
    (args.out / "tradeoff.json").write_text(json.dumps({
        "serving": [str(path) for path in args.serving], "fidelity": [str(path) for path in args.fidelity],
        "budget": args.budget, "rows": rows,
    }, indent=1))  # fmt: skip
    (args.out / "tradeoff.md").write_text(f"{title}\n\n{markdown(header, body)}\n")
    plot(rows, title, args.out / "tradeoff.png")
    print(title)
    print(text(header, body))
    print(f"wrote {args.out}/tradeoff.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
