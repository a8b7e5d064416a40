"""Variants of one policy replayed side by side on the chained-solutions conversations: the harness of the one-off
studies kept under results/fidelity/ (each a small policy subclass, judged against its unchanged base in the same
batch). Prompt evictable, as the fidelity benchmark replays them."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity.replay import EVICTABLE_PROMPT, budget_entries, replay_rows
from benchmarks.fidelity.scoring import ANSWER
from benchmarks.fidelity.workload import (Reference, Sequence, full_cache_reference, load_default_model,
                                          solution_records, solution_sequences)  # fmt: skip
from crystal_sglang.config import Budget
from crystal_sglang.policies import make_spec
from crystal_sglang.reference.cache import RowRequest

# (the base policy's spec on one conversation, that conversation's full-cache reference) -> the policy to replay
VariantFactory = Callable[..., object]


def variant_agreement(model, sequences: list[Sequence], references: list[Reference],
                      variants: dict[str, VariantFactory], policy: str, budget: str, *,
                      settings: dict = EVICTABLE_PROMPT, end_of_think_ids: tuple[int, ...] = (),
                      pad_id: int = 0) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per variant, top-1 agreement with the full cache over the scored tokens ("all") and over the answer part
    (where there is one). Each conversation's variants are replayed as the rows of one batch."""
    counts = {name: {"all": [0, 0], "answer": [0, 0]} for name in variants}
    with tqdm(total=sum(len(s.continuation_ids) for s in sequences), unit="token") as progress:
        for index, sequence in enumerate(sequences):
            full = len(sequence.prompt_ids) + len(sequence.continuation_ids)
            spec = make_spec(policy, Budget(entries=budget_entries(budget, sequence)), settings)
            requests = [RowRequest(spec, len(sequence.prompt_ids), full, end_of_think_ids=end_of_think_ids,
                                   policy=factory(spec, references[index]))
                        for factory in variants.values()]  # fmt: skip
            rows = replay_rows(model, sequences, [index] * len(variants), requests, references, pad_id, progress)
            for name, scores in zip(variants, rows):
                for agree, label in zip(scores.agree, sequence.labels):
                    if label is None:
                        continue
                    for part in ("all", "answer") if label == ANSWER else ("all",):
                        counts[name][part][0] += agree
                        counts[name][part][1] += 1
    return {name: {part: round(hits / total, 4) for part, (hits, total) in parts.items() if total}
            for name, parts in counts.items()}  # fmt: skip


def top1_by_variant(variants: dict[str, VariantFactory], policy: str = "crystal-lite", budget: str = "20%",
                    conversations: int = 8, problems: Path = Path("../shared/data/math500.jsonl"),
                    threads: int = 1) -> dict[str, dict[str, float]]:  # fmt: skip
    """`variant_agreement` on the default model and the first `conversations` chained MATH-500 solutions, printed
    one line per variant."""
    torch.set_num_threads(threads)
    _, tokenizer, model = load_default_model()
    sequences = solution_sequences(tokenizer, solution_records(problems), conversations, 512)
    result = variant_agreement(model, sequences, full_cache_reference(model, sequences), variants, policy, budget,
                               end_of_think_ids=tuple(tokenizer.encode("</think>", add_special_tokens=False)),
                               pad_id=model.generation_config.pad_token_id or 0)  # fmt: skip
    for name, parts in result.items():
        print(name, parts, flush=True)
    return result
