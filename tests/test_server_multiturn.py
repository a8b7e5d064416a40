"""Multi-turn reasoning chat on the real SGLang CPU server (tiny offline model), one small pool per policy.

Three conversations take turns. Each turn sends its prompt (the history, without earlier think blocks), then its
reasoning `<think> ... </think> answer` after the prompt: prefilled rather than decoded (far cheaper on CPU), it
lands in the cache as a generated one does, a leaf under the prompt. With `--radix-eviction-policy crystal` a
later turn finds its whole earlier prompt (history and answers) cached; with `lru` the reasoning cached since
pushed it out and the turn recomputes it. The same servers run in-flight eviction (`--kv-evict crystal`), so what
a compacted request leaves in the prefix cache is checked here too.
"""

from __future__ import annotations

import threading
import time

import pytest

from crystal_sglang.server import SGLangServer
from tests.conftest import cpu_server_args

pytestmark = pytest.mark.server

CONVERSATIONS, TURNS = 3, 3
SYSTEM = list(range(10, 34))  # a system prompt all conversations share
THINK_TOKENS, ANSWER_TOKENS, USER_TOKENS = 120, 6, 16


def conversation_turns(conversation: int, start: list[int], end: list[int]) -> list[tuple[list[int], list[int]]]:
    """(prompt, reasoning) per turn; each prompt carries the earlier answers but not their think blocks."""
    base = 40 + 100 * conversation
    turns, history = [], list(SYSTEM)
    for turn in range(TURNS):
        answer = [base + 50 + turn] * ANSWER_TOKENS
        thought = [(base + 7 * i + turn) % 400 + 3 for i in range(THINK_TOKENS)]
        prompt = history + [base + turn] * USER_TOKENS
        turns.append((prompt, [*start, *thought, *end, *answer]))
        history = prompt + answer
    return turns


def replay(server: SGLangServer, conversations) -> list[tuple[int, int]]:
    """Round-robin over the conversations; per turn after the first: (cached tokens, the earlier prompt's length)."""
    reuse = []
    for turn in range(TURNS):
        for turns in conversations:
            prompt, reasoning = turns[turn]
            cached = generate(server, prompt)["meta_info"]["cached_tokens"]
            generate(server, prompt + reasoning)
            if turn:
                reuse.append((cached, len(turns[turn - 1][0])))
    return reuse


def generate(server: SGLangServer, input_ids: list[int], new_tokens: int = 1, custom: dict | None = None) -> dict:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    if custom:
        params["custom_params"] = custom
    return server.post("/generate", {"input_ids": input_ids, "sampling_params": params})


@pytest.fixture(scope="module")
def conversations(tiny_model_dir):
    """Marker ids as the server's tokenizer makes them from `<think>` and `</think>`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    start, end = (tokenizer.encode(marker, add_special_tokens=False) for marker in ("<think>", "</think>"))
    return [conversation_turns(c, start, end) for c in range(CONVERSATIONS)]


def start_server(model_dir, log_dir, conversations, policy: str) -> SGLangServer:
    # the pool holds every conversation's history and one turn's reasoning, not the reasoning of several turns
    pool = sum(len(turns[-1][0]) for turns in conversations) + len(conversations[0][0][1])
    args = cpu_server_args("--radix-eviction-policy", policy, "--kv-evict", "crystal", max_total_tokens=pool)
    return SGLangServer(model_dir, args, log_path=log_dir / f"multiturn-{policy}.log",
                        env={"CRYSTAL_KV_EVICT_DEBUG": "1"})


@pytest.fixture(scope="module")
def servers(tiny_model_dir, server_log_dir, conversations):
    """One server per policy, started side by side (start-up dominates this file), each from a thread that lives as
    long as its server: the launcher stops when the thread that started it ends."""
    running, failures, stop = {}, {}, threading.Event()

    def serve(policy: str) -> None:
        try:
            with start_server(tiny_model_dir, server_log_dir, conversations, policy) as server:
                running[policy] = server
                stop.wait()
        except Exception as error:  # reported by the fixture
            failures[policy] = error

    threads = [threading.Thread(target=serve, args=(policy,)) for policy in ("crystal", "lru")]
    for thread in threads:
        thread.start()
    try:
        while len(running) + len(failures) < len(threads):
            time.sleep(0.5)
        if failures:
            raise next(iter(failures.values()))
        yield running
    finally:
        stop.set()
        for thread in threads:
            thread.join()


def test_later_turns_reuse_their_history_where_lru_recomputes_it(servers, conversations):
    crystal, lru = replay(servers["crystal"], conversations), replay(servers["lru"], conversations)
    assert all(cached >= earlier for cached, earlier in crystal), f"crystal recomputed history: {crystal}"
    assert any(cached < earlier for cached, earlier in lru), f"lru kept every history: {lru}"
    assert sum(cached for cached, _ in crystal) > sum(cached for cached, _ in lru)
    log = servers["crystal"].log_path.read_text()
    assert "runs on SGLang's Python TreeCore" in log and "Traceback" not in log


def test_a_compacted_request_leaves_only_its_prompt_in_the_prefix_cache(servers):
    """In-flight eviction compacts a request's row during decode, after SGLang cached its prompt (when the prefill
    ended). The prompt stays reusable; the compacted output is never inserted (the row no longer matches the
    tokens)."""
    server = servers["crystal"]
    server.get("/flush_cache")
    prompt = [1, *range(200, 260), 2]
    reply = generate(server, prompt, new_tokens=100, custom={"kv_budget": 24})
    assert reply["meta_info"]["kv_evict"][-1]["evicted"] > 0
    again = generate(server, prompt + reply["output_ids"])
    assert again["meta_info"]["cached_tokens"] == len(prompt)
    assert generate(server, prompt)["meta_info"]["cached_tokens"] == len(prompt) - 1
