"""The real SGLang server on CPU answers greedy requests exactly as transformers does on the same model."""

from __future__ import annotations

import pytest
import torch

from crystal_sglang.server import SGLangServer
from tests.conftest import cpu_server_args

pytestmark = pytest.mark.server

PROMPT = "Think step by step: a train covers 120 km in 1.5 hours. What is its speed?"


def transformers_greedy(model_dir, input_ids: list[int], new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([input_ids]), max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens, pad_token_id=model.config.eos_token_id)
    return out[0, len(input_ids):].tolist()


def chat_ids(model_dir) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("model_fixture", ["tiny_model_dir", "default_model_dir"])
def test_greedy_output_equals_transformers(request, model_fixture, server_log_dir):
    model_dir = request.getfixturevalue(model_fixture)
    new_tokens = 24
    input_ids = chat_ids(model_dir)
    expected = transformers_greedy(model_dir, input_ids, new_tokens)

    log = server_log_dir / f"parity-{model_fixture}.log"
    with SGLangServer(model_dir, cpu_server_args(), log_path=log) as server:
        generated = server.post("/generate", {
            "input_ids": input_ids,
            "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True},
        })  # fmt: skip
        import openai

        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none")
        chat = client.chat.completions.create(
            model=str(model_dir), messages=[{"role": "user", "content": PROMPT}], max_tokens=new_tokens,
            temperature=0, extra_body={"ignore_eos": True},
        )  # fmt: skip

    assert generated["output_ids"] == expected
    from transformers import AutoTokenizer

    expected_text = AutoTokenizer.from_pretrained(model_dir).decode(expected, skip_special_tokens=True)
    assert chat.choices[0].message.content == expected_text
    assert chat.usage.prompt_tokens == len(input_ids)


def test_kv_evict_none_answers_as_stock_sglang(tiny_model_dir, server_log_dir):
    """With the plugin loaded and eviction off, every response equals stock SGLang's (plugin left out through
    SGLang's `SGLANG_PLUGINS` whitelist): token ids, text, log-probabilities and the meta info's keys."""
    prompts = [[1, 5, 9, 14, 2], [3, 3, 8, 21, 34, 55, 1, 7], list(range(2, 40))]
    payload = {"input_ids": prompts, "return_logprob": True, "top_logprobs_num": 2,
               "sampling_params": {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}}  # fmt: skip
    answers = {}
    for kind, flags, env in (("stock", [], {"SGLANG_PLUGINS": "stock"}), ("none", ["--kv-evict", "none"], None)):
        log = server_log_dir / f"parity-{kind}.log"
        with SGLangServer(tiny_model_dir, cpu_server_args(*flags), log_path=log, env=env) as server:
            answers[kind] = server.post("/generate", payload)
            assert server.runs_crystal_plugin() == (kind == "none")
        assert "eviction bookkeeping" not in log.read_text()  # the pool sized as stock SGLang sizes it
    for stock, none in zip(answers["stock"], answers["none"], strict=True):
        assert none["output_ids"] == stock["output_ids"]
        assert none["text"] == stock["text"]
        for key in ("input_token_logprobs", "output_token_logprobs", "output_top_logprobs"):
            assert none["meta_info"][key] == stock["meta_info"][key], key
        assert set(none["meta_info"]) == set(stock["meta_info"])
