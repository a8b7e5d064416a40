"""The transformers reference path: `EvictingCache` evicting with every policy while a tiny random Llama decodes.

With a budget covering the request, generation is bit-identical to the plain cache (tokens and logits). With a
small budget the cache really holds at most budget + buffer entries per layer and KV head, compaction keeps each
entry's key with its logical position, every new token is rotated at its true position, and a batch mixing
policies, budgets and prompt lengths decodes each row as it would alone.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import LlamaForCausalLM, LogitsProcessor, LogitsProcessorList, StoppingCriteria

from crystal_sglang.config import ConfigError
from crystal_sglang.kernels.score_reference import attention_logits, score_dense
from crystal_sglang.policies import POLICIES, POLICY_NAMES
from crystal_sglang.reference import cache as reference_cache
from crystal_sglang.reference.cache import EvictingCache, RowRequest, cache_shape, evicting_attention, model_rotary
from tests.policy_helpers import (
    SMALL_SEGMENTS,
    check_every_decision,
    make_test_spec,
)
from tests.tiny_model import RANDOM_LLAMA, build_tiny_gemma3, random_llama

CONFIG = RANDOM_LLAMA
SHAPE = cache_shape(CONFIG)
PROMPT, NEW_TOKENS = 12, 24
EVICTING = [name for name in POLICY_NAMES if POLICIES[name].evicts]
# A small budget: the prompt is not protected, so every policy has to make room.
SMALL = dict(budget=16, sinks=2, window=4, buffer=4, protect_prompt=False)
MARKER = (250, 251)  # end-of-think token ids of the scripted generations


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return random_llama()


@pytest.fixture(scope="module")
def prompt() -> torch.Tensor:
    return torch.randint(1, 250, (1, PROMPT), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def plain_output(model, prompt):
    return generate(model, prompt, NEW_TOKENS)


def generate(model, input_ids, new_tokens: int, cache: EvictingCache | None = None, **options):
    """Greedy generation with the plain cache, or with `cache` and its attention."""
    with torch.no_grad(), (evicting_attention(model) if cache is not None else contextlib.nullcontext()):
        return model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, output_scores=True,
                              return_dict_in_generate=True, past_key_values=cache, **options)  # fmt: skip


def row_spec(policy: str, budget: int, calibration: str, **config):
    if policy == "thinkv":
        config = {**SMALL_SEGMENTS, **config}
    return make_test_spec(policy, budget, calibration, **config)


class RecordPositions:
    """The position ids the model rotates with, one tensor per forward (a hook on the rotary embedding)."""

    def __init__(self, model):
        self.seen: list[torch.Tensor] = []
        self.handle = model.model.rotary_emb.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, output):
        self.seen.append((args[1] if len(args) > 1 else kwargs["position_ids"]).clone())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def check_cache_matches_evictors(cache: EvictingCache) -> None:
    """The stored tensors hold what each row's evictor says: the same count per head, the same slots valid."""
    for row, evictor in enumerate(cache.evictors):
        assert cache.entries[row] == evictor.entries
        for layer_index, layer in enumerate(cache.layers):
            valid = layer.valid[row, :, : evictor.entries]
            assert torch.equal(valid, evictor.valid[layer_index]), f"row {row} layer {layer_index}"
            assert not bool(layer.valid[row, :, evictor.entries :].any())


# ---- budget >= length: bit-identical ---------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_budget_covering_the_request_is_bit_identical(policy, model, prompt, plain_output, calm_calibration,
                                                      monkeypatch):  # fmt: skip
    # ThinKV at full precision: its quantization changes values whatever the budget.
    bits = dict(bits_reasoning=16, bits_execution=16, bits_transition=16) if policy == "thinkv" else {}
    spec = row_spec(policy, PROMPT + NEW_TOKENS, calm_calibration, **bits)
    cache = EvictingCache(CONFIG, [RowRequest(spec, PROMPT, PROMPT + NEW_TOKENS)], rotary=model_rotary(model))
    scored = []
    monkeypatch.setattr(reference_cache, "attention_logits", lambda *a: scored.append(1) or attention_logits(*a))
    output = generate(model, prompt, NEW_TOKENS, cache)
    # A request that cannot outgrow its budget is not scored (ThinKV acts within budget: it is).
    assert bool(scored) == (policy == "thinkv")
    assert torch.equal(output.sequences, plain_output.sequences)
    assert len(output.scores) == len(plain_output.scores) == NEW_TOKENS
    for step, (got, expected) in enumerate(zip(output.scores, plain_output.scores)):
        assert torch.equal(got, expected), f"logits differ at step {step}"
    assert cache.evictors[0].stats.evictions == 0
    assert cache.entries == [PROMPT + NEW_TOKENS - 1]


# ---- a small budget --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("policy", EVICTING)
def test_small_budget_bounds_the_cache_and_positions_stay_logical(policy, model, prompt, calibration):
    new_tokens = 40
    config = dict(SMALL)
    spec = row_spec(policy, config.pop("budget"), calibration, **config)
    cache = EvictingCache(CONFIG, [RowRequest(spec, PROMPT, PROMPT + new_tokens)], rotary=model_rotary(model))
    evictor = cache.evictors[0]
    check_every_decision(evictor)  # each decision inside generate() passes the unit tests' checks
    bound = SMALL["budget"] + SMALL["buffer"]

    def after_forward(module, args, output):
        check_cache_matches_evictors(cache)
        held = max(int(layer.valid[0].sum(-1).max()) for layer in cache.layers)
        if policy != "thinkv":  # ThinKV's own bound is checked per decision
            assert held <= bound and cache.entries[0] <= bound

    hook = model.register_forward_hook(after_forward)
    try:
        with RecordPositions(model) as positions:
            output = generate(model, prompt, new_tokens, cache)
    finally:
        hook.remove()
    assert output.sequences.shape[1] == PROMPT + new_tokens
    assert torch.equal(positions.seen[0], torch.arange(PROMPT).view(1, -1))
    decode_positions = [int(p.flatten()[-1]) for p in positions.seen[1:]]
    assert decode_positions == list(range(PROMPT, PROMPT + new_tokens - 1))  # each token's true index
    assert evictor.stats.evictions > 0
    assert cache.get_seq_length() == evictor.length == PROMPT + new_tokens - 1
    assert cache.entries[0] < evictor.length


class StopAfterFirstEviction(StoppingCriteria):
    def __init__(self):
        self.cache: EvictingCache | None = None

    def __call__(self, input_ids, scores, **kwargs):
        evictor = self.cache.evictors[0]
        evicted = int(evictor.valid.sum(-1).min()) < evictor.length
        return torch.full((input_ids.shape[0],), evicted, dtype=torch.bool)


@pytest.mark.parametrize("policy", EVICTING)
def test_compaction_keeps_each_entry_at_its_logical_position(policy, model, prompt, calibration):
    """Right after the first eviction, every kept slot holds the key and value the full cache holds at the entry's
    logical position (nothing is recomputed or re-rotated): exactly in the first layer, whose keys and values depend
    on the token alone; to rounding in the others, whose inputs went through attention that an observed row runs by
    hand (the score kernel's softmax is its attention, as on SGLang's CPU path)."""
    bits = dict(bits_reasoning=16, bits_execution=16, bits_transition=16) if policy == "thinkv" else {}
    config = dict(SMALL)
    spec = row_spec(policy, config.pop("budget"), calibration, **config, **bits)
    cache = EvictingCache(CONFIG, [RowRequest(spec, PROMPT, PROMPT + 64)], rotary=model_rotary(model))
    stop = StopAfterFirstEviction()
    stop.cache = cache
    output = generate(model, prompt, 64, cache, stopping_criteria=[stop])
    new_tokens = output.sequences.shape[1] - PROMPT
    assert new_tokens < 64, "no eviction happened"
    full = generate(model, prompt, new_tokens)
    assert torch.equal(full.sequences, output.sequences)
    evictor = cache.evictors[0]
    for layer_index, (layer, full_layer) in enumerate(zip(cache.layers, full.past_key_values.layers)):
        assert full_layer.keys.shape[2] == evictor.length
        for head in range(SHAPE.kv_heads):
            slots = evictor.valid[layer_index, head].nonzero().flatten()
            positions = evictor.positions[layer_index, head, slots]
            for kept, full_entries in ((layer.keys, full_layer.keys), (layer.values, full_layer.values)):
                kept, full_entries = kept[0, head, slots], full_entries[0, head, positions]
                if layer_index == 0:
                    assert torch.equal(kept, full_entries)
                else:
                    torch.testing.assert_close(kept, full_entries, rtol=0, atol=1e-6)


class ForceMarker(LogitsProcessor):
    """Feeds each generated token to the cache's end-of-think watch, and forces MARKER at step `at`."""

    def __init__(self, cache: EvictingCache, at: int):
        self.cache, self.at, self.step = cache, at, 0

    def __call__(self, input_ids, scores):
        self.cache.see_tokens(input_ids[:, -1])
        if self.at <= self.step < self.at + len(MARKER):
            forced = torch.full_like(scores, float("-inf"))
            forced[:, MARKER[self.step - self.at]] = 0.0
            scores = forced
        self.step += 1
        return scores


@pytest.mark.parametrize("policy", EVICTING)
def test_answer_after_the_end_of_think_marker_is_kept(policy, model, prompt, calibration):
    new_tokens, marker_step = 40, 10
    config = dict(SMALL)
    spec = row_spec(policy, config.pop("budget"), calibration, **config)
    rows = [RowRequest(spec, PROMPT, PROMPT + new_tokens, end_of_think_ids=MARKER)]
    cache = EvictingCache(CONFIG, rows, rotary=model_rotary(model))
    check_every_decision(cache.evictors[0])
    output = generate(model, prompt, new_tokens, cache, logits_processor=LogitsProcessorList([ForceMarker(cache, 10)]))
    assert output.sequences[0, PROMPT + marker_step : PROMPT + marker_step + 2].tolist() == list(MARKER)
    evictor = cache.evictors[0]
    assert evictor.think_end == PROMPT + marker_step
    assert evictor.stats.evictions > 0
    for layer in range(SHAPE.layers):
        for head in range(SHAPE.kv_heads):
            kept = evictor.positions[layer, head][evictor.valid[layer, head]].tolist()
            assert set(range(evictor.think_end, evictor.length)) <= set(kept)


# ---- batches ---------------------------------------------------------------------------------------------------------
def seeded_prompts(lengths) -> list[torch.Tensor]:
    """One random prompt per length, seeded by its length."""
    return [torch.randint(1, 250, (length,), generator=torch.Generator().manual_seed(length)) for length in lengths]


def small_budget_rows(policies, prompts, new_tokens: int, calibration) -> list[RowRequest]:
    """A row per policy and prompt at the `SMALL` budget and settings, going on for `new_tokens`."""
    settings = dict(SMALL)
    budget = settings.pop("budget")
    return [RowRequest(row_spec(policy, budget, calibration, **settings), len(p), len(p) + new_tokens)
            for policy, p in zip(policies, prompts)]  # fmt: skip


def decode_rows(model, prompts: list[torch.Tensor], rows: list[RowRequest], new_tokens: int):
    """Greedy decoding of right-padded rows of different lengths: each row's first token is read at its own last
    prompt token, and every forward rotates each row at its own positions."""
    cache = EvictingCache(CONFIG, rows, rotary=model_rotary(model))
    lengths = torch.tensor([len(p) for p in prompts])
    input_ids = torch.zeros((len(prompts), int(lengths.max())), dtype=torch.int64)
    for row, tokens in enumerate(prompts):
        input_ids[row, : len(tokens)] = tokens
    tokens, logits = [], []
    with torch.no_grad(), evicting_attention(model):
        out = model(input_ids=input_ids, position_ids=cache.prefill_position_ids(), past_key_values=cache)
        last = out.logits[torch.arange(len(prompts)), lengths - 1]
        for step in range(new_tokens):
            logits.append(last)
            tokens.append(last.argmax(-1))
            if step + 1 < new_tokens:
                positions = torch.tensor([[evictor.length] for evictor in cache.evictors])
                out = model(input_ids=tokens[-1].unsqueeze(-1), position_ids=positions, past_key_values=cache)
                last = out.logits[:, -1]
    return torch.stack(tokens, 1), torch.stack(logits, 1), cache


# The second batch puts rows that need no scores between scored ones: the cache scores the span of rows between.
@pytest.mark.parametrize("policies, lengths", [(("crystal", "rkv"), (12, 7)),
                                               (("streamingllm", "crystal", "random", "h2o"), (12, 7, 9, 5))])  # fmt: skip
def test_batch_rows_of_different_lengths_decode_as_alone(model, calibration, policies, lengths):
    prompts = seeded_prompts(lengths)
    new_tokens = 20
    rows = [RowRequest(row_spec(policy, len(p) + new_tokens, calibration), len(p), len(p) + new_tokens)
            for policy, p in zip(policies, prompts)]  # fmt: skip
    tokens, logits, cache = decode_rows(model, prompts, rows, new_tokens)
    for row, prompt_tokens in enumerate(prompts):
        alone = generate(model, prompt_tokens.unsqueeze(0), new_tokens)
        assert tokens[row].tolist() == alone.sequences[0, len(prompt_tokens) :].tolist()
        torch.testing.assert_close(logits[row], torch.cat(alone.scores), rtol=1e-5, atol=1e-5)
        assert cache.evictors[row].length == len(prompt_tokens) + new_tokens - 1
    check_cache_matches_evictors(cache)


def test_batch_mixing_policies_and_budgets_evicts_per_row(model, calibration):
    prompts = seeded_prompts((12, 7))
    new_tokens = 36
    settings = dict(SMALL)
    settings.pop("budget")
    rows = [
        RowRequest(row_spec("crystal", 14, calibration, **settings), 12, 12 + new_tokens),
        RowRequest(row_spec("thinkv", 20, calibration, **settings), 7, 7 + new_tokens),
    ]
    with RecordPositions(model) as positions:
        _, _, cache = decode_rows(model, prompts, rows, new_tokens)
    for step, seen in enumerate(positions.seen[1:]):
        assert seen.flatten().tolist() == [12 + step, 7 + step]
    check_cache_matches_evictors(cache)
    crystal, thinkv = cache.evictors
    assert crystal.layout == "per_head" and thinkv.layout == "shared"
    assert crystal.stats.evictions > 0 and thinkv.stats.evictions > 0
    assert int(crystal.valid.sum(-1).max()) <= int(crystal.effective_budgets().max()) + settings["buffer"]
    assert cache.entries[0] < crystal.length and cache.entries[1] < thinkv.length


def test_generate_refuses_rows_rotated_at_wrong_positions(model, calibration):
    """transformers' generate() restarts a right-padded short row's positions: the cache refuses to go on."""
    input_ids = torch.randint(1, 250, (2, 12), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    rows = [RowRequest(row_spec("h2o", 64, calibration), 12, 20), RowRequest(row_spec("h2o", 64, calibration), 7, 15)]
    cache = EvictingCache(CONFIG, rows, rotary=model_rotary(model))
    with pytest.raises(ValueError, match="row 1: token 7 is rotated at position 1: rotate every row at its own"):
        generate(model, input_ids, 4, cache, attention_mask=attention_mask)


def test_a_model_with_windowed_attention_is_refused(tmp_path, calibration):
    """A Gemma 3 layer attends through a sliding window; attending every held entry would ignore it, so the cache
    refuses at the first layer that passes one, whatever the policy and budget."""
    from transformers import Gemma3ForCausalLM

    gemma = Gemma3ForCausalLM.from_pretrained(build_tiny_gemma3(tmp_path / "tiny-gemma3")).eval()
    rows = [RowRequest(row_spec("none", 64, calibration), PROMPT, PROMPT + 4)]
    cache = EvictingCache(gemma.config, rows, rotary=model_rotary(gemma))
    with pytest.raises(ConfigError, match="layer 0 of this model attends with a sliding window, which the reference"):
        generate(gemma, torch.randint(1, 250, (1, PROMPT)), 4, cache)


def test_evicting_rows_batched_keep_what_they_keep_alone(model, calibration):
    """Scored rows around rows that need no scores: every row evicts exactly as it does decoded alone."""
    policies, lengths, new_tokens = ("streamingllm", "crystal", "random", "h2o"), (12, 7, 9, 5), 36
    prompts = seeded_prompts(lengths)
    rows = small_budget_rows(policies, prompts, new_tokens, calibration)
    tokens, _, cache = decode_rows(model, prompts, rows, new_tokens)
    for row, prompt_tokens in enumerate(prompts):
        alone_tokens, _, alone = decode_rows(model, [prompts[row]], [rows[row]], new_tokens)
        assert tokens[row].tolist() == alone_tokens[0].tolist()
        evictor, alone_evictor = cache.evictors[row], alone.evictors[0]
        assert evictor.stats.evictions == alone_evictor.stats.evictions > 0
        assert torch.equal(evictor.positions[evictor.valid], alone_evictor.positions[alone_evictor.valid])


def test_the_scores_of_rows_attended_by_hand_are_the_reference_kernels(model, calibration, monkeypatch):
    """An observed row that can evict is attended by hand, and the softmax it attends with becomes its scores: they
    are what the score kernel computes over the row's keys (a row that reads no scores between: zeros)."""
    policies, lengths, new_tokens = ("crystal", "streamingllm", "h2o"), (12, 7, 9), 36
    prompts = seeded_prompts(lengths)
    rows = small_budget_rows(policies, prompts, new_tokens, calibration)
    compared = []
    step_scores = EvictingCache._step_scores

    def checked_step_scores(cache):
        queries = torch.stack(cache._queries)  # [L, B, Hq, d], before the step consumes them
        entries = [n + 1 for n in cache.entries]  # this step's entry is stored already
        scores = step_scores(cache)
        for row in (0, 2):
            expected, _ = score_dense(
                queries[:, row].unsqueeze(1), cache.keys[:, row, :, : entries[row]],
                torch.full((SHAPE.layers,), entries[row]), valid=cache.valid[:, row, :, : entries[row]],
            )  # fmt: skip
            torch.testing.assert_close(scores.attention[:, row, :, : entries[row]], expected)
        assert not bool(scores.attention[:, 1].any())
        compared.append(entries)
        return scores

    monkeypatch.setattr(EvictingCache, "_step_scores", checked_step_scores)
    _, _, cache = decode_rows(model, prompts, rows, new_tokens)
    assert len(compared) == new_tokens - 1
    assert cache.evictors[0].stats.evictions > 0 and cache.evictors[2].stats.evictions > 0
