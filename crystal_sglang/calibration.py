"""ThinKV calibration: sparsity thresholds that split real reasoning segments into three thought types.

ThinKV labels a segment by the attention sparsity of its decode steps. The thresholds depend on the model, so
they are measured: greedy reasoning traces of the model are replayed with eager attention, each generated
token's attention row is scored (share of entries below 1 % of the row's max, averaged over query heads), the
layers whose segment sparsity varies most are kept, and the thresholds are the terciles of the segments' mean
sparsity over those layers (so the three types are equally common on the calibration traces).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from crystal_sglang.policies.base import SPARSITY_THRESHOLD
from crystal_sglang.policies.thinkv import CALIBRATION_RESOURCE

CALIBRATION_SEGMENT = 32
CALIBRATED_LAYERS = 8


def token_sparsity(attentions: tuple[torch.Tensor, ...], start: int) -> torch.Tensor:
    """[layers, T - start]: per query position from `start`, the head-mean share of its causal row below
    `SPARSITY_THRESHOLD` times the row's max."""
    per_layer = []
    for attention in attentions:  # [1, heads, T, T]
        rows = attention[0, :, start:].to(torch.float32)  # [heads, q, T]
        lengths = torch.arange(start, attention.shape[-1]) + 1  # causal row lengths
        low = rows < SPARSITY_THRESHOLD * rows.amax(-1, keepdim=True)
        causal = torch.arange(attention.shape[-1]).view(1, -1) < lengths.view(-1, 1)
        share = (low & causal).sum(-1) / lengths
        per_layer.append(share.mean(0))
    return torch.stack(per_layer)


def calibrate_thinkv(output: str | Path | None = None, prompts: int = 8, max_new_tokens: int = 256,
                     model_path: str | Path | None = None, problems_file: str | Path | None = None) -> Path:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crystal_sglang.models import prepare_default_model
    from crystal_sglang.prompts import chat_messages, load_problems

    model_path = model_path or prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="eager").eval()
    segments = []  # [layers] mean sparsity per segment
    for problem in tqdm(load_problems(problems_file, prompts), desc="calibrating ThinKV", unit="prompt"):
        encoded = tokenizer.apply_chat_template(chat_messages(problem), add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
        ids = encoded["input_ids"]
        with torch.no_grad():
            trace = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
            attentions = model(trace, output_attentions=True).attentions
        sparsity = token_sparsity(attentions, ids.shape[1])
        for begin in range(0, sparsity.shape[1] - CALIBRATION_SEGMENT + 1, CALIBRATION_SEGMENT):
            segments.append(sparsity[:, begin : begin + CALIBRATION_SEGMENT].mean(-1))
    if len(segments) < 3:
        raise RuntimeError("too few segments to calibrate: raise --prompts or --max-new-tokens")
    table = torch.stack(segments)  # [segments, layers]
    layers = torch.argsort(table.std(0), descending=True)[:CALIBRATED_LAYERS].sort().values
    mean = table[:, layers].mean(-1)
    thresholds = torch.quantile(mean, torch.tensor([1 / 3, 2 / 3])).tolist()
    result = {
        "model": str(Path(model_path).name), "segment": CALIBRATION_SEGMENT, "segments": len(segments),
        "layers": layers.tolist(), "thresholds": thresholds,
    }  # fmt: skip
    target = Path(output) if output else Path(str(resources.files("crystal_sglang").joinpath("data", CALIBRATION_RESOURCE)))
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {target}: layers {result['layers']}, thresholds {[round(t, 4) for t in thresholds]}")
    return target
