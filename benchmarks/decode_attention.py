"""CPU decode attention of one layer, batch 8, contexts 1K-4K: SGLang's `torch_native` loop against
`kernels.fused_decode` with every row scored (attended by hand, the softmax shared by attention and scores) and
with none scored (the backend's ops, gathered with `index_select`). Alternated repeats, medians and ratios to
SGLang's loop, printed and written as JSON.

The serving benchmark's in-step overhead counts only the scores' own work inside a row attended by hand; this
shows what attending by hand costs against the attention it replaces.

    python -m benchmarks.decode_attention [--contexts 1024,2048,4096] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from crystal_sglang.kernels.fused_decode import attend_and_score

BATCH, Q_HEADS, KV_HEADS, HEAD_DIM = 8, 9, 3, 64  # the default model's attention (SmolLM2-135M)


def layer_inputs(context: int, generator: torch.Generator) -> dict:
    """One decode layer's inputs: 8 requests of `context` entries whose slots are scattered over the pool."""
    slots = BATCH * context + 1
    return dict(
        query=torch.randn(BATCH, Q_HEADS, HEAD_DIM, generator=generator),
        k_cache=torch.randn(slots, KV_HEADS, HEAD_DIM, generator=generator),
        v_cache=torch.randn(slots, KV_HEADS, HEAD_DIM, generator=generator),
        req_to_token=(torch.randperm(slots - 1, generator=generator) + 1).view(BATCH, context).to(torch.int32),
        req_pool_indices=torch.arange(BATCH),
        seq_lens=torch.full((BATCH,), context),
    )


def variants(inputs: dict) -> dict:
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    table = (inputs["req_to_token"], inputs["req_pool_indices"], inputs["seq_lens"])
    caches = (inputs["k_cache"], inputs["v_cache"])
    query, output, scale = inputs["query"], torch.empty_like(inputs["query"]), HEAD_DIM**-0.5
    return {
        "sglang": lambda: TorchNativeAttnBackend._run_sdpa_forward_decode(
            None, query, output, *caches, *table, scaling=scale, enable_gqa=True),
        "unscored": lambda: attend_and_score(query, output, *caches, *table, scale, True, None, [False] * BATCH),
        "scored by hand": lambda: attend_and_score(query, output, *caches, *table, scale, True, None, None),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="1024,2048,4096")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="results/kernels")
    args = parser.parse_args(argv)
    report = {"batch": BATCH, "q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
              "threads": torch.get_num_threads(), "contexts": {}}  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    for context in tqdm([int(c) for c in args.contexts.split(",")], desc="contexts", unit="context"):
        runs = variants(layer_inputs(context, generator))
        times: dict[str, list[float]] = {name: [] for name in runs}
        for name, run in runs.items():
            run()  # warm-up
        for _ in range(args.repeats):  # alternated, so that drift in the machine's speed hits every variant
            for name, run in runs.items():
                started = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
        report["contexts"][str(context)] = {name: {"ms": medians[name], "ratio": medians[name] / medians["sglang"]}
                                            for name in runs}  # fmt: skip
        print(f"context {context}: " + ", ".join(f"{name} {ms:.2f} ms ({ms / medians['sglang']:.2f}x)"
                                                 for name, ms in medians.items()), flush=True)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode-attention-cpu.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
