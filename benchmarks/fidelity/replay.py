"""Replays sequences with our policies: every (policy, budget, sequence) is one row of an `EvictingCache`,
teacher-forced one token per row per step, each step's logits scored against the full cache as they come (and the
attention recall of what each row held). `free_running` decodes the same rows from their own predictions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity.scoring import ReplayScores, TokenScores, right_padded
from benchmarks.fidelity.workload import Reference, Sequence
from crystal_sglang.config import Budget, parse_budget
from crystal_sglang.policies import create_policy, make_spec
from crystal_sglang.reference.cache import EvictingCache, RowRequest, evicting_attention, model_rotary

FULL = "full"  # budget label of the no-eviction sanity row
# The eviction settings the benchmark replays with unless told otherwise: the prompt evictable, as kvpress evicts it,
# so every entry counts toward the budget.
EVICTABLE_PROMPT = {"protect_prompt": False}


@dataclass(frozen=True)
class Config:
    policy: str
    budget: str  # "64" (entries) or "10%" (of prompt + continuation), or FULL


def budget_entries(budget: str, sequence: Sequence) -> int:
    """A budget label in entries for this sequence: a share is of its prompt + continuation (its full length)."""
    return parse_budget(budget).resolve(len(sequence.prompt_ids) + len(sequence.continuation_ids))


def reads_scores(policy: str, settings: dict) -> bool:
    return create_policy(make_spec(policy, parse_budget("100%"), settings)).needs.scores


def row_groups(configs: list[Config], sequences: int, settings: dict) -> list[list[tuple[Config, int]]]:
    """Rows (configuration, sequence index) in the groups that share a cache: the evicting rows of one sequence
    (they stop together and hold similar numbers of entries), and the full-cache rows of all sequences, so that no
    evicting row attends over the padding up to a full-length row. Rows whose policies read attention scores come
    first: the cache scores one span of rows."""
    evicting = sorted((config for config in configs if config.budget != FULL),
                      key=lambda config: not reads_scores(config.policy, settings))  # fmt: skip
    groups = [[(config, index) for config in evicting] for index in range(sequences)]
    groups.append([(config, index) for config in configs if config.budget == FULL for index in range(sequences)])
    return [group for group in groups if group]


def row_request(config: Config, sequence: Sequence, settings: dict, end_of_think_ids: tuple[int, ...],
                full_length: int) -> RowRequest:  # fmt: skip
    """One row's request. Its budget is the configuration's on this sequence (a share resolved against prompt +
    continuation) whatever `full_length`, the most tokens the row may hold (longer when it decodes free-running)."""
    budget = parse_budget("100%") if config.budget == FULL else Budget(entries=budget_entries(config.budget, sequence))
    spec = make_spec(config.policy, budget, settings)
    return RowRequest(spec, len(sequence.prompt_ids), full_length, end_of_think_ids=end_of_think_ids)


def prefill(model, cache: EvictingCache, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """Every row's prompt in one forward; the logits [B, V] at each row's own last prompt token."""
    ids = right_padded(prompts, pad_id)
    hidden = model.model(input_ids=ids, position_ids=cache.prefill_position_ids(), past_key_values=cache)
    last = torch.tensor([len(prompt) - 1 for prompt in prompts])
    return model.lm_head(hidden.last_hidden_state[torch.arange(len(prompts)), last])


def decode(model, cache: EvictingCache, fed: torch.Tensor) -> torch.Tensor:
    """One token per row [B], each at its row's logical position; the next logits [B, V]."""
    positions = torch.tensor([[evictor.length] for evictor in cache.evictors])
    output = model(input_ids=fed.view(-1, 1), position_ids=positions, past_key_values=cache, logits_to_keep=1)
    cache.see_tokens(fed)
    return output.logits[:, -1]


def replay_policies(
    model, sequences: list[Sequence], configs: list[Config], reference: list[Reference], settings: dict,
    end_of_think_ids: tuple[int, ...], pad_id: int,
) -> dict[Config, list[TokenScores]]:
    """Per configuration, the token scores of every sequence. `settings` are the eviction settings every policy
    gets (e.g. {"protect_prompt": False})."""
    groups = row_groups(configs, len(sequences), settings)
    steps = sum(max(len(sequences[index].continuation_ids) for _, index in group) for group in groups)
    result: dict[Config, list[TokenScores]] = {config: [None] * len(sequences) for config in configs}
    with tqdm(total=steps, desc=f"our policies ({len(configs)} configurations)", unit="token") as progress:
        for group in groups:
            indices = [index for _, index in group]
            requests = [row_request(config, sequences[index], settings, end_of_think_ids,
                                    len(sequences[index].prompt_ids) + len(sequences[index].continuation_ids))
                        for config, index in group]  # fmt: skip
            scores = replay_rows(model, sequences, indices, requests, reference, pad_id, progress)
            for (config, index), row_scores in zip(group, scores):
                result[config][index] = row_scores
    return result


@torch.no_grad()
def replay_rows(
    model, sequences: list[Sequence], indices: list[int], requests: list[RowRequest], reference: list[Reference],
    pad_id: int, progress, before_feeding: Callable[[int, EvictingCache], None] | None = None,
) -> list[TokenScores]:
    """Rows (a request each, replaying sequence `indices[row]`) as one `EvictingCache`, teacher-forced; token
    scores per row. `before_feeding(step, cache)` runs before continuation token `step` is fed (what a scheduler
    would do to the rows between two decode steps)."""
    cache = EvictingCache(model.config, requests, rotary=model_rotary(model))
    lengths = [len(sequences[index].continuation_ids) for index in indices]
    recorded = ReplayScores(len(indices))

    def recall(step: int) -> list[float | None]:
        """Per row, the recall of the forward that predicts continuation token `step`: what the row holds now."""
        return [reference[index].attention.recall(step, evictor.positions, evictor.valid) if step < length else None
                for index, evictor, length in zip(indices, cache.evictors, lengths)]  # fmt: skip

    with evicting_attention(model):
        logits = prefill(model, cache, [sequences[index].prompt_ids for index in indices], pad_id)
        recalls = recall(0)
        for step in range(max(lengths)):
            live = [row for row, length in enumerate(lengths) if step < length]
            targets = torch.tensor([sequences[indices[row]].continuation_ids[step] for row in live])
            held = [float(evictor.valid.sum(-1).float().mean()) for evictor in cache.evictors]
            references = torch.stack([reference[indices[row]].logits[step] for row in live])
            recorded.record(live, references, logits[live], targets, held, recalls)
            progress.update()
            if step + 1 == max(lengths):
                break
            fed = torch.tensor([sequences[index].continuation_ids[step] if step < lengths[row] else pad_id
                                for row, index in enumerate(indices)])  # fmt: skip
            recalls = recall(step + 1)
            if before_feeding is not None:
                before_feeding(step, cache)
            logits = decode(model, cache, fed)
    return recorded.rows
