"""SGLang's `triton` attention backend (the GPU backends' `req_to_token`/`seq_lens` layout) on CPU, under Triton's
interpreter: the stand-in for a GPU server. Our score kernel runs through the interpreter there too."""

from __future__ import annotations

import pytest

from crystal_sglang.server import SGLangServer
from tests.conftest import cpu_server_args
from tests.test_server_eviction import DEBUG, generate, reference_output

pytestmark = pytest.mark.server

NEW_TOKENS = 48
BUDGET = 20


@pytest.fixture(scope="module")
def triton_server(tiny_model_dir, server_log_dir):
    args = cpu_server_args("--kv-evict", "crystal", "--kv-evict-budget", str(BUDGET), "--disable-radix-cache",
                           "--load-snapshot-publish-interval", "1", max_total_tokens=1024)  # fmt: skip
    args[args.index("torch_native")] = "triton"
    with SGLangServer(tiny_model_dir, args, log_path=server_log_dir / "triton.log",
                      env={**DEBUG, "TRITON_INTERPRET": "1"}) as running:  # fmt: skip
        yield running
        assert running.pool_used() == 0, "slots leaked: the pool did not return to empty"


def test_triton_backend_evicts_like_the_reference_path(triton_server, tiny_model_dir):
    assert "scores by triton-interpreter" in triton_server.log_path.read_text()
    reply = generate(triton_server, new_tokens=NEW_TOKENS)
    assert reply["meta_info"]["kv_evict"][-1]["evicted"] > 0
    assert reply["output_ids"] == reference_output(tiny_model_dir, "crystal", BUDGET, NEW_TOKENS)
