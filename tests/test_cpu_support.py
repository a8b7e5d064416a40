"""The CPU start-up hook and the plain-torch `sgl_kernel` fallbacks, checked against straightforward references."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crystal_sglang.patches import cpu_support, sgl_kernel_cpu


def assign_reference(req_pool_indices, req_to_token, start, end, out_cache_loc):
    position = 0
    for row, first, last in zip(req_pool_indices.tolist(), start.tolist(), end.tolist()):
        for column in range(first, last):
            req_to_token[row, column] = out_cache_loc[position]
            position += 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12)), min_size=1, max_size=6), st.randoms())
def test_assign_req_to_token_pool_matches_reference(requests, rng):
    rows = rng.sample(range(8), len(requests))
    start = torch.tensor([first for first, _ in requests])
    end = start + torch.tensor([count for _, count in requests])
    slots = torch.randperm(1000)[: int((end - start).sum())].to(torch.int64)
    expected = torch.zeros(8, 64, dtype=torch.int32)
    actual = expected.clone()
    assign_reference(torch.tensor(rows), expected, start, end, slots)
    sgl_kernel_cpu.assign_req_to_token_pool_cpu(torch.tensor(rows), actual, start, end, slots, 64)
    assert torch.equal(actual, expected)


def test_assign_refuses_positions_beyond_the_row():
    table = torch.zeros(2, 8, dtype=torch.int32)
    with pytest.raises(IndexError, match="beyond the pool's row length"):
        sgl_kernel_cpu.assign_req_to_token_pool_cpu(
            torch.tensor([0]), table, torch.tensor([6]), torch.tensor([10]), torch.arange(4), 8
        )


def test_copy_all_layer_kv_cache_moves_rows_in_every_buffer():
    buffers = [torch.randn(16, 2, 8), torch.randn(16, 4, dtype=torch.float64)]
    expected = [buffer.clone() for buffer in buffers]
    src, tgt = torch.tensor([3, 9, 15]), torch.tensor([0, 1, 2])
    for buffer in expected:
        buffer[tgt] = buffer[src]
    pointers = torch.tensor([buffer.data_ptr() for buffer in buffers])
    strides = torch.tensor([buffer[0].nbytes for buffer in buffers])
    sgl_kernel_cpu.copy_all_layer_kv_cache_cpu(pointers, strides, tgt, src)
    for buffer, want in zip(buffers, expected):
        assert torch.equal(buffer, want)


def test_speculative_ops_import_but_refuse_to_run():
    op = sgl_kernel_cpu.verify_tree_greedy_cpu
    with pytest.raises(NotImplementedError, match="speculative decoding on CPU"):
        op()
    with pytest.raises(AttributeError):
        sgl_kernel_cpu.no_such_op


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU hook is for CPU-only installs")
def test_fresh_interpreter_imports_sglang_cpu_engine_and_torchvision():
    """What every spawned SGLang process relies on: the hook runs at interpreter start."""
    code = (
        "import sys; from crystal_sglang.patches.cpu_support import CpuImportFinder;"
        "print(any(isinstance(finder, CpuImportFinder) for finder in sys.meta_path));"
        "import os, sgl_kernel, torchvision.transforms;"
        "from sglang.srt.managers import scheduler;"
        "print(os.environ['SGLANG_USE_CPU_ENGINE'], getattr(sgl_kernel, '__crystal_fallback__', False))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.split()[:1] == ["True"], "the package's wheel must carry the hook: reinstall it (`make install`)"
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[1:] == ["1", "True"]
