"""A tiny Llama made offline: random weights and a byte-level BPE tokenizer trained here, with a chat template.

Small enough that SGLang starts on it in seconds, real enough that SGLang and transformers load it the same way.
`random_llama()` is the in-memory one (no tokenizer) of the transformers reference-path tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# Two layers, 4 query heads over 2 KV heads (GQA): every reference-path code path, decoding in milliseconds.
RANDOM_LLAMA = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)  # fmt: skip


def random_llama() -> LlamaForCausalLM:
    """`RANDOM_LLAMA` with seed-0 weights in float32; it always generates the requested number of tokens."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(RANDOM_LLAMA).to(torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _training_text() -> list[str]:
    """Sentences spelled from a fixed vocabulary: deterministic, no files or network needed."""
    words = ("think step answer train speed hour distance total first then so the a is of and to we "
             "find divide multiply add number result final because which means </think> <think>").split()
    generator = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(2000):
        picks = torch.randint(len(words), (12,), generator=generator).tolist()
        numbers = torch.randint(1000, (2,), generator=generator).tolist()
        lines.append(" ".join(words[i] for i in picks) + f" {numbers[0]} + {numbers[1]} = {sum(numbers)}.")
    return lines


def build_tokenizer(out: Path, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_training_text(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )  # fmt: skip
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build_tiny_llama(out: Path, seed: int = 0) -> Path:
    """Write a Hugging Face folder (safetensors, config, tokenizer) for a 2-layer GQA Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_random(LlamaForCausalLM, out, seed, lambda ids: LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=10000.0, **ids,
    ))  # fmt: skip


def build_tiny_gpt2(out: Path, seed: int = 0) -> Path:
    """Write a Hugging Face folder for a 2-layer GPT-2: learned absolute positions, no rotary embedding."""
    from transformers import GPT2Config, GPT2LMHeadModel

    return _save_random(GPT2LMHeadModel, out, seed, lambda ids: GPT2Config(
        n_embd=64, n_layer=2, n_head=4, n_positions=4096, **ids,
    ))  # fmt: skip


def build_tiny_gemma3(out: Path, seed: int = 0) -> Path:
    """Write a Hugging Face folder for a 2-layer Gemma 3 text model: layer 0 attends through a sliding window of
    32 tokens, layer 1 to everything."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return _save_random(Gemma3ForCausalLM, out, seed, lambda ids: Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=4096, sliding_window=32,
        layer_types=["sliding_attention", "full_attention"], **ids,
    ))  # fmt: skip


def _save_random(model_class, out: Path, seed: int, make_config) -> Path:
    """The offline tokenizer, then `make_config(ids)` (ids: the vocabulary size and special token ids) with
    seed-`seed` random weights, saved to `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out, vocab_size=512)
    config = make_config({
        "vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
    })  # fmt: skip
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    with torch.no_grad():  # a larger spread than the default init makes greedy choices far from ties
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.08)
    model.save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").write_text(json.dumps({"do_sample": False, "eos_token_id": config.eos_token_id}))
    return out
