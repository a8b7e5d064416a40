"""The one scoring code of the fidelity benchmark, used for our policies and for kvpress's presses alike.

Per replayed token: KL(full || policy) of the next-token distributions, whether the top-1 tokens agree, the
negative log-likelihood of the replayed token under the policy and whether the policy's top-1 is that token
(`compare`, recorded row by row by `ReplayScores` in both replays). Tokens are labelled "reasoning" or "answer" (or
left unscored), and `summarize` turns a configuration's tokens into its metrics.

Imports only torch: the kvpress runner loads this module from kvpress's own virtual environment.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import torch

REASONING, ANSWER = "reasoning", "answer"
PARTS = (REASONING, ANSWER, "all")
ANSWER_MARKER = "\\boxed"
ANSWER_TAIL = 0.2
ANSWER_RULE = (
    "answer part = the tokens of a scored span from the one where its last '\\boxed' starts to the span's end; "
    "a span without '\\boxed' has its final 20 % of tokens as the answer part; the rest of the span is reasoning"
)


@dataclass
class TokenScores:
    """One replayed sequence under one configuration: per continuation position, what `compare` measured, the KV
    entries the cache held per (layer, KV head) after the forward that made the prediction (filled by the replays:
    memory is what the budgets are meant to equalise), and the attention recall of that forward (our replay only)."""

    kl: list[float]
    agree: list[bool]
    nll: list[float]
    entries: list[float] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)  # the policy's top-1 is the replayed token


def compare(reference_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> TokenScores:
    """Rows of next-token logits [R, V] against the full cache's [R, V]; `targets` [R] are the replayed tokens."""
    reference = torch.log_softmax(reference_logits.to(torch.float32), dim=-1)
    policy = torch.log_softmax(logits.to(torch.float32), dim=-1)
    kl = (reference.exp() * (reference - policy)).sum(-1, dtype=torch.float64).clamp_min(0.0)
    top1 = logits.argmax(-1)
    agree = top1 == reference_logits.argmax(-1)
    nll = -policy.gather(-1, targets.view(-1, 1)).squeeze(-1)
    correct = top1 == targets
    return TokenScores(kl=kl.tolist(), agree=agree.tolist(), nll=nll.tolist(), correct=correct.tolist())


class ReplayScores:
    """The token scores of every row of a batched teacher-forced replay, recorded step by step."""

    def __init__(self, rows: int):
        self.rows = [TokenScores([], [], [], []) for _ in range(rows)]

    def record(self, live: list[int], reference_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
               entries: list[float], recall: list[float | None] | None = None) -> None:  # fmt: skip
        """One step: rows `live` (their logits, in that order, against the reference's), the entries every row of
        the batch holds and, when measured, every row's attention recall."""
        step = compare(reference_logits, logits, targets)
        for position, row in enumerate(live):
            scores = self.rows[row]
            scores.kl.append(step.kl[position])
            scores.agree.append(step.agree[position])
            scores.nll.append(step.nll[position])
            scores.correct.append(step.correct[position])
            scores.entries.append(entries[row])
            if recall is not None:
                scores.recall.append(recall[row])


def right_padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    """Token rows of different lengths as one [B, longest] tensor, padded at the end."""
    ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.int64)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row)
    return ids


def label_parts(token_spans: list[tuple[int, int]], text: str, scored_spans: list[tuple[int, int]]) -> list[str | None]:
    """Per token (its character span in `text`): REASONING, ANSWER, or None outside every scored span."""
    labels: list[str | None] = [None] * len(token_spans)
    for span_start, span_end in scored_spans:
        inside = [i for i, (start, _) in enumerate(token_spans) if span_start <= start < span_end]
        if not inside:
            continue
        marker = text.rfind(ANSWER_MARKER, span_start, span_end)
        if marker >= 0:
            answer = {i for i in inside if token_spans[i][1] > marker}
        else:
            answer = set(inside[len(inside) - math.ceil(ANSWER_TAIL * len(inside)) :])
        for i in inside:
            labels[i] = ANSWER if i in answer else REASONING
    return labels


def greedy_match_length(scores: TokenScores, labels: list[str | None]) -> int:
    """Scored tokens before the first top-1 disagreement. Teacher-forced on the full cache's own greedy trace, this
    is exactly how long free-running greedy decoding with the policy reproduces the trace: until the first
    disagreement both runs feed the model the same tokens, so they hold the same cache."""
    scored = [agree for agree, label in zip(scores.agree, labels) if label is not None]
    return next((i for i, agree in enumerate(scored) if not agree), len(scored))


def summarize(sequences: list[TokenScores], labels: list[list[str | None]], greedy: bool) -> dict:
    """Token-weighted metrics per part over all sequences of one configuration; `greedy`: also the greedy-match
    length (only meaningful on the model's own greedy traces)."""
    result = {}
    for part in PARTS:
        kl, agree, nll, recall, correct = [], [], [], [], []
        per_sequence = {"tokens": [], "agreed": [], "kl_sum": []}
        for scores, row_labels in zip(sequences, labels):
            inside = [i for i, label in enumerate(row_labels) if label is not None and (part == "all" or label == part)]
            kl += [scores.kl[i] for i in inside]
            agree += [scores.agree[i] for i in inside]
            nll += [scores.nll[i] for i in inside]
            recall += [scores.recall[i] for i in inside if scores.recall]
            correct += [scores.correct[i] for i in inside if scores.correct]
            per_sequence["tokens"].append(len(inside))
            per_sequence["agreed"].append(sum(scores.agree[i] for i in inside))
            per_sequence["kl_sum"].append(math.fsum(scores.kl[i] for i in inside))
        result[part] = {
            "tokens": len(kl),
            "top1_agreement": sum(agree) / len(agree) if agree else None,
            "mean_kl": sum(kl) / len(kl) if kl else None,
            "perplexity": math.exp(sum(nll) / len(nll)) if nll else None,
            "top1_accuracy": sum(correct) / len(correct) if correct else None,
            "attention_recall": statistics.fmean(recall) if recall else None,
            "per_sequence": per_sequence,  # for comparisons paired by sequence (report.paired_difference)
        }
    entries = [value for scores in sequences for value in scores.entries]
    if entries:
        result["entries_held"] = {"mean": statistics.fmean(entries), "max": max(entries)}
    if greedy:
        lengths = [greedy_match_length(scores, row_labels) for scores, row_labels in zip(sequences, labels)]
        scored = [sum(label is not None for label in row_labels) for row_labels in labels]
        result["greedy_match"] = {
            "mean": statistics.fmean(lengths),
            "median": statistics.median(lengths),
            "share_of_trace": sum(lengths) / max(1, sum(scored)),
            "per_sequence": lengths,
        }
    return result
