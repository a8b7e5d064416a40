"""The torch_native decode attention with scores computed inside it: SGLang's own output, the reference's scores."""

from __future__ import annotations

import pytest
import torch

from crystal_sglang.kernels.fused_decode import attend_and_score
from crystal_sglang.kernels.score_reference import PER_REQUEST_FROM, score_reference
from tests.test_score_kernel import make_inputs

CASES = {  # ragged lengths (on both sides of the reference's per-request switch), heads, head_dim
    "gqa3-d64": dict(lens=[37, 1, 129], q_heads=9, kv_heads=3, head_dim=64),
    "mha-d96": dict(lens=[70, 9], q_heads=2, kv_heads=2, head_dim=96),
    "gqa4-long": dict(lens=[400, 2, 131], q_heads=8, kv_heads=2, head_dim=64),
}


def stock_decode(query, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, scaling, enable_gqa):
    """SGLang's `TorchNativeAttnBackend._run_sdpa_forward_decode` (it reads nothing of its instance here)."""
    backend = pytest.importorskip("sglang.srt.layers.attention.torch_native_backend")
    output = torch.empty_like(query)
    backend.TorchNativeAttnBackend._run_sdpa_forward_decode(
        None, query, output, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
        scaling=scaling, enable_gqa=enable_gqa,
    )  # fmt: skip
    return output


ROWS = {"all": None, "none": [False, False, False], "first": [True, False, False], "last two": [False, True, True]}


@pytest.mark.parametrize("rows", sorted(ROWS))
@pytest.mark.parametrize("sparsity", [None, 0.01], ids=["scores", "scores+sparsity"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_decode_is_the_backends_attention_and_the_references_scores(name, sparsity, rows):
    """Unscored rows and short batches: SGLang's attention bit for bit. Scored rows of a long batch, attended by
    hand: the same attention up to rounding. Every scored row: the reference's scores."""
    case = dict(CASES[name], window=1, mode="mean", threshold=sparsity)
    inputs = make_inputs(case, seed=3)
    keys = inputs["k_buffer"]
    values = torch.randn(keys.shape, generator=torch.Generator().manual_seed(4))
    query = inputs["queries"][:, 0].contiguous()  # [B, Hq, d]
    scaling = case["head_dim"] ** -0.5
    gqa = case["q_heads"] != case["kv_heads"]
    table = (inputs["req_to_token"], inputs["req_pool_indices"], inputs["seq_lens"])
    batch = query.shape[0]
    scored = None if ROWS[rows] is None else ROWS[rows][:batch]

    output = torch.full_like(query, float("nan"))
    scores, fused_sparsity, seconds = attend_and_score(query, output, keys, values, *table, scaling, gqa, sparsity,
                                                       scored)  # fmt: skip

    expected = stock_decode(query, keys, values, *table, scaling, gqa)
    expected_scores, expected_sparsity = score_reference(**inputs)
    by_hand = max(case["lens"]) >= PER_REQUEST_FROM
    for row in range(batch):
        row_scored = scored is None or scored[row]
        if row_scored and by_hand:
            torch.testing.assert_close(output[row], expected[row], atol=1e-5, rtol=1e-5)
        else:
            assert torch.equal(output[row], expected[row])
        if row_scored:
            torch.testing.assert_close(scores[row], expected_scores[row], atol=1e-6, rtol=1e-5)
            if sparsity is not None:
                assert torch.equal(fused_sparsity[row], expected_sparsity[row])
        elif by_hand:
            assert not scores[row].any()
    if sparsity is None:
        assert fused_sparsity is None
    assert seconds >= 0
