"""Faults on the real CPU server with eviction on: nothing leaks, nothing crashes, nobody else's output changes."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest

from crystal_sglang.server import SGLangServer
from tests.conftest import cpu_server_args
from tests.test_server_eviction import DEBUG, PROMPT_IDS, SNAPSHOT_EVERY_BATCH, generate

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def server(tiny_model_dir, server_log_dir):
    args = cpu_server_args("--kv-evict", "crystal", "--kv-evict-budget", "24", "--disable-radix-cache",
                           *SNAPSHOT_EVERY_BATCH, max_total_tokens=2048)
    with SGLangServer(tiny_model_dir, args, log_path=server_log_dir / "faults.log", env=DEBUG) as running:
        yield running
        assert running.pool_used_when_drained() == 0
    assert "Traceback" not in (server_log_dir / "faults.log").read_text()


@pytest.fixture(scope="module")
def witness(server):
    """A request whose output must not change whatever happens around it."""
    return generate(server, {"kv_budget": 30})["output_ids"]


def run_beside(server, witness, fault) -> None:
    """Run `fault` while the witness request decodes; the witness's output must be unchanged."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(generate(server, {"kv_budget": 30})))
    thread.start()
    fault()
    thread.join()
    assert result["output_ids"] == witness
    assert server.pool_used_when_drained() == 0


def test_client_disconnect_mid_stream(server, witness):
    def disconnect():
        body = {"input_ids": PROMPT_IDS, "stream": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": 400, "ignore_eos": True}}
        request = urllib.request.Request(server.base_url + "/generate", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        response = urllib.request.urlopen(request, timeout=60)
        for _ in range(40):  # well past the first eviction
            response.readline()
        response.close()

    run_beside(server, witness, disconnect)


def test_abort_by_request_id(server, witness):
    def abort():
        thread = threading.Thread(target=lambda: generate(server, {"kv_budget": 20}, new_tokens=600))
        thread.start()
        time.sleep(1.5)
        server.post("/abort_request", {"abort_all": True})
        thread.join()

    # abort_all also aborts the witness: check only that nothing leaks or crashes, then that serving goes on.
    abort()
    assert server.pool_used_when_drained() == 0
    assert generate(server, {"kv_budget": 30})["output_ids"] == witness


@pytest.mark.parametrize(
    "sampling",
    [
        {"max_new_tokens": 7},  # finishes before or in the step of its first eviction
        {"max_new_tokens": 41},  # finishes right as the cache crosses budget + buffer
        {"max_new_tokens": 200, "stop_token_ids": [297]},  # stop token mid-think
        {"max_new_tokens": 200, "stop": ["think"]},  # stop string
        {"max_new_tokens": 60, "n": 3, "temperature": 0.8},  # parallel sampling
    ],
)
def test_finishing_paths_leak_nothing(server, witness, sampling):
    def request():
        params = {"temperature": 0, **sampling, "custom_params": {"kv_budget": 20}}
        server.post("/generate", {"input_ids": PROMPT_IDS, "sampling_params": params})

    run_beside(server, witness, request)


def test_prompt_longer_than_its_budget(server, witness):
    long_prompt = (PROMPT_IDS * 12)[:100]

    def request():
        reply = generate(server, {"kv_budget": 20}, prompt=long_prompt, new_tokens=80)
        info = reply["meta_info"]["kv_evict"][-1]
        assert len(reply["output_ids"]) == 80
        assert info["retained"] >= len(long_prompt)  # the prompt is protected: it is never evicted

    run_beside(server, witness, request)


def test_retraction_and_resume(tiny_model_dir, server_log_dir):
    """SGLang's test mode retracts running requests periodically; retracted requests re-prefill and finish."""
    log = server_log_dir / "retract.log"
    args = cpu_server_args("--kv-evict", "crystal", "--kv-evict-budget", "24", "--disable-radix-cache",
                           *SNAPSHOT_EVERY_BATCH, max_total_tokens=2048)
    with SGLangServer(tiny_model_dir, args, log_path=log, env={**DEBUG, "SGLANG_TEST_RETRACT": "1"}) as server:
        replies: list = [None] * 4

        def run(index):
            replies[index] = generate(server, {"kv_budget": 20 + 4 * index}, new_tokens=150)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(len(reply["output_ids"]) == 150 for reply in replies)
        assert server.pool_used_when_drained() == 0
    text = log.read_text()
    assert "#retracted_reqs" in text and "Traceback" not in text


def test_memory_pressure_halves_one_budget_instead_of_retracting(tiny_model_dir, server_log_dir):
    """Once running, a request that may stop early is counted as if it would write little more (here almost
    nothing: `--schedule-conservativeness 0.01`), and SGLang retracts a request when the pool runs out. One such
    request that does not stop, beside two evicting requests, outgrows a pool that one halved budget relieves: the
    scheduler halves one evicting request's budget, evicts at once, and nobody is retracted."""
    log = server_log_dir / "pressure.log"
    budget, new_tokens = 128, 300  # buffer 16, the default
    unbounded_length = len(PROMPT_IDS) + new_tokens
    # The evicting requests hold 128-144 slots each from their 120th token on, 64-80 once halved. The pool runs out
    # before the unbounded request ends whatever they hold (309 + 2 x 128 > pool - 4 slots for the next step), and
    # one halved budget is enough until it ends (309 + 144 + 80 <= pool - 4).
    pool = unbounded_length + 240
    args = cpu_server_args("--kv-evict", "crystal", "--kv-evict-budget", str(budget), "--disable-radix-cache",
                           "--schedule-conservativeness", "0.01", *SNAPSHOT_EVERY_BATCH, max_total_tokens=pool)
    with SGLangServer(tiny_model_dir, args, log_path=log, env=DEBUG) as server:
        unbounded = {"temperature": 0, "max_new_tokens": new_tokens, "custom_params": {"kv_evict": "none"}}
        replies: dict = {}

        def run(name, request):
            thread = threading.Thread(target=lambda: replies.update({name: request()}))
            thread.start()
            return thread

        # The unbounded request first (admitted at its full length, then counted at its estimate), then the others.
        threads = [run("unbounded", lambda: server.post("/generate", {"input_ids": PROMPT_IDS,
                                                                      "sampling_params": unbounded}))]  # fmt: skip
        while server.get("/v1/loads")["loads"][0]["num_running_reqs"] < 1:
            time.sleep(0.05)
        threads += [run(f"evicting-{i}", lambda: generate(server, {}, new_tokens=new_tokens)) for i in range(2)]
        for thread in threads:
            thread.join()
        assert all(len(reply["output_ids"]) == new_tokens for reply in replies.values())  # none stopped early
        budgets = sorted(replies[f"evicting-{i}"]["meta_info"]["kv_evict"][-1]["budget"] for i in range(2))
        assert budgets == [budget // 2, budget]
        assert server.pool_used_when_drained() == 0
    text = log.read_text()
    assert "memory pressure: 1 of 2 budgets halved" in text
    assert "KV cache pool is full" not in text and "Traceback" not in text
