"""Merging fidelity runs on the same sequences into one report (no model needed)."""

from __future__ import annotations

import json
import shlex

import pytest

from benchmarks.fidelity import report
from benchmarks.fidelity.__main__ import invocation, recorded_params, recorded_settings, write_outputs
from benchmarks.fidelity.merge import REALLOCATION_SETTINGS, MergeError, load_run, merge_runs
from benchmarks.fidelity.scoring import REASONING, TokenScores, summarize
from crystal_sglang.config import Settings

SEQUENCES = [{"name": "a", "prompt_tokens": 10, "continuation_tokens": 4, "natural_end": False,
              "reasoning_tokens": 4, "answer_tokens": 0}]  # fmt: skip


def configuration(agree: list[bool]) -> dict:
    return summarize([TokenScores(kl=[0.0 if a else 1.0 for a in agree], agree=agree, nll=[0.0] * len(agree))],
                     [[REASONING] * len(agree)], greedy=False)  # fmt: skip


def run(budgets: dict[str, dict[str, list[bool]]], command: str, **overrides) -> dict:
    """A run's JSON as the benchmark writes it: `budgets` maps a budget to {policy: agreement per token}."""
    results = {"none": {"full": configuration([True] * 4)}}
    for budget, policies in budgets.items():
        for policy, agree in policies.items():
            results.setdefault(policy, {})[budget] = configuration(agree)
    section = {
        "replayed": "chained solutions",
        "sequences": [{**s, "budget_entries": {b: 8 for b in budgets}} for s in SEQUENCES],
        "results": results, "full_cache_sanity": None,
        "kvpress": {"status": "skipped: --no-kvpress"}, "wall_seconds": {"our_policies": 10.0},
    }  # fmt: skip
    return {
        "mode": "full", "command": command, "model": "m", "prompts": "p.jsonl", "instruction": "i", "new_tokens": 512,
        "solution_tokens": 512, "budgets": list(budgets), "settings_note": "s", "answer_rule": "r",
        "eviction_settings": {"sinks": 4}, "torch_threads": 2, "protocols": {"math500_solutions": section},
        "wall_seconds_total": 10.0, **overrides,
    }  # fmt: skip


def test_runs_of_other_budgets_and_policies_become_one_table_with_paired_comparisons(tmp_path):
    first = run({"64": {"crystal": [True, True, False, True], "rkv": [True, False, False, True]}}, "first")
    second = run({"128": {"crystal": [True] * 4, "h2o": [True, True, True, False]}}, "second")
    merged = merge_runs([first, second], "merge")
    results = merged["protocols"]["math500_solutions"]["results"]
    assert list(results) == ["none", "crystal", "rkv", "h2o"]  # registry order, whatever the run order
    assert set(results["crystal"]) == {"64", "128"}
    assert merged["budgets"] == ["64", "128"] and merged["merged_from"] == ["first", "second"]
    assert merged["protocols"]["math500_solutions"]["sequences"][0]["budget_entries"] == {"64": 8, "128": 8}
    assert merged["wall_seconds_total"] == 20.0
    header, rows = report.comparison_rows(results, "crystal", "top1_agreement")
    assert header == ["crystal minus", "64", "128"]
    assert rows[0][0] == "rkv" and rows[0][1].startswith("+0.250") and rows[0][2] == "-"
    assert rows[1][0] == "h2o" and rows[1][1] == "-" and rows[1][2].startswith("+0.250")
    assert first["protocols"]["math500_solutions"]["results"]["crystal"].keys() == {"64"}  # inputs untouched

    write_outputs(merged, tmp_path / "merged")
    summary = (tmp_path / "merged" / "summary.md").read_text()
    assert "Merged from:\n- `first`\n- `second`" in summary and "| crystal | 0.750 | 1.000 |" in summary
    assert "DecodingPress" not in summary  # kvpress did not run: its setup is not described
    assert load_run(tmp_path / "merged") == json.loads((tmp_path / "merged" / "fidelity.json").read_text())


def test_runs_with_other_settings_or_sequences_are_refused():
    base = run({"64": {"crystal": [True] * 4}}, "a")
    with pytest.raises(MergeError, match="eviction_settings"):
        merge_runs([base, run({"128": {"crystal": [True] * 4}}, "b", eviction_settings={"sinks": 8})], "m")
    other = run({"128": {"crystal": [True] * 4}}, "b")
    other["protocols"]["math500_solutions"]["sequences"][0]["continuation_tokens"] = 5
    with pytest.raises(MergeError, match="different sequences"):
        merge_runs([base, other], "m")
    with pytest.raises(MergeError, match="nothing"):
        merge_runs([], "m")


def test_runs_may_differ_in_reallocation_settings_when_the_reallocating_rows_come_from_one_setting():
    """A run made before the default direction changed (no `realloc_signal`) joins a newer one as long as every
    `crystal` row kept comes from runs of one setting; `crystal-lite` reads none of them."""
    old = run({"64": {"crystal": [False] * 4, "crystal-lite": [True] * 4}}, "old")
    new = run({"64": {"crystal": [True] * 4}}, "new", eviction_settings={"sinks": 4, "realloc_signal": "s"})
    merged = merge_runs([old, new], "m")
    assert merged["eviction_settings"] == {"sinks": 4, "realloc_signal": "s"}
    results = merged["protocols"]["math500_solutions"]["results"]
    assert results["crystal"]["64"]["all"]["top1_agreement"] == 1.0 and "64" in results["crystal-lite"]
    older_budget = run({"128": {"crystal": [True] * 4}}, "old-128")
    with pytest.raises(MergeError, match="reallocating rows"):
        merge_runs([older_budget, new], "m")  # crystal at 128 from one setting, at 64 from another


def test_a_crystal_run_with_another_realloc_power_joins_the_peers_runs():
    peers = run({"64": {"snapkv": [True] * 4}}, "peers", eviction_settings={"sinks": 4, "realloc_power": 1.0})
    sharper = run({"64": {"crystal": [True] * 4}}, "sharper", eviction_settings={"sinks": 4, "realloc_power": 2.0})
    assert merge_runs([peers, sharper], "m")["eviction_settings"] == {"sinks": 4, "realloc_power": 2.0}


def test_a_policys_rows_come_only_from_runs_that_ran_it_with_the_same_parameters(tmp_path):
    """A run made before reports recorded parameters joins a newer one for the policies whose rows it keeps; a
    `crystal` row of its own beside a newer run's would mix two `crystal`s, and so would two recorded settings."""
    with_redundancy = {"crystal": {"top_p": 0.9, "redundancy": 0.2}}
    old = run({"64": {"crystal": [False] * 4, "rkv": [True] * 4}}, "old")
    new = run({"64": {"crystal": [True] * 4}}, "new", policy_params=with_redundancy)
    merged = merge_runs([old, new], "m")
    assert merged["policy_params"] == with_redundancy
    assert merged["protocols"]["math500_solutions"]["results"]["crystal"]["64"]["all"]["top1_agreement"] == 1.0
    write_outputs(merged, tmp_path)
    assert "- Policy parameters: `crystal` top_p 0.9, redundancy 0.2." in (tmp_path / "summary.md").read_text()

    old_other_budget = run({"128": {"crystal": [True] * 4}}, "old-128")
    with pytest.raises(MergeError, match="crystal rows would come from runs with other crystal parameters"):
        merge_runs([old_other_budget, new], "m")
    without = run({"128": {"crystal": [True] * 4}}, "without", policy_params={"crystal": {"redundancy": 0.0}})
    with pytest.raises(MergeError, match="other crystal parameters"):
        merge_runs([without, new], "m")


def test_a_directory_with_more_than_one_run_asks_for_the_file(tmp_path):
    for name in ("fidelity.json", "fidelity-quick.json"):
        (tmp_path / name).write_text(json.dumps(run({"64": {"crystal": [True]}}, name)))
    with pytest.raises(MergeError, match="pass the file"):
        load_run(tmp_path)
    assert load_run(tmp_path / "fidelity-quick.json")["command"] == "fidelity-quick.json"
    (tmp_path / "notes.json").write_text("not json")
    with pytest.raises(MergeError, match="notes.json is not a fidelity run"):
        load_run(tmp_path / "notes.json")


def test_the_recorded_command_can_be_run_again(monkeypatch):
    arguments = ["--policies", "crystal", "--config", '{"realloc_signal": "slots-per-crf"}', "--out", "results/x"]
    monkeypatch.setattr("sys.argv", ["__main__.py", *arguments])
    assert shlex.split(invocation()) == ["python", "-m", "benchmarks.fidelity", *arguments]


def test_a_run_records_every_reallocation_setting_at_its_default_unless_configured():
    recorded = recorded_settings(False, {"realloc_power": 1.0})
    assert set(REALLOCATION_SETTINGS) <= set(recorded)
    assert recorded["realloc_power"] == 1.0 and recorded["realloc_period"] == Settings.realloc_period
    assert recorded["protect_prompt"] is False


def test_a_run_records_each_policys_parameters_with_their_defaults():
    recorded = recorded_params(["none", "crystal", "crystal-lookahead", "rkv"], {"protect_prompt": False})
    assert set(recorded) == {"crystal", "crystal-lookahead", "rkv"}  # `none` has no parameters
    assert recorded["crystal"]["redundancy"] == 0.2 and recorded["crystal-lookahead"]["redundancy"] == 0.0
    assert recorded["rkv"]["lam"] == 0.1
    assert recorded_params(["crystal"], {"redundancy": 0.0})["crystal"]["redundancy"] == 0.0
