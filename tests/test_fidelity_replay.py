"""The fidelity benchmark's replays on a tiny random Llama: the full-cache reference, attention recall, the
free-running decode, and the two ceilings (oracle top-k attention, hindsight eviction).

Recording the full cache's attention leaves its logits bit-identical; the recorded attention is the model's own
(eager attention weights, mean over each KV head's query group); recall is 1 wherever a row holds everything and
falls below 1 once a small budget evicts; free-running rows that cannot outgrow their budget reproduce the full
cache's greedy trace token for token; the oracle attends to exactly the keys it should, and with a covering number
of entries it is the full cache; hindsight ranks by the attention still to come and keeps the entries that get most;
the predictability study scores a signal against that ideal; the one-off studies' harness replays a policy as the
benchmark does.
"""

from __future__ import annotations

import pytest
import torch
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM

from benchmarks.fidelity.free_running import free_run, repeated_ngrams
from benchmarks.fidelity.halving import halving_costs
from benchmarks.fidelity.halving import summarize as summarize_halvings
from benchmarks.fidelity.hindsight import FutureAttention, hindsight_scores
from benchmarks.fidelity.oracle import oracle_scores, top_k_attention
from benchmarks.fidelity.predictability import IDEAL, SIGNALS, mean_over_sequences, policy_signal, study
from benchmarks.fidelity.recall import FullAttention
from benchmarks.fidelity.replay import FULL, Config, replay_policies
from benchmarks.fidelity.scoring import REASONING, summarize
from benchmarks.fidelity.variants import variant_agreement
from benchmarks.fidelity.workload import Sequence, full_cache_reference
from crystal_sglang.policies import make_spec
from crystal_sglang.policies.lrfu import CrystalLite
from crystal_sglang.policies.streaming import StreamingLLM
from tests.tiny_model import RANDOM_LLAMA, random_llama

CONFIG = RANDOM_LLAMA
PROMPT, NEW_TOKENS = 10, 40
SETTINGS = {"sinks": 2, "window": 4, "buffer": 4, "protect_prompt": False}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    model = random_llama()
    assert model.config._attn_implementation == "sdpa"
    return model


@pytest.fixture(scope="module")
def traces(model) -> list[Sequence]:
    """Two full-cache greedy traces of different prompt lengths."""
    sequences = []
    for seed, length in ((1, PROMPT), (2, PROMPT + 3)):
        prompt = torch.randint(1, 250, (1, length), generator=torch.Generator().manual_seed(seed))
        output = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        sequences.append(Sequence(f"trace-{seed}", prompt[0].tolist(), output[0, length:].tolist(),
                                  [REASONING] * NEW_TOKENS))  # fmt: skip
    return sequences


def test_recording_the_attention_leaves_the_reference_logits_bit_identical(model, traces):
    for sequence, reference in zip(traces, full_cache_reference(model, traces)):
        ids = torch.tensor([sequence.prompt_ids + sequence.continuation_ids[:-1]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(sequence.prompt_ids) - 1 :].float()
        assert torch.equal(reference.logits, logits)


def test_the_recorded_attention_is_the_models_own(model, traces):
    sequence = traces[0]
    reference = full_cache_reference(model, [sequence])[0]
    ids = torch.tensor([sequence.prompt_ids + sequence.continuation_ids[:-1]])
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            weights = model(input_ids=ids, output_attentions=True).attentions  # per layer [1, Hq, N, N]
    finally:
        model.config._attn_implementation = "sdpa"
    group = CONFIG.num_attention_heads // CONFIG.num_key_value_heads
    for step in (0, 1, 17, NEW_TOKENS - 1):
        position = PROMPT + step - 1
        expected = torch.stack([w[0, :, position, : position + 1] for w in weights])  # [L, Hq, P + step]
        expected = expected.view(CONFIG.num_hidden_layers, -1, group, position + 1).mean(2)
        torch.testing.assert_close(reference.attention.row(step), expected, rtol=1e-4, atol=1e-6)


def test_recall_is_one_while_everything_is_held_and_drops_once_a_small_budget_evicts(model, traces):
    configs = [Config("none", FULL), Config("streamingllm", "16"), Config("crystal", "16")]
    reference = full_cache_reference(model, traces)
    scores = replay_policies(model, traces, configs, reference, SETTINGS, (), pad_id=0)
    for sequence_scores in scores[Config("none", FULL)]:
        assert sequence_scores.recall == pytest.approx([1.0] * NEW_TOKENS, abs=1e-5)
    for policy in ("streamingllm", "crystal"):
        for sequence, sequence_scores in zip(traces, scores[Config(policy, "16")]):
            recall, held = sequence_scores.recall, sequence_scores.entries
            assert len(recall) == NEW_TOKENS and all(0.0 < r <= 1.0 + 1e-5 for r in recall)
            # The forward that predicts token `step` has seen prompt + `step` tokens; `held` counts after it evicted.
            first_eviction = next(step for step, entries in enumerate(held)
                                  if entries < len(sequence.prompt_ids) + step)  # fmt: skip
            assert first_eviction > 4
            assert recall[: first_eviction + 1] == pytest.approx([1.0] * (first_eviction + 1), abs=1e-5)
            assert min(recall[first_eviction + 1 :]) < 0.99
    summary = summarize(scores[Config("crystal", "16")], [s.labels for s in traces], greedy=True)
    assert 0.0 < summary["all"]["attention_recall"] < 1.0


def test_free_running_reproduces_the_trace_while_the_budget_covers_it(model, traces):
    covering = str(PROMPT + 3 + NEW_TOKENS)  # above every row's length: nothing is evicted
    configs = [Config("none", FULL), Config("crystal", covering), Config("streamingllm", "16")]
    outputs = free_run(model, traces, configs, SETTINGS, (), pad_id=0, eos_ids=set(), new_tokens=NEW_TOKENS)
    for config in configs[:2]:
        assert outputs[config]["identical_to_trace"] == len(traces)
        assert outputs[config]["mean_length"] == NEW_TOKENS and outputs[config]["ended_by_itself"] == 0
    evicting = outputs[Config("streamingllm", "16")]
    assert evicting["mean_length"] == NEW_TOKENS
    expected = [repeated_ngrams(sequence.continuation_ids) for sequence in traces]
    assert outputs[Config("none", FULL)]["repeated_4grams"] == sum(r for r, _ in expected) / sum(n for _, n in expected)


def test_free_running_stops_a_row_at_its_end_of_sequence_token(model, traces):
    stop = traces[0].continuation_ids[5]  # the full cache emits it at step 5 of the first trace
    outputs = free_run(model, traces[:1], [Config("none", FULL)], SETTINGS, (), pad_id=0, eos_ids={stop},
                       new_tokens=NEW_TOKENS)  # fmt: skip
    result = outputs[Config("none", FULL)]
    first = traces[0].continuation_ids.index(stop)
    assert result["ended_by_itself"] == 1 and result["per_sequence"]["lengths"] == [first]


def test_repeated_ngrams_counts_every_repeat_of_an_earlier_4_gram():
    assert repeated_ngrams([1, 2, 3, 4, 1, 2, 3, 4]) == (1, 5)
    assert repeated_ngrams([7] * 10) == (6, 7)
    assert repeated_ngrams([1, 2, 3]) == (0, 0)


def test_oracle_attention_attends_to_each_query_groups_top_keys_only():
    generator = torch.Generator().manual_seed(3)
    query, key, value = (torch.randn(1, heads, 9, 8, generator=generator) for heads in (4, 2, 2))
    entries, group, scaling = 3, 2, 8**-0.5
    output = top_k_attention(query, key, value, scaling, entries)  # [1, N, Hq, d]
    for head in range(4):
        kv = head // group
        for row in range(9):
            probabilities = [torch.softmax(query[0, h, row] @ key[0, kv, : row + 1].T * scaling, -1)
                             for h in range(kv * group, kv * group + group)]  # fmt: skip
            chosen = torch.stack(probabilities).mean(0).argsort(descending=True)[:entries]
            weights = torch.softmax(query[0, head, row] @ key[0, kv, chosen].T * scaling, -1)
            torch.testing.assert_close(output[0, row, head], weights @ value[0, kv, chosen])


def test_oracle_with_every_key_is_the_full_cache_and_with_few_keys_is_not(model, traces):
    reference = full_cache_reference(model, traces)
    covering = oracle_scores(model, traces[0], reference[0], entries=PROMPT + NEW_TOKENS)
    assert all(covering.agree) and max(covering.kl) < 1e-6
    small = oracle_scores(model, traces[0], reference[0], entries=6)
    assert max(small.entries) == 6 and max(small.kl) > 1e-3


def test_hindsight_ranks_by_the_attention_still_to_come(model, traces):
    attention = full_cache_reference(model, traces[:1])[0].attention
    future = FutureAttention(attention)
    position = PROMPT + 20
    expected = torch.zeros_like(future.after(position))
    for step in range(position - PROMPT + 2, NEW_TOKENS):  # the queries at positions after `position`
        row = attention.row(step)
        expected[..., : row.shape[-1]] += row
    torch.testing.assert_close(future.after(position), expected, rtol=1e-4, atol=1e-6)
    assert not future.after(PROMPT + NEW_TOKENS - 2).any()  # nothing comes after the last fed position


def test_hindsight_with_a_covering_budget_is_the_full_cache_and_with_a_small_one_evicts(model, traces):
    reference = full_cache_reference(model, traces)
    scores = hindsight_scores(model, traces, [str(PROMPT + 3 + NEW_TOKENS), "16"], reference, SETTINGS, (), pad_id=0)
    for covering in scores[str(PROMPT + 3 + NEW_TOKENS)]:
        assert all(covering.agree) and max(covering.kl) < 1e-6 and min(covering.recall) > 1 - 1e-5
    for small in scores["16"]:
        assert max(small.entries) <= 16 + SETTINGS["buffer"] and min(small.recall) < 0.99
    # Keeping what later queries attend to keeps more of their attention than any policy that cannot see them.
    policies = replay_policies(model, traces, [Config(p, "16") for p in ("streamingllm", "crystal", "h2o")], reference,
                               SETTINGS, (), pad_id=0)  # fmt: skip
    hindsight_recall = sum(sum(row.recall) for row in scores["16"])
    for policy_scores in policies.values():
        assert hindsight_recall > sum(sum(row.recall) for row in policy_scores)


def test_predictability_scores_foresight_1_and_every_causal_signal_at_most_1():
    # Peaked attention (the tiny random model's is nearly uniform, where every choice captures the same):
    # random rotated queries and keys of 2 layers, 2 KV heads of 2 query heads each, 80 positions after a prompt of 10.
    generator = torch.Generator().manual_seed(0)
    queries, keys = torch.randn(2, 4, 80, 8, generator=generator), torch.randn(2, 2, 80, 8, generator=generator)
    attention = FullAttention(queries, keys, scaling=1.5, prompt_length=PROMPT)

    def foresight(rows, prompt):  # at step t: the attention from the queries after t
        future = rows.flip(1).cumsum(1).flip(1)
        return torch.cat([future[:, 1:], torch.zeros_like(future[:, :1])], dim=1)

    signals = {**SIGNALS, "foresight": foresight, "reversed": lambda rows, prompt: -foresight(rows, prompt)}
    result = mean_over_sequences([study(attention, {"24": 24}, signals)])["24"]
    assert result[IDEAL]["captured"] == pytest.approx(1.0)
    assert result["foresight"]["captured"] == pytest.approx(1.0)
    assert result["reversed"]["captured"] < 0.9  # the signal's highest scores are the ones kept
    for name in SIGNALS:
        assert 0 < result[name]["captured"] <= 1 + 1e-6, name
        assert 0 <= result[name]["prompt_share"] <= 1, name
    assert len({row["points"] for row in result.values()}) == 1  # every signal scored at the same points
    every_query = torch.ones(keys.shape[2], dtype=torch.bool)
    assert study(attention, {"24": 24}, signals, queries=every_query) == study(attention, {"24": 24}, signals)
    early_queries = every_query.clone()
    early_queries[30:] = False  # of the points 24, 40, 56 and 72, only 24 has any of these queries still to come
    early = mean_over_sequences([study(attention, {"24": 24}, signals, queries=early_queries)])["24"]
    assert early[IDEAL]["points"] == result[IDEAL]["points"] // 4


def test_a_policy_signal_is_the_policys_own_priority_fed_the_decode_rows(model, traces):
    rows = full_cache_reference(model, traces[:1])[0].attention.layer_rows(0)
    accumulated = policy_signal("h2o")(rows, PROMPT)
    decode_rows = rows.clone()
    decode_rows[:, :PROMPT] = 0  # the prompt's queries are never observed
    torch.testing.assert_close(accumulated[:, PROMPT:], decode_rows.cumsum(1)[:, PROMPT:], rtol=1e-5, atol=1e-6)


def test_a_halving_drops_entries_at_its_checkpoint_and_costs_agreement_after_it(model, traces):
    reference = full_cache_reference(model, traces[:1])[0]
    progress = tqdm(disable=True)
    (point,) = halving_costs(model, traces[0], reference, "16", [0.5], 10, 0, progress, SETTINGS)
    assert point["checkpoint"] == NEW_TOKENS // 2 and point["tokens"] == 10
    assert 16 <= point["held"] <= 16 + SETTINGS["buffer"]  # the row at its budget, not yet halved
    assert point["dropped_worth"] > 0 and point["crf_per_slot"] >= 1  # every entry counts its creation as a hit
    assert point["kl_gain"] > 0  # 8 entries instead of 16 move the next predictions further from the full cache
    assert point["freed"] == 8 and "second_top1_loss" not in point
    # A checkpoint with no scored token after it within the continuation gives no point.
    assert halving_costs(model, traces[0], reference, "16", [1.0], 10, 0, progress, SETTINGS) == []
    # Halved twice (from 32: a quarter stays above the protected window): the first halving's point is the same; the
    # second frees 8 more slots and moves the predictions further still. (Same up to float rounding: a batch of three
    # rows instead of two may sum in another order on some CPUs, and a key's redundancy rounded differently by 1e-7
    # may fall on the other side of a 1/1024 step, which moves a KL sum by about 1e-4 of itself.)
    (once,) = halving_costs(model, traces[0], reference, "32", [0.5], 10, 0, progress, SETTINGS)
    (twice,) = halving_costs(model, traces[0], reference, "32", [0.5], 10, 0, progress, SETTINGS, twice=True)
    for key, value in once.items():
        assert twice[key] == (pytest.approx(value, rel=1e-3, abs=1e-9) if isinstance(value, float) else value), key
    assert twice["freed"] == 16 and twice["second_freed"] == 8 and twice["second_kl_gain"] > 0


def test_the_halving_summary_finds_a_signal_that_orders_the_costs_and_none_in_noise():
    points = [{"sequence": f"s{i}", "crf_per_slot": float(i), "held": float((7 * i) % 11), "dropped_worth": -float(i),
               "top1_loss": i / 100, "kl_gain": i / 10} for i in range(11)]  # fmt: skip
    summary = summarize_halvings(points)
    assert summary["crf_per_slot"]["top1_loss"]["spearman"] == pytest.approx(1.0)
    assert summary["crf_per_slot"]["top1_loss"]["p"] < 0.01 and summary["crf_per_slot"]["lower_halved_costs_less"] == 1
    assert summary["dropped_worth"]["kl_gain"]["spearman"] == pytest.approx(-1.0)
    assert summary["dropped_worth"]["lower_halved_costs_less"] == 0
    assert summary["held"]["top1_loss"]["p"] > 0.05
    assert "second_halving" not in summary
    for point in points:
        point.update(freed=8, second_freed=4, second_top1_loss=point["top1_loss"] / 2, second_kl_gain=0.0)
    second = summarize_halvings(points)["second_halving"]
    assert second["mean"]["top1_loss"] == pytest.approx(0.025) and second["costs_more_top1_than_the_first"] == 0
    assert second["top1_loss_per_freed_slot"]["second"] == pytest.approx(second["top1_loss_per_freed_slot"]["first"])


def test_the_variant_harness_scores_each_policy_as_the_benchmark_replays_it(model, traces):
    """`variant_agreement` (the one-off studies' harness) replays the variants of a conversation as one batch, as
    the benchmark replays the policies: each variant's top-1 agreement is the benchmark's for that policy."""
    reference = full_cache_reference(model, traces)
    configs = [Config("crystal-lite", "16"), Config("streamingllm", "16")]
    benchmark = replay_policies(model, traces, configs, reference, SETTINGS, (), pad_id=0)
    variants = {"crystal-lite": lambda spec, _reference: CrystalLite(spec),
                "streamingllm": lambda spec, _reference: StreamingLLM(make_spec("streamingllm", spec.budget, SETTINGS))}
    result = variant_agreement(model, traces, reference, variants, "crystal-lite", "16", settings=SETTINGS)
    for config in configs:
        agree = [agrees for row in benchmark[config] for agrees in row.agree]
        assert result[config.policy] == {"all": round(sum(agree) / len(agree), 4)}  # no answer part in these traces
