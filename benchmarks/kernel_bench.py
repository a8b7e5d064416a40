"""Times the Triton score kernel against its torch reference on CUDA, batch 8, context lengths 1K to 8K.

Prints a table (median milliseconds of several synchronised runs, reference / kernel ratio) and writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from crystal_sglang.kernels.score_reference import score_reference

CONTEXT_LENGTHS = (1024, 2048, 4096, 8192)


def make_inputs(batch, context, window, q_heads, kv_heads, head_dim, dtype, mode, sparsity_threshold) -> dict:
    """SGLang-shaped inputs: every request `context` entries long, its slots scattered over the key buffer."""
    slots = torch.randperm(batch * context, device="cuda").to(torch.int32)
    return dict(
        queries=torch.randn(batch, window, q_heads, head_dim, device="cuda", dtype=dtype),
        k_buffer=torch.randn(batch * context, kv_heads, head_dim, device="cuda", dtype=dtype),
        req_to_token=slots.view(batch, context),
        req_pool_indices=torch.arange(batch, device="cuda"),
        seq_lens=torch.full((batch,), context, device="cuda"),
        mode=mode,
        sparsity_threshold=sparsity_threshold,
    )


def median_ms(function, inputs: dict, repeats: int) -> float:
    function(**inputs)  # compiles the kernel, warms the allocator
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        function(**inputs)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("results/kernel_bench.json"))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--window", type=int, default=8, help="observation queries per request")
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--sparsity-threshold", type=float, default=0.01, help="negative: no sparsity output")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_bench needs a CUDA GPU: the Triton kernel is compiled for one (none is visible here).")
    from crystal_sglang.kernels.score_triton import score_triton

    threshold = args.sparsity_threshold if args.sparsity_threshold >= 0 else None
    shape = dict(batch=args.batch, window=args.window, q_heads=args.q_heads, kv_heads=args.kv_heads,
                 head_dim=args.head_dim, dtype=args.dtype, sparsity_threshold=threshold)
    rows = []
    print(f"{'mode':>9} {'context':>7} {'triton ms':>9} {'torch ms':>9} {'ratio':>6}")
    for mode in ("mean", "max_logit"):
        for context in CONTEXT_LENGTHS:
            inputs = make_inputs(context=context, mode=mode, **{**shape, "dtype": getattr(torch, args.dtype)})
            triton_ms = median_ms(score_triton, inputs, args.repeats)
            torch_ms = median_ms(score_reference, inputs, args.repeats)
            rows.append(dict(mode=mode, context=context, triton_ms=triton_ms, torch_ms=torch_ms,
                             ratio=torch_ms / triton_ms))
            print(f"{mode:>9} {context:>7} {triton_ms:9.3f} {torch_ms:9.3f} {torch_ms / triton_ms:6.1f}")
            del inputs

    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = dict(device=torch.cuda.get_device_name(), repeats=args.repeats, **shape, rows=rows)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
