"""Admission on the real SGLang CPU server: requests whose KV is bounded by a budget run together in a pool that
holds only a few full-length requests, where the same requests without eviction queue."""

from __future__ import annotations

import threading
import time

import pytest

from crystal_sglang.server import SGLangServer
from tests.conftest import cpu_server_args
from tests.test_server_eviction import DEBUG, PROMPT_IDS, SNAPSHOT_EVERY_BATCH, generate

pytestmark = pytest.mark.server

NEW_TOKENS = 120
BUDGET = 24  # + the buffer of 16: each evicting request holds at most 40 slots
FULL_LENGTH = len(PROMPT_IDS) + NEW_TOKENS
POOL = 3 * FULL_LENGTH  # about three full-length requests
CONCURRENT = 6


@pytest.fixture(scope="module")
def server(tiny_model_dir, server_log_dir):
    args = cpu_server_args("--kv-evict", "crystal", "--kv-evict-budget", str(BUDGET), "--disable-radix-cache",
                           *SNAPSHOT_EVERY_BATCH, max_total_tokens=POOL)
    with SGLangServer(tiny_model_dir, args, log_path=server_log_dir / "capacity.log", env=DEBUG) as running:
        yield running
        assert running.pool_used_when_drained() == 0, "slots leaked: the pool did not return to empty"


def peak_running(server, custom_params: dict) -> tuple[int, list[dict]]:
    """Send CONCURRENT identical long requests at once; the most the scheduler ran together, and the replies."""
    replies: list = [None] * CONCURRENT
    loads, done = [], threading.Event()

    def poll():
        while not done.is_set():
            loads.append(server.get("/v1/loads")["loads"][0]["num_running_reqs"])
            time.sleep(0.05)

    def run(index):
        replies[index] = generate(server, custom_params)

    poller = threading.Thread(target=poll)
    poller.start()
    clients = [threading.Thread(target=run, args=(i,)) for i in range(CONCURRENT)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    done.set()
    poller.join()
    return max(loads), replies


def test_bounded_requests_run_together_where_full_ones_queue(server):
    full_peak, full_replies = peak_running(server, {"kv_evict": "none"})
    bounded_peak, bounded_replies = peak_running(server, {})
    assert full_peak <= 3  # the pool holds three full-length requests
    assert bounded_peak == CONCURRENT  # each counted at budget + buffer, so all of them fit at once
    for reply in full_replies + bounded_replies:
        assert reply["meta_info"]["completion_tokens"] == NEW_TOKENS
    assert all(reply["output_ids"] == bounded_replies[0]["output_ids"] for reply in bounded_replies)
    assert server.pool_used_when_drained() == 0
