"""The fidelity benchmark's scoring and its paired comparison between policies (no model needed)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.fidelity import report
from benchmarks.fidelity.scoring import ANSWER, REASONING, TokenScores, compare, summarize


def scores(agree: list[bool], kl: list[float]) -> TokenScores:
    return TokenScores(kl=kl, agree=agree, nll=[0.0] * len(agree))


def test_summarize_keeps_per_sequence_sums_that_add_up_to_the_totals():
    sequences = [scores([True, False, True], [0.0, 0.5, 0.1]), scores([False, True], [0.2, 0.0])]
    labels = [[REASONING, ANSWER, None], [REASONING, REASONING]]
    result = summarize(sequences, labels, greedy=False)
    assert result["all"]["per_sequence"] == {"tokens": [2, 2], "agreed": [1, 1], "kl_sum": [0.5, 0.2]}
    assert result["reasoning"]["per_sequence"]["tokens"] == [1, 2]
    assert result["answer"]["per_sequence"]["agreed"] == [0, 0]
    assert result["all"]["top1_agreement"] == pytest.approx(2 / 4)
    assert result["all"]["mean_kl"] == pytest.approx(0.7 / 4)


def test_accuracy_counts_the_replayed_token_and_agreement_the_full_caches_top1():
    full = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    policy = torch.tensor([[0.0, 3.0, 4.0], [2.0, 0.0, 1.0], [0.0, 0.0, 5.0]])
    measured = compare(full, policy, targets=torch.tensor([2, 1, 2]))
    assert measured.agree == [False, True, True]
    assert measured.correct == [True, False, True]
    result = summarize([measured], [[REASONING, ANSWER, ANSWER]], greedy=False)
    assert result["answer"]["top1_accuracy"] == pytest.approx(1 / 2)
    assert result["all"]["top1_accuracy"] == pytest.approx(2 / 3)
    assert summarize([scores([True], [0.0])], [[ANSWER]], greedy=False)["answer"]["top1_accuracy"] is None


def configuration(agree_per_sequence: list[list[bool]]) -> dict:
    sequences = [scores(agree, [0.0 if a else 1.0 for a in agree]) for agree in agree_per_sequence]
    return summarize(sequences, [[REASONING] * len(agree) for agree in agree_per_sequence], greedy=False)


def test_a_consistent_gap_is_significant_and_a_one_off_gap_is_not():
    base = [[True] * 20 for _ in range(10)]
    worse_everywhere = [[True] * 18 + [False] * 2 for _ in range(10)]
    worse_once = [[True] * 20 for _ in range(9)] + [[False] * 4 + [True] * 16]
    difference, low, high = report.paired_difference(configuration(base), configuration(worse_everywhere),
                                                     "top1_agreement")  # fmt: skip
    assert difference == pytest.approx(0.1) and low > 0
    difference, low, high = report.paired_difference(configuration(base), configuration(worse_once), "top1_agreement")
    assert difference == pytest.approx(4 / 200) and low <= 0 <= high
    results = {"crystal": {"64": configuration(base)}, "peer": {"64": configuration(worse_everywhere)},
               "other": {"64": configuration(worse_once)}}  # fmt: skip
    header, rows = report.comparison_rows(results, "crystal", "top1_agreement")
    assert header == ["crystal minus", "64"]
    assert rows[0][0] == "peer" and rows[0][1].startswith("+0.100") and rows[0][1].endswith("better")
    assert rows[1][0] == "other" and not rows[1][1].endswith(("better", "worse"))
    _, kl_rows = report.comparison_rows(results, "crystal", "mean_kl")
    assert kl_rows[0][1].startswith("-0.1000") and kl_rows[0][1].endswith("better")  # lower KL is better


def test_results_without_per_sequence_data_are_not_compared():
    old = configuration([[True, False]])
    del old["all"]["per_sequence"]
    assert report.paired_difference(old, configuration([[True, True]]), "top1_agreement") is None
