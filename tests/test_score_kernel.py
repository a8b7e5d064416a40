"""Parity of the Triton score kernel with its torch reference: interpreted on CPU, compiled on CUDA.

Triton picks its interpreter from TRITON_INTERPRET when a kernel is defined, and this process may have imported
triton without it, so the CPU cases run in one child process (this file run as a script) started with
TRITON_INTERPRET=1; it reports each case's outcome and each case passes or fails here on its own.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import traceback
import types

import pytest
import torch

from crystal_sglang.kernels.score_reference import score_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
requires_cuda = pytest.mark.skipif(
    not (HAS_TRITON and torch.cuda.is_available()) or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA and compiled (not interpreted) Triton",
)


def _case(lens, window, q_heads, kv_heads, head_dim, **options) -> dict:
    return dict(lens=lens, window=window, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, **options)


# GQA ratios 1/2/3/4/8, W 1..8, head_dim 64/96/128; lengths of 1, at and across the 64-entry block, not multiples.
SHAPES = {
    "gqa1-w1-d64": _case([1, 64, 65], 1, 2, 2, 64),
    "gqa2-w2-d64": _case([37, 128, 5], 2, 4, 2, 64),
    "gqa3-w3-d96": _case([100, 1], 3, 6, 2, 96),
    "gqa4-w4-d128": _case([130, 63], 4, 8, 2, 128),
    "gqa8-w8-d64": _case([70, 9], 8, 8, 1, 64),
}
CPU_CASES = {
    f"{shape}-{mode}-{extras}": {**spec, "mode": mode, "threshold": 0.02 if extras == "sparsity+valid" else None,
                                 "valid": extras == "sparsity+valid"}
    for shape, spec in SHAPES.items()
    for mode in ("mean", "max_logit")
    for extras in ("plain", "sparsity+valid")
}
CPU_CASES.update({
    "sparsity-only-max_logit": _case([90, 3, 64], 2, 4, 2, 64, mode="max_logit", threshold=0.05),
    "valid-only-mean": _case([90, 3], 2, 6, 2, 64, mode="mean", valid=True),
    "bfloat16-mean": _case([80, 17], 2, 8, 2, 128, dtype="bfloat16", mode="mean", threshold=0.02),
    "float16-max_logit": _case([80, 17], 2, 8, 2, 64, dtype="float16", mode="max_logit", threshold=0.02),
    "float32-queries-bfloat16-keys": _case([80, 17], 2, 4, 2, 64, dtype="bfloat16", query_dtype="float32"),
    # SGLang's float8 KV pool (`--kv-cache-dtype fp8_e4m3`) hands the kernel its keys as float8.
    "float8-keys-bfloat16-queries": _case([80, 17], 2, 8, 2, 64, dtype="float8_e4m3fn", query_dtype="bfloat16",
                                          mode="max_logit", threshold=0.02),
    "custom-scale-int32-lengths": _case([50, 129], 2, 4, 1, 64, scale=0.3, lens_dtype="int32", threshold=0.1),
    "strided-views": _case([75, 40], 3, 6, 3, 64, strided=True, mode="max_logit", threshold=0.02, valid=True),
    "empty-requests": _case([0, 0], 2, 4, 2, 64),  # no sparsity: the reference's amax fails over zero entries
    "some-empty-requests": _case([0, 66], 2, 4, 2, 64, threshold=0.02, valid=True),
    "long-rows-mean": _case([400, 0, 131], 2, 6, 2, 64, threshold=0.02, valid=True),  # per-request reference
    "long-rows-max_logit": _case([7, 390], 1, 4, 1, 64, mode="max_logit", threshold=0.02),
})


def make_inputs(case: dict, device: str = "cpu", seed: int = 0) -> dict:
    """score_reference's keyword arguments for a case: keys scattered over a shuffled slot pool, requests in shuffled
    rows of a wider slot table, one KV head of the first request masked out entirely when `valid` is asked for."""
    generator = torch.Generator().manual_seed(seed)
    lens = torch.tensor(case["lens"], dtype=getattr(torch, case.get("lens_dtype", "int64")))
    batch, window, head_dim = len(lens), case["window"], case["head_dim"]
    q_heads, kv_heads = case["q_heads"], case["kv_heads"]
    n_max = int(lens.max())
    key_dtype = getattr(torch, case.get("dtype", "float32"))
    query_dtype = getattr(torch, case.get("query_dtype", case.get("dtype", "float32")))
    strided = case.get("strided", False)
    slot_count = int(lens.sum()) + 16
    # Strided views: keys padded past head_dim, queries stored head-major.
    key_width = head_dim + 8 if strided else head_dim
    keys = torch.randn(slot_count, kv_heads, key_width, generator=generator).to(device, key_dtype)
    query_layout = (batch, q_heads, window, head_dim) if strided else (batch, window, q_heads, head_dim)
    # Doubled: peakier softmax rows, so that the sparsity threshold splits them.
    queries = (2.0 * torch.randn(query_layout, generator=generator)).to(device, query_dtype)

    pool_rows = torch.randperm(batch + 2, generator=generator)[:batch]
    slots = torch.randperm(slot_count, generator=generator).to(torch.int32)
    req_to_token = torch.zeros(batch + 2, n_max + 5, dtype=torch.int32)
    taken = 0
    for request, length in enumerate(lens.tolist()):
        req_to_token[pool_rows[request], :length] = slots[taken : taken + length]
        taken += length

    inputs = dict(
        queries=queries.transpose(1, 2) if strided else queries,
        k_buffer=keys[..., :head_dim],
        req_to_token=req_to_token.to(device),
        req_pool_indices=pool_rows.to(device),
        seq_lens=lens.to(device),
        mode=case.get("mode", "mean"),
        sparsity_threshold=case.get("threshold"),
        scale=case.get("scale"),
        valid=None,
    )
    if case.get("valid"):
        valid = torch.rand(batch, kv_heads, n_max + 3, generator=generator) < 0.7
        valid[0, -1] = False
        inputs["valid"] = valid.to(device)
    return inputs


def present_entries(inputs: dict) -> torch.Tensor:
    """[B, 1, Hq]: how many entries each query head's softmax runs over (the sparsity's denominator)."""
    seq_lens, kv_heads = inputs["seq_lens"], inputs["k_buffer"].shape[1]
    n_max = int(seq_lens.max())
    present = (torch.arange(n_max, device=seq_lens.device) < seq_lens[:, None])[:, None, :].expand(-1, kv_heads, -1)
    if inputs["valid"] is not None:
        present = present & inputs["valid"][..., :n_max]
    group = inputs["queries"].shape[2] // kv_heads
    return present.sum(-1).clamp_min(1).repeat_interleave(group, dim=1)[:, None, :]


def assert_parity(actual, expected, inputs: dict, score_atol: float, score_rtol: float, flips_per_row: int) -> None:
    """Scores within tolerance; sparsity counts equal up to `flips_per_row` entries on the other side of the
    threshold per query row (float32 sums in another order can move a probability lying at the threshold)."""
    (scores, sparsity), (expected_scores, expected_sparsity) = actual, expected
    torch.testing.assert_close(scores, expected_scores, atol=score_atol, rtol=score_rtol)
    if expected_sparsity is None:
        assert sparsity is None
        return
    assert sparsity.shape == expected_sparsity.shape and sparsity.dtype == torch.float32
    flipped = ((sparsity - expected_sparsity).abs() * present_entries(inputs)).round()
    assert flipped.max() <= flips_per_row, f"{int(flipped.sum())} entries counted differently, up to {flipped.max()}"


def check_case_interpreted(case: dict) -> None:
    from crystal_sglang.kernels.score_triton import score_triton

    inputs = make_inputs(case)
    assert_parity(score_triton(**inputs), score_reference(**inputs), inputs, 1e-6, 1e-5, flips_per_row=0)


def _run_interpreted_cases() -> None:
    """Child process: run every CPU case under the interpreter, print {case: failure message or null} as JSON."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    outcomes = {}
    for name, case in CPU_CASES.items():
        try:
            check_case_interpreted(case)
            outcomes[name] = None
        except Exception:  # reported per case to the parent test
            outcomes[name] = traceback.format_exc()
    print(json.dumps(outcomes))


@pytest.fixture(scope="module")
def interpreted_outcomes() -> dict:
    child = subprocess.run(
        [sys.executable, __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout.strip().splitlines()[-1])


@requires_triton
@pytest.mark.parametrize("case_name", list(CPU_CASES))
def test_interpreted_kernel_matches_reference(interpreted_outcomes, case_name):
    failure = interpreted_outcomes[case_name]
    if failure:
        pytest.fail(failure, pytrace=False)


@pytest.mark.parametrize(
    "case_name", ["long-rows-mean", "long-rows-max_logit", "gqa3-w3-d96-max_logit-sparsity+valid"]
)
def test_reference_per_request_equals_padded_batch(monkeypatch, case_name):
    """The reference scores long rows one request at a time and short ones as one padded batch: same results."""
    reference = importlib.import_module("crystal_sglang.kernels.score_reference")
    inputs = make_inputs(CPU_CASES[case_name])
    monkeypatch.setattr(reference, "PER_REQUEST_FROM", 0)
    per_request = reference.score_reference(**inputs)
    monkeypatch.setattr(reference, "PER_REQUEST_FROM", 1 << 30)
    padded = reference.score_reference(**inputs)
    torch.testing.assert_close(per_request[0], padded[0], rtol=1e-5, atol=1e-7)
    if padded[1] is not None:
        torch.testing.assert_close(per_request[1], padded[1])


def test_extract_scores_dispatch(monkeypatch):
    """CPU tensors go to the reference unless TRITON_INTERPRET=1; then (or on CUDA) to the kernel."""
    scores_module = importlib.import_module("crystal_sglang.kernels.scores")
    kernel_calls = []
    stand_in = types.ModuleType("crystal_sglang.kernels.score_triton")
    stand_in.score_triton = lambda *args: kernel_calls.append(args) or "kernel"
    monkeypatch.setitem(sys.modules, stand_in.__name__, stand_in)
    monkeypatch.setattr(scores_module, "triton_available", lambda: True)
    inputs = make_inputs(CPU_CASES["gqa2-w2-d64-mean-sparsity+valid"])

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    scores, sparsity = scores_module.extract_scores(**inputs)
    expected_scores, expected_sparsity = score_reference(**inputs)
    assert torch.equal(scores, expected_scores) and torch.equal(sparsity, expected_sparsity)
    assert not kernel_calls

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert scores_module.extract_scores(**inputs) == "kernel"
    assert len(kernel_calls) == 1

    monkeypatch.setattr(scores_module, "triton_available", lambda: False)
    assert torch.equal(scores_module.extract_scores(**inputs)[0], expected_scores)


@requires_triton
def test_kernel_rejects_unknown_mode():
    from crystal_sglang.kernels.score_triton import score_triton

    with pytest.raises(ValueError, match="mode"):
        score_triton(**{**make_inputs(SHAPES["gqa2-w2-d64"]), "mode": "sum"})


LARGE_LENS = [8192, 1, 4097, 1000, 64, 7777, 2048, 513]
LARGE_CASES = {
    f"{mode}-{extras}": _case(LARGE_LENS, 8, 32, 8, 128, dtype="bfloat16", mode=mode,
                              threshold=0.01 if "sparsity" in extras else None, valid="valid" in extras)
    for mode in ("mean", "max_logit")
    for extras in ("plain", "sparsity", "sparsity+valid")
}
LARGE_CASES["float32-mean-sparsity"] = _case(LARGE_LENS, 4, 32, 8, 128, mode="mean", threshold=0.01)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("case_name", list(CPU_CASES) + list(LARGE_CASES))
def test_compiled_kernel_matches_reference(case_name):
    from crystal_sglang.kernels.score_triton import score_triton

    case = {**CPU_CASES, **LARGE_CASES}[case_name]
    if case.get("dtype", "").startswith("float8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("Triton converts float8 e4m3 on compute capability 8.9 and later")
    inputs = make_inputs(case, device="cuda")
    # 16-bit inputs meet in tensor-core dots, summed in float32 in another order than torch's einsum.
    float32 = inputs["queries"].dtype == inputs["k_buffer"].dtype == torch.float32
    score_atol, score_rtol = (1e-6, 1e-5) if float32 else (1e-5, 1e-4)
    assert_parity(score_triton(**inputs), score_reference(**inputs), inputs, score_atol, score_rtol, flips_per_row=1)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("mode", ["mean", "max_logit"])
def test_compiled_kernel_timing(mode, capsys):
    """Prints kernel and reference times (no timed assertion: shared GPUs make timings noisy)."""
    from benchmarks.kernel_bench import median_ms  # not at the top: the interpreted cases run this file as a script
    from crystal_sglang.kernels.score_triton import score_triton

    inputs = make_inputs({**LARGE_CASES[f"{mode}-sparsity"], "lens": [8192] * 8}, device="cuda")
    kernel_ms, reference_ms = median_ms(score_triton, inputs, 10), median_ms(score_reference, inputs, 10)
    with capsys.disabled():
        print(f"\n{mode} B=8 n=8192 Hq=32 Hkv=8 d=128 W=8 bf16: "
              f"triton {kernel_ms:.3f} ms, reference {reference_ms:.3f} ms, x{reference_ms / kernel_ms:.1f}")


if __name__ == "__main__":
    _run_interpreted_cases()
