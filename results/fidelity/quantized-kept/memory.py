"""Fidelity against memory: `crystal` with its kept entries at 16 bits and at 8, 6 or 4 bits (experiment.py), each
point's KV memory as a share of the full cache's, on the 24 solutions conversations. Prints the table and writes
`memory.png` here. `PYTHONPATH=. python results/fidelity/quantized-kept/memory.py`.

Memory at the peak a request reaches (budget + buffer entries, just before an eviction; in brackets, at the budget,
just after one), per (layer, KV head), in 16-bit entries: a quantized entry weighs (bits + 2) / 16 (a 16-bit scale
and zero point per 16 numbers), and up to `UNQUANTIZED` entries stay at 16 bits (4 sinks, the window of 8, a group
of up to 15 still filling); on the float8 pool every entry weighs 1/2. Divided by the full cache's prompt +
continuation entries, averaged over the conversations."""

import json
from pathlib import Path

import matplotlib

from benchmarks.fidelity.report import paired_difference

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
FIDELITY = HERE.parent
BUFFER, UNQUANTIZED = 16, 4 + 8 + 15
FLOAT8 = "float8"  # every entry, sinks and window too, in 8 bits with one scale per layer (SGLang's float8 pool)
POINTS = [  # (label, bits, run, policy, budgets)
    ("crystal, 16 bits", 16, FIDELITY / "solutions-24-merged", "crystal", ("10%", "20%")),
    ("crystal, 16 bits", 16, FIDELITY / "redundancy/24-30-40", "crystal", ("30%", "40%")),
    ("crystal, 8 bits", 8, HERE / "q8-24", "crystal-q8", ("20%", "30%")),
    ("crystal, 6 bits", 6, HERE / "q6-24-30", "crystal-q6", ("30%",)),
    ("crystal, 6 bits", 6, HERE / "q6-q4-24-40", "crystal-q6", ("40%",)),
    ("crystal, 4 bits", 4, HERE / "q6-q4-24-40", "crystal-q4", ("40%",)),
    ("crystal, 4 bits", 4, HERE / "q4-24-45", "crystal-q4", ("45%",)),
    ("crystal, 4 bits", 4, HERE / "q4-24-50", "crystal-q4", ("50%",)),
    ("crystal, float8 pool", FLOAT8, HERE / "fp8-24", "crystal-fp8", ("30%",)),
]


def memory_share(sequence: dict, budget: str, bits: int | str, above_budget: int = BUFFER) -> float:
    held = sequence["budget_entries"][budget] + above_budget
    if bits == FLOAT8:
        weight = held / 2
    else:
        weight = held if bits == 16 else UNQUANTIZED + (held - UNQUANTIZED) * (bits + 2) / 16
    return weight / (sequence["prompt_tokens"] + sequence["continuation_tokens"])


rows = []
for label, bits, run, policy, budgets in POINTS:
    protocol = json.loads((run / "fidelity.json").read_text())["protocols"]["math500_solutions"]
    for budget in budgets:
        cell = protocol["results"][policy][budget]
        sequences = protocol["sequences"]
        memory = sum(memory_share(s, budget, bits) for s in sequences) / len(sequences)
        settled = sum(memory_share(s, budget, bits, 0) for s in sequences) / len(sequences)
        rows.append((label, f"{budget} ({settled:.3f})", memory, cell["all"]["top1_agreement"],
                     cell["answer"]["top1_agreement"], cell["all"]["mean_kl"], cell))  # fmt: skip


def against(cell: dict, base: dict, metric: str, part: str) -> str:
    gap, low, high = paired_difference(cell, base, metric, part)
    return f"{gap:+.3f} [{low:+.3f}, {high:+.3f}]"


base = next(row[6] for row in rows if row[0] == "crystal, 16 bits" and row[1].startswith("20%"))
print("| kept entries | budget in entries (memory after an eviction) | KV memory at the peak "
      "| top-1 (answer part) / KL | minus 16 bits at 20 %: top-1 | answer part | KL |")
print("|---|---|---|---|---|---|---|")
for label, budget, memory, top1, answer, kl, cell in rows:
    print(f"| {label} | {budget} | {memory:.3f} | {top1:.3f} ({answer:.3f}) / {kl:.3f} | "
          f"{against(cell, base, 'top1_agreement', 'all')} | {against(cell, base, 'top1_agreement', 'answer')} | "
          f"{against(cell, base, 'mean_kl', 'all')} |")

reference = next(row[2] for row in rows if row[6] is base)
figure, axes = plt.subplots(1, 2, figsize=(11, 4.4))
for axis, column, title in ((axes[0], 3, "top-1 agreement"), (axes[1], 4, "top-1 agreement, answer part")):
    for label in dict.fromkeys(row[0] for row in rows):
        points = sorted((row[2], row[column], row[1]) for row in rows if row[0] == label)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for memory, value, budget in points:
            axis.annotate(budget.split()[0], (memory, value), textcoords="offset points", xytext=(4, -10), fontsize=7)
    axis.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    axis.axvline(reference, color="grey", linestyle="--", linewidth=1)
    axis.text(reference, axis.get_ylim()[0], " crystal's memory at 20 %", fontsize=7, color="grey", va="bottom")
    axis.set_xlabel("KV memory at the peak, share of the full cache (16 bits)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
axes[0].legend()
figure.suptitle("crystal on 24 MATH-500 solutions conversations: fidelity against KV memory "
                 "(points: budget in entries)")
figure.tight_layout()
figure.savefig(HERE / "memory.png", dpi=120)
print(f"wrote {(HERE / 'memory.png').relative_to(FIDELITY.parent.parent)}")
