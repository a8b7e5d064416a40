"""In-flight eviction on the real SGLang CPU server (tiny offline model): exactness, bounded pool, freed slots."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from crystal_sglang.policies import POLICY_NAMES, make_spec
from crystal_sglang.config import parse_budget
from crystal_sglang.server import SGLangServer, ServerError
from tests.conftest import cpu_server_args

pytestmark = pytest.mark.server

PROMPT_IDS = [1, 269, 326, 449, 118, 297, 43, 7, 2]
NEW_TOKENS = 120
SMALL_BUDGET = 24
BUFFER = 16  # the default
# Our row checks after every eviction step, and SGLang's own pool invariants after every batch (busy) and at idle.
DEBUG = {"CRYSTAL_KV_EVICT_DEBUG": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
         "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
SNAPSHOT_EVERY_BATCH = ("--load-snapshot-publish-interval", "1")  # rows checked against the allocator after every eviction step
METRICS = ("--enable-metrics", "--decode-log-interval", "20")


@pytest.fixture(scope="module")
def server(tiny_model_dir, server_log_dir):
    args = cpu_server_args("--kv-evict", "crystal", "--kv-evict-budget", "32", "--disable-radix-cache",
                           *SNAPSHOT_EVERY_BATCH, *METRICS, max_total_tokens=2048)
    with SGLangServer(tiny_model_dir, args, log_path=server_log_dir / "eviction.log", env=DEBUG) as running:
        yield running
        assert running.pool_used() == 0, "slots leaked: the pool did not return to empty"


def generate(server, custom_params: dict | None = None, new_tokens: int = NEW_TOKENS, prompt=PROMPT_IDS) -> dict:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    if custom_params is not None:
        params["custom_params"] = custom_params
    return server.post("/generate", {"input_ids": prompt, "sampling_params": params})


def reference_output(model_dir, policy: str, budget: int, new_tokens: int = NEW_TOKENS) -> list[int]:
    """The transformers reference path under the same policy and budget (every head keeps the same count)."""
    from transformers import AutoModelForCausalLM

    from crystal_sglang.eviction import SHARED_SLOTS
    from crystal_sglang.reference.cache import EvictingCache, RowRequest, evicting_attention, model_rotary

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    spec = make_spec(policy, parse_budget(budget))
    prompt = torch.tensor([PROMPT_IDS])
    rows = [RowRequest(spec, len(PROMPT_IDS), len(PROMPT_IDS) + new_tokens, layout=SHARED_SLOTS)]
    cache = EvictingCache(model.config, rows, rotary=model_rotary(model))
    with evicting_attention(model), torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             past_key_values=cache, pad_token_id=model.config.eos_token_id)
    return out[0, len(PROMPT_IDS):].tolist()


@pytest.fixture(scope="module")
def full_cache_output(server):
    return generate(server, {"kv_evict": "none"})["output_ids"]


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_budget_above_length_gives_the_full_cache_output(server, full_cache_output, policy):
    reply = generate(server, {"kv_evict": policy, "kv_budget": 4096})
    assert reply["output_ids"] == full_cache_output
    assert reply["meta_info"]["kv_evict"][-1]["evicted"] == 0


@pytest.mark.parametrize("policy", [p for p in POLICY_NAMES if p != "none"])
def test_small_budget_bounds_the_pool_and_frees_every_slot(server, policy):
    start = server.pool_used()
    peak, done = [start], threading.Event()

    def watch():
        while not done.is_set():
            peak.append(server.used_tokens())
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        reply = generate(server, {"kv_evict": policy, "kv_budget": SMALL_BUDGET})
    finally:
        done.set()
        watcher.join()
    info = reply["meta_info"]["kv_evict"][-1]
    assert info["evicted"] > 0 and info["retained"] <= SMALL_BUDGET + BUFFER
    # Read from the pool: the request never held more than budget + buffer entries (+1 slot for the next token).
    assert max(peak) - start <= SMALL_BUDGET + BUFFER + 1
    # Nothing left behind (the fixture checks the pool ends empty). The reply can reach us before the scheduler
    # publishes the load snapshot taken after the request's slots were freed (seen on loaded cores): read it drained.
    assert server.pool_used_when_drained() <= start


def decode_line_parts(server, name: str) -> list[str]:
    """The values of one part (`name: value`) of every "Decode batch" log line so far."""
    return [part.split(": ", 1)[1] for line in server.log_path.read_text().splitlines() if "Decode batch" in line
            for part in line.split(", ") if part.startswith(name + ":")]  # fmt: skip


def test_pool_savings_in_the_log_line_and_metrics(server):
    before = server.metrics()
    reply = generate(server, {"kv_budget": SMALL_BUDGET})
    evicted = reply["meta_info"]["kv_evict"][-1]["evicted"]
    assert evicted > 0
    after = server.metrics()
    grown = {name: after[name] - before.get(name, 0.0) for name in after if name.startswith("crystal_kv:")}
    assert grown["crystal_kv:evicted_tokens_total"] >= evicted
    assert after["crystal_kv:saved_tokens"] >= 0 and "crystal_kv:retained_tokens" in after
    # Eviction's own memory: reported per request, and released with it (the gauge is over the running requests).
    assert reply["meta_info"]["kv_evict"][-1]["state_bytes"] > 0
    assert after["crystal_kv:state_bytes"] == 0
    saved = [int(value) for value in decode_line_parts(server, "#kv-evict saved token")]
    assert saved and max(saved) > 0, "the decode log line does not show the slots eviction saved"
    # Eviction's time: a part of the decode steps it ran in, in the metrics and in the log line.
    assert 0 < grown["crystal_kv:policy_seconds_total"] < grown["crystal_kv:decode_seconds_total"]
    shares = [float(value.rstrip("%")) for value in decode_line_parts(server, "#kv-evict time") if value != "n/a"]
    assert shares and all(0 < share < 100 for share in shares)


def test_the_pool_size_counts_the_bookkeeping_of_every_token(server):
    """The scheduler's pool sizing counted, with each token's KV (2 layers x 2 KV heads x keys and values of 16
    float32 channels), the most bookkeeping any policy keeps per entry (17 bytes) in every layer and KV head."""
    lines = [line for line in server.log_path.read_text().splitlines() if "eviction bookkeeping" in line]
    assert lines and "counts 68 bytes of eviction bookkeeping with each token's 512 bytes of KV" in lines[0]


@pytest.mark.parametrize("policy", ["crystal", "crystal-lite", "crystal-lookahead", "h2o", "streamingllm", "snapkv",
                                    "rkv"])
def test_server_equals_the_reference_path(server, tiny_model_dir, policy):
    reply = generate(server, {"kv_evict": policy, "kv_budget": SMALL_BUDGET})
    assert reply["output_ids"] == reference_output(tiny_model_dir, policy, SMALL_BUDGET)


def test_concurrent_requests_with_different_budgets_do_not_disturb_each_other(server):
    settings = [{"kv_budget": 20}, {"kv_budget": 48}, {"kv_evict": "h2o", "kv_budget": 30}, {"kv_evict": "none"}]
    alone = [generate(server, params)["output_ids"] for params in settings]
    together: list = [None] * len(settings)

    def run(index):
        together[index] = generate(server, settings[index])["output_ids"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(settings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone


@pytest.mark.parametrize(
    ("custom_params", "message"),
    [
        ({"kv_evict": "lru"}, "unknown eviction policy 'lru'"),
        ({"kv_budget": 0}, "budget 0 must be positive"),
        ({"kv_budget": -3}, "budget -3 must be positive"),
        ({"kv_budget": "lots"}, "is not a number"),
        ({"kv_budget": 8}, "not above the protected window"),
        ({"kv_budget": 10**12}, "above the largest supported"),
        ({"kv_evict_config": {"lam": "high"}}, "has the wrong type"),
        ({"kv_evict_config": {"nope": 1}}, "unknown eviction setting(s) nope"),
        ({"kv_evict_config": [1, 2]}, "must be a JSON object"),
        ({"kv_bduget": 64}, "unknown custom_params kv_bduget"),
    ],
)
def test_bad_request_parameters_get_400_and_the_server_keeps_serving(server, custom_params, message):
    with pytest.raises(ServerError) as refused:
        generate(server, custom_params, new_tokens=4)
    assert " 400: " in str(refused.value) and message in str(refused.value)
    assert len(generate(server, new_tokens=4)["output_ids"]) == 4


def test_openai_client_passes_custom_params(server):
    import openai

    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none")
    reply = client.completions.create(model="default", prompt="think step answer", max_tokens=40, temperature=0,
                                      extra_body={"custom_params": {"kv_budget": 20}, "ignore_eos": True})
    assert reply.usage.completion_tokens == 40


def test_frontend_program_runs_against_the_evicting_server(server):
    import sglang as sgl

    @sgl.function
    def reason(s, question):
        s += question
        s += sgl.gen("answer", max_tokens=60, temperature=0, ignore_eos=True)

    state = reason.run(question="think step answer train", backend=sgl.RuntimeEndpoint(server.base_url))
    assert state["answer"]
    meta = state.get_meta_info("answer")
    assert meta["completion_tokens"] == 60 and meta["kv_evict"][-1]["evicted"] > 0


def test_default_model_serves_with_eviction(default_model_dir, server_log_dir):
    """The real default model: exact under a budget above the length, bounded and leak-free under a small one,
    through the OpenAI chat API as the demo uses it."""
    import openai

    args = cpu_server_args("--kv-evict", "crystal", "--kv-evict-budget", "128", "--disable-radix-cache",
                           *SNAPSHOT_EVERY_BATCH)
    with SGLangServer(default_model_dir, args, log_path=server_log_dir / "default-eviction.log", env=DEBUG) as server:
        start = server.pool_used()
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none")
        messages = [{"role": "user", "content": "Explain step by step how to add 27 and 58."}]

        def chat(custom_params, tokens):
            return client.chat.completions.create(
                model="default", messages=messages, max_tokens=tokens, temperature=0,
                extra_body={"custom_params": custom_params, "ignore_eos": True},
            ).choices[0].message.content  # fmt: skip

        assert chat({"kv_budget": 4096}, 64) == chat({"kv_evict": "none"}, 64)
        prompt_ids = list(range(100, 160))
        reply = generate(server, {"kv_budget": 96}, new_tokens=160, prompt=prompt_ids)
        info = reply["meta_info"]["kv_evict"][-1]
        assert info["evicted"] > 0 and info["retained"] <= 96 + BUFFER
        assert server.pool_used() == start
