"""One report from several fidelity runs on the same sequences: budgets or policies run apart (to fit a time slot,
or added later) become one table, and the paired comparisons span every run, since each configuration keeps its
per-sequence sums and the replays are deterministic."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from benchmarks.fidelity.kvpress_runner import PRESSES
from benchmarks.fidelity.report import HINDSIGHT, ORACLE
from crystal_sglang.policies import POLICY_NAMES, policy_class

# What every merged run must share: otherwise the same budget would not mean the same cache.
SHARED = ("model", "mode", "prompts", "instruction", "new_tokens")
# Settings only reallocating policies (`crystal`) read. Runs may differ in them as long as every reallocating row of the
# merged report comes from runs that agree on them (runs made before the default direction changed lack the key).
REALLOCATION_SETTINGS = ("realloc_signal", "realloc_period", "realloc_floor", "realloc_power")
ORDER = ("none", *(p for p in POLICY_NAMES if p != "none"), ORACLE, HINDSIGHT, *PRESSES)  # as a fresh run lists them


class MergeError(ValueError):
    """Runs that cannot be merged: different settings or different sequences."""


def load_run(path: Path) -> dict:
    """A run's JSON, from its output directory or the file itself."""
    if path.is_dir():
        found = sorted(path.glob("fidelity*.json"))
        if len(found) != 1:
            raise MergeError(f"{path} holds {len(found)} fidelity*.json files, not one: pass the file to merge")
        path = found[0]
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MergeError(f"{path} is not a fidelity run's JSON ({error})") from None


def sequence_identity(sequences: list[dict]) -> list[dict]:
    """A protocol's sequences without the per-budget sizes, which differ between runs of other budgets."""
    return [{k: v for k, v in s.items() if k != "budget_entries"} for s in sequences]


def merge_section(merged: dict, section: dict, name: str) -> None:
    if sequence_identity(merged["sequences"]) != sequence_identity(section["sequences"]):
        raise MergeError(f"protocol {name}: the runs replayed different sequences (prompts, lengths or labels)")
    for ours, theirs in zip(merged["sequences"], section["sequences"]):
        ours["budget_entries"].update(theirs["budget_entries"])
    for policy, by_budget in section["results"].items():
        merged["results"].setdefault(policy, {}).update(by_budget)
    if merged["kvpress"]["status"] != "ok" and section["kvpress"]["status"] == "ok":
        merged["kvpress"] = section["kvpress"]
    merged["full_cache_sanity"] = merged["full_cache_sanity"] or section["full_cache_sanity"]
    for step, seconds in section["wall_seconds"].items():
        merged["wall_seconds"][step] = merged["wall_seconds"].get(step, 0.0) + seconds


def row_sources(runs: list[dict]) -> dict[tuple[str, str, str], int]:
    """(protocol, policy, budget): the index of the run whose row the merged report keeps (a later run's replaces
    an earlier one's)."""
    source = {}
    for index, run in enumerate(runs):
        for name, section in run["protocols"].items():
            for policy, by_budget in section["results"].items():
                source.update({(name, policy, budget): index for budget in by_budget})
    return source


def merged_settings(runs: list[dict], source: dict[tuple[str, str, str], int]) -> dict:
    """The eviction settings every run shares, with the reallocation settings of the runs the merged report's
    reallocating rows come from."""
    def split(settings: dict) -> tuple[dict, dict]:
        shared = {k: v for k, v in settings.items() if k not in REALLOCATION_SETTINGS}
        return shared, {k: v for k, v in settings.items() if k in REALLOCATION_SETTINGS}

    shared = [split(run["eviction_settings"])[0] for run in runs]
    if any(settings != shared[0] for settings in shared):
        raise MergeError(f"the runs differ in eviction_settings: {[run['eviction_settings'] for run in runs]}; "
                         "merge only runs of the same protocol")  # fmt: skip
    kept = sorted({index for (_, policy, _), index in source.items()
                   if policy in POLICY_NAMES and policy_class(policy).reallocates}) or [len(runs) - 1]  # fmt: skip
    reallocation = [split(runs[index]["eviction_settings"])[1] for index in kept]
    if any(settings != reallocation[0] for settings in reallocation):
        raise MergeError(f"the reallocating rows would come from runs with other reallocation settings: "
                         f"{reallocation}; run them again with the same settings")  # fmt: skip
    return {**shared[0], **reallocation[0]}


def merged_params(runs: list[dict], source: dict[tuple[str, str, str], int]) -> dict:
    """Each policy's parameters, from the runs its rows come from, which must agree: a run made before reports
    recorded them counts as parameters unknown, so its `crystal` rows do not join a newer run's."""
    params = {}
    for policy in dict.fromkeys(policy for _, policy, _ in source):
        if policy not in POLICY_NAMES:
            continue
        kept = sorted({index for (_, row_policy, _), index in source.items() if row_policy == policy})
        recorded = [runs[index].get("policy_params", {}).get(policy) for index in kept]
        if any(value != recorded[0] for value in recorded):
            raise MergeError(f"the {policy} rows would come from runs with other {policy} parameters "
                             f"({', '.join(map(str, recorded))}; None: a run that did not record them); run them "
                             "again with the same parameters")  # fmt: skip
        if recorded[0] is not None:
            params[policy] = recorded[0]
    return params


def merge_runs(runs: list[dict], command: str) -> dict:
    """The union of `runs`' results per protocol; a later run's (policy, budget) replaces an earlier one's."""
    if not runs:
        raise MergeError("nothing to merge")
    first = runs[0]
    for key in SHARED:
        values = [run.get(key) for run in runs]
        if any(value != values[0] for value in values):
            raise MergeError(f"the runs differ in {key}: {values}; merge only runs of the same protocol")
    source = row_sources(runs)
    eviction_settings = merged_settings(runs, source)
    policy_params = merged_params(runs, source)
    protocols: dict[str, dict] = {}
    for run in runs:
        for name, section in run["protocols"].items():
            if name in protocols:
                merge_section(protocols[name], section, name)
            else:
                protocols[name] = copy.deepcopy(section)
    for section in protocols.values():
        results = section["results"]
        ranked = sorted(results, key=lambda p: ORDER.index(p) if p in ORDER else len(ORDER))
        section["results"] = {policy: results[policy] for policy in ranked}
    budgets = []
    for run in runs:
        budgets += [b for b in run["budgets"] if b not in budgets]
    threads = sorted({run["torch_threads"] for run in runs})
    return {
        **first,
        "eviction_settings": eviction_settings,
        "policy_params": policy_params,
        "command": command,
        "merged_from": [run["command"] for run in runs],
        "budgets": budgets,
        "torch_threads": threads[0] if len(threads) == 1 else "/".join(map(str, threads)),
        "protocols": protocols,
        "wall_seconds_total": sum(run["wall_seconds_total"] for run in runs),
    }
