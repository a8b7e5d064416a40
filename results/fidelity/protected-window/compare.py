"""Paired differences of one run's policy against another's, per budget, with 95 % bootstrap intervals over whole
conversations; `--from/--to` restrict to a range of the conversations (the 16 of the 24 a setting was not chosen on:
8 24); `--policy` (default crystal) names the policy in both runs, `--base-policy` another one in the base.

    PYTHONPATH=. python results/fidelity/protected-window/compare.py 8-base-20 8-window-16-20 20%
    PYTHONPATH=. python results/fidelity/protected-window/compare.py 24-base-20 24-window-16-20 20% --from 8 --to 24
    PYTHONPATH=. python results/fidelity/protected-window/compare.py ../solutions-24-power-2 \
        ../redundancy/24-redundancy-0.2 64,10%,20%
"""
import argparse, json
from pathlib import Path
from benchmarks.fidelity.report import paired_difference

HERE = Path(__file__).parent
parser = argparse.ArgumentParser()
parser.add_argument("base"); parser.add_argument("run"); parser.add_argument("budgets")
parser.add_argument("--from", dest="first", type=int, default=0); parser.add_argument("--to", type=int)
parser.add_argument("--policy", default="crystal"); parser.add_argument("--base-policy")
args = parser.parse_args()

def parts(name, policy, budget):
    protocols = json.loads((HERE / name / "fidelity.json").read_text())["protocols"]
    cell = next(iter(protocols.values()))["results"][policy][budget]
    return {part: {"per_sequence": {key: value[args.first : args.to] if isinstance(value, list) else value
                                    for key, value in cell[part]["per_sequence"].items()}}
            for part in ("all", "answer")}

for budget in args.budgets.split(","):
    run, base = parts(args.run, args.policy, budget), parts(args.base, args.base_policy or args.policy, budget)
    for part in ("all", "answer"):
        for metric in ("top1_agreement", "mean_kl"):
            gap, low, high = paired_difference(run, base, metric, part)
            print(f"{budget:4s} {part:6s} {metric:15s} {gap:+.4f} [{low:+.4f}, {high:+.4f}]")
