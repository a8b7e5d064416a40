"""Free-running decoding: every (policy, budget) greedy-decodes the traces' prompts from its own predictions, and
the output is measured the way a reader meets it: its length, whether it ended by itself, and its repetition (the
share of repeated 4-grams: a cache that lost the thread tends to loop). The full cache's own run is the yardstick
and, decoding the same prompts, reproduces the greedy traces."""

from __future__ import annotations

import statistics

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity.replay import Config, decode, prefill, row_groups, row_request
from benchmarks.fidelity.workload import Sequence
from crystal_sglang.reference.cache import EvictingCache, evicting_attention, model_rotary

NGRAM = 4


def repeated_ngrams(tokens: list[int], n: int = NGRAM) -> tuple[int, int]:
    """(n-grams that repeat an earlier one, all n-grams) of a token list."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams)), len(grams)


def summarize_outputs(outputs: list[list[int]], ended: list[bool], traces: list[Sequence]) -> dict:
    """One configuration's free-running outputs (one per trace): lengths, endings, repetition, and how many
    reproduce the full cache's greedy trace exactly."""
    repeats = [repeated_ngrams(output) for output in outputs]
    return {
        "mean_length": statistics.fmean(len(output) for output in outputs),
        "ended_by_itself": sum(ended),
        "repeated_4grams": sum(r for r, _ in repeats) / max(1, sum(total for _, total in repeats)),
        "identical_to_trace": sum(output == trace.continuation_ids for output, trace in zip(outputs, traces)),
        "per_sequence": {"lengths": [len(output) for output in outputs], "ended": ended,
                         "repeated": [r for r, _ in repeats], "ngrams": [total for _, total in repeats]},
    }  # fmt: skip


def free_run(
    model, traces: list[Sequence], configs: list[Config], settings: dict, end_of_think_ids: tuple[int, ...],
    pad_id: int, eos_ids: set[int], new_tokens: int,
) -> dict[Config, dict]:
    """Per configuration, `summarize_outputs` of its free-running decode of every trace's prompt (at most
    `new_tokens`, ending at an end-of-sequence token; budgets as in the teacher-forced replay of the same trace)."""
    groups = row_groups(configs, len(traces), settings)
    outputs: dict[Config, list] = {config: [None] * len(traces) for config in configs}
    with tqdm(total=len(groups) * new_tokens, desc=f"free-running ({len(configs)} configurations)",
              unit="token") as progress:  # fmt: skip
        for group in groups:
            started = progress.n
            decoded = free_run_rows(model, traces, group, settings, end_of_think_ids, pad_id, eos_ids, new_tokens,
                                    progress)  # fmt: skip
            progress.update(new_tokens - (progress.n - started))  # the steps a group that ended early skipped
            for (config, index), row in zip(group, decoded):
                outputs[config][index] = row
    return {config: summarize_outputs([tokens for tokens, _ in rows], [ended for _, ended in rows], traces)
            for config, rows in outputs.items()}  # fmt: skip


@torch.no_grad()
def free_run_rows(
    model, traces: list[Sequence], rows: list[tuple[Config, int]], settings: dict, end_of_think_ids: tuple[int, ...],
    pad_id: int, eos_ids: set[int], new_tokens: int, progress,
) -> list[tuple[list[int], bool]]:
    """Rows (configuration, trace index) as one `EvictingCache`, each fed its own greedy token until it emits an
    end-of-sequence token (then padding until the group is done); per row, (its tokens, whether it ended)."""
    requests = [row_request(config, traces[index], settings, end_of_think_ids,
                            len(traces[index].prompt_ids) + new_tokens) for config, index in rows]  # fmt: skip
    cache = EvictingCache(model.config, requests, rotary=model_rotary(model))
    tokens: list[list[int]] = [[] for _ in rows]
    ended = [False] * len(rows)
    with evicting_attention(model):
        logits = prefill(model, cache, [traces[index].prompt_ids for _, index in rows], pad_id)
        for step in range(new_tokens):
            chosen = logits.argmax(-1).tolist()
            for row, token in enumerate(chosen):
                if ended[row]:
                    continue
                if token in eos_ids:
                    ended[row] = True
                else:
                    tokens[row].append(token)
            progress.update()
            if all(ended) or step + 1 == new_tokens:
                break
            fed = torch.tensor([pad_id if ended[row] else token for row, token in enumerate(chosen)])
            logits = decode(model, cache, fed)
    return list(zip(tokens, ended))
