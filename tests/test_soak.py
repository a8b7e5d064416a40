"""The soak in its short form: concurrent clients, mixed policies, budgets, dropped streams, parallel sampling
and bad parameters against one evicting server; nothing leaks, nothing fails, the server keeps serving."""

from __future__ import annotations

import pytest

from benchmarks.soak import run_soak
from crystal_sglang.server import SGLangServer
from tests.conftest import cpu_server_args
from tests.test_server_eviction import DEBUG

pytestmark = pytest.mark.server


def test_short_soak_serves_everything_and_leaks_nothing(tiny_model_dir, server_log_dir):
    args = cpu_server_args("--kv-evict", "crystal", "--kv-evict-budget", "32", "--load-snapshot-publish-interval",
                           "1", max_total_tokens=1024)  # fmt: skip
    with SGLangServer(tiny_model_dir, args, log_path=server_log_dir / "soak.log", env=DEBUG) as server:
        report = run_soak(server, clients=4, requests=40, max_new_tokens=48, vocab=250, progress=False)
        assert server.process.poll() is None, "the server died"
    assert report.errors == []
    assert report.requests == 40 and report.served > 0 and report.refused_as_expected > 0 and report.disconnected > 0
    assert report.leaked_slots == 0
    assert report.eviction_failures == 0
