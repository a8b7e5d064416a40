"""Joining a fidelity report and a serving report by policy (no model, no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import tradeoff


def fidelity_report(path: Path, results: dict) -> Path:
    path.write_text(json.dumps({"protocols": {"math500_solutions": {"results": results}}}))
    return path


def configuration(top1: float, answer: float, kl: float) -> dict:
    return {"all": {"top1_agreement": top1, "mean_kl": kl}, "answer": {"top1_agreement": answer}}


def served(tok_per_s: float, peak: int) -> dict:
    return {"output_tok_per_s": tok_per_s, "peak_running": peak, "retractions": 0, "leaked_slots": 0}


def test_each_policy_is_read_from_the_first_report_that_holds_it_at_the_budget(tmp_path):
    first = fidelity_report(tmp_path / "a.json", {
        "crystal": {"20%": configuration(0.94, 0.90, 0.04), "64": configuration(0.84, 0.81, 0.19)},
        "rkv": {"64": configuration(0.79, 0.77, 0.30)},
    })  # fmt: skip
    second = fidelity_report(tmp_path / "b.json", {
        "crystal": {"20%": configuration(0.50, 0.50, 1.0)},
        "rkv": {"20%": configuration(0.89, 0.86, 0.10)},
    })  # fmt: skip
    found = tradeoff.fidelity_by_policy([first, second], "20%")
    assert found == {
        "crystal": {"top1_agreement": 0.94, "answer_top1_agreement": 0.90, "mean_kl": 0.04},
        "rkv": {"top1_agreement": 0.89, "answer_top1_agreement": 0.86, "mean_kl": 0.10},
    }


def test_ratios_are_taken_within_each_run_and_unmeasured_fidelity_stays_empty():
    first = {"capacity": {"none": served(40.0, 4), "crystal": served(120.0, 16), "random": served(100.0, 16)}}
    second = {"capacity": {"none": served(50.0, 4), "crystal": served(100.0, 16), "random": served(100.0, 16),
                           "h2o": served(90.0, 16)}}  # fmt: skip
    fidelity = {"crystal": {"top1_agreement": 0.94, "answer_top1_agreement": 0.9, "mean_kl": 0.04}}
    rows = tradeoff.joined_rows([first, second], fidelity)
    by_policy = {row["policy"]: row for row in rows}
    assert list(by_policy) == ["none", "crystal", "random"]  # h2o ran once: no ratio to average
    assert by_policy["none"]["top1_agreement"] == 1.0 and by_policy["none"]["mean_kl"] == 0.0
    assert by_policy["crystal"]["throughput_ratios"] == pytest.approx([3.0, 2.0])
    assert by_policy["crystal"]["throughput_ratio"] == pytest.approx(2.5)
    assert by_policy["crystal"]["peak_ratio"] == pytest.approx(4.0)
    assert by_policy["random"]["top1_agreement"] is None
    header, body = tradeoff.table(rows)
    assert body[2][1:3] == ["- (-)", "-"] and body[1][3] == "120.0 / 100.0 (2.50x)"
    assert "eviction state per request" not in header  # runs made before the serving benchmark read it


def test_the_eviction_state_is_the_largest_any_run_read():
    runs = [{"capacity": {"none": served(40.0, 4), "crystal": served(120.0, 16)}} for _ in range(2)]
    for run, state in zip(runs, [340_000, 350_000]):
        run["capacity"]["none"]["state_bytes_per_request"] = 0
        run["capacity"]["crystal"]["state_bytes_per_request"] = state
    header, body = tradeoff.table(tradeoff.joined_rows(runs, {}))
    assert header[5] == "eviction state per request" and [row[5] for row in body] == ["0 KB", "350 KB"]


def test_a_serving_report_without_the_full_cache_is_refused():
    with pytest.raises(SystemExit, match="no `none` run"):
        tradeoff.joined_rows([{"capacity": {"crystal": served(120.0, 16)}}], {})
