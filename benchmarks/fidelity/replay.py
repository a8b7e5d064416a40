"""Replays sequences with our policies: every (policy, budget, sequence) is one row of an `EvictingCache`,
teacher-forced one token per row per step, each step's logits scored against the full cache as they come."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity.scoring import ReplayScores, TokenScores, right_padded
from benchmarks.fidelity.workload import Sequence
from crystal_sglang.config import parse_budget
from crystal_sglang.policies import create_policy, make_spec
from crystal_sglang.reference.cache import EvictingCache, RowRequest, evicting_attention

FULL = "full"  # budget label of the no-eviction sanity row


@dataclass(frozen=True)
class Config:
    policy: str
    budget: str  # "64" (entries) or "10%" (of prompt + continuation), or FULL


def budget_entries(budget: str, sequence: Sequence) -> int:
    """A budget label in entries for this sequence: a share is of its prompt + continuation (its full length)."""
    return parse_budget(budget).resolve(len(sequence.prompt_ids) + len(sequence.continuation_ids))


def reads_scores(policy: str, settings: dict) -> bool:
    return create_policy(make_spec(policy, parse_budget("100%"), settings)).needs.scores


def replay_policies(
    model, sequences: list[Sequence], configs: list[Config], reference: list[torch.Tensor], settings: dict,
    end_of_think_ids: tuple[int, ...], pad_id: int,
) -> dict[Config, list[TokenScores]]:
    """Per configuration, the token scores of every sequence. `settings` are the eviction settings every policy
    gets (e.g. {"protect_prompt": False}); the budget of a ratio row is resolved against its own full length.

    The evicting rows of one sequence share a cache (they stop together, at the sequence's end, and hold similar
    numbers of entries); the full-cache rows of all sequences share another, so that no evicting row attends over
    the padding up to a full-length row."""
    # Rows whose policies read attention scores first: the cache scores one span of rows.
    evicting = sorted((config for config in configs if config.budget != FULL),
                      key=lambda config: not reads_scores(config.policy, settings))  # fmt: skip
    groups = [[(config, index) for config in evicting] for index in range(len(sequences))]
    groups.append([(config, index) for config in configs if config.budget == FULL for index in range(len(sequences))])
    groups = [group for group in groups if group]
    steps = sum(max(len(sequences[index].continuation_ids) for _, index in group) for group in groups)
    result: dict[Config, list[TokenScores]] = {config: [None] * len(sequences) for config in configs}
    with tqdm(total=steps, desc=f"our policies ({len(configs)} configurations)", unit="token") as progress:
        for group in groups:
            scores = replay_rows(model, sequences, group, reference, settings, end_of_think_ids, pad_id, progress)
            for (config, index), row_scores in zip(group, scores):
                result[config][index] = row_scores
    return result


@torch.no_grad()
def replay_rows(
    model, sequences: list[Sequence], rows: list[tuple[Config, int]], reference: list[torch.Tensor], settings: dict,
    end_of_think_ids: tuple[int, ...], pad_id: int, progress,
) -> list[TokenScores]:
    """Rows (configuration, sequence index) as one `EvictingCache`, teacher-forced; token scores per row."""
    requests = []
    for config, index in rows:
        sequence = sequences[index]
        full_length = len(sequence.prompt_ids) + len(sequence.continuation_ids)
        budget = parse_budget(config.budget if config.budget != FULL else "100%")
        spec = make_spec(config.policy, budget, settings)
        requests.append(RowRequest(spec, len(sequence.prompt_ids), full_length, end_of_think_ids=end_of_think_ids))
    cache = EvictingCache(model.config, requests)
    lengths = [len(sequences[index].continuation_ids) for _, index in rows]
    prompt_lengths = torch.tensor([len(sequences[index].prompt_ids) for _, index in rows])
    recorded = ReplayScores(len(rows))
    with evicting_attention(model):
        ids = right_padded([sequences[index].prompt_ids for _, index in rows], pad_id)
        hidden = model.model(input_ids=ids, position_ids=cache.prefill_position_ids(), past_key_values=cache)
        logits = model.lm_head(hidden.last_hidden_state[torch.arange(len(rows)), prompt_lengths - 1])
        for step in range(max(lengths)):
            live = [row for row, length in enumerate(lengths) if step < length]
            targets = torch.tensor([sequences[rows[row][1]].continuation_ids[step] for row in live])
            held = [float(evictor.valid.sum(-1).float().mean()) for evictor in cache.evictors]
            recorded.record(live, torch.stack([reference[rows[row][1]][step] for row in live]), logits[live], targets,
                            held)  # fmt: skip
            progress.update()
            if step + 1 == max(lengths):
                break
            fed = torch.tensor([sequences[index].continuation_ids[step] if step < lengths[row] else pad_id
                                for row, (_, index) in enumerate(rows)])  # fmt: skip
            positions = torch.tensor([[evictor.length] for evictor in cache.evictors])
            output = model(input_ids=fed.view(-1, 1), position_ids=positions, past_key_values=cache, logits_to_keep=1)
            cache.see_tokens(fed)
            logits = output.logits[:, -1]
    return recorded.rows
