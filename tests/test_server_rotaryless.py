"""A model without a rotary embedding (a tiny GPT-2: learned absolute positions) on the real CPU server: the
policies that move queries by the model's rotary embedding are refused, at start-up or per request, and the
others evict as usual, positions kept logical."""

from __future__ import annotations

import pytest

from crystal_sglang.server import SGLangServer, ServerError
from tests.conftest import cpu_server_args
from tests.test_server_eviction import BUFFER, DEBUG, generate, reference_output

pytestmark = pytest.mark.server

BUDGET = 24
NO_ROTARY = "moves queries with the model's rotary embedding, and this model has none SGLang exposes"


@pytest.fixture(scope="module")
def server(tiny_rotaryless_model_dir, server_log_dir):
    args = cpu_server_args("--kv-evict", "crystal", "--kv-evict-budget", str(BUDGET), "--disable-radix-cache",
                           max_total_tokens=2048)
    with SGLangServer(tiny_rotaryless_model_dir, args, log_path=server_log_dir / "rotaryless.log",
                      env=DEBUG) as running:  # fmt: skip
        yield running
        assert running.pool_used_when_drained() == 0, "slots leaked: the pool did not return to empty"
    assert "Traceback" not in (server_log_dir / "rotaryless.log").read_text()


def test_eviction_keeps_learned_positions_logical(server, tiny_rotaryless_model_dir):
    """GPT-2 adds a learned embedding per position: after eviction the server must still feed each token its
    logical position, as the transformers reference path does."""
    reply = generate(server)
    info = reply["meta_info"]["kv_evict"][-1]
    assert info["policy"] == "crystal" and info["evicted"] > 0 and info["retained"] <= BUDGET + BUFFER
    assert reply["output_ids"] == reference_output(tiny_rotaryless_model_dir, "crystal", BUDGET)
    assert reply["output_ids"] != generate(server, {"kv_evict": "none"})["output_ids"]  # eviction changed the output


@pytest.mark.parametrize("custom_params", [{"kv_evict": "crystal-lookahead"},
                                           {"kv_evict": "crystal-lookahead", "kv_budget": 40}])
def test_a_request_choosing_a_rotary_policy_gets_400_and_the_server_keeps_serving(server, custom_params):
    with pytest.raises(ServerError) as refused:
        generate(server, custom_params, new_tokens=4)
    assert refused.value.status == 400
    assert f"custom_params.kv_evict=crystal-lookahead {NO_ROTARY}: choose another policy" in str(refused.value)
    assert len(generate(server, {"kv_evict": "rkv"}, new_tokens=4)["output_ids"]) == 4


def test_a_server_choosing_a_rotary_policy_stops_at_start_up(tiny_rotaryless_model_dir, server_log_dir):
    log = server_log_dir / "rotaryless-lookahead.log"
    args = cpu_server_args("--kv-evict", "crystal-lookahead", max_total_tokens=2048)
    with pytest.raises(ServerError, match="exited with code"):
        SGLangServer(tiny_rotaryless_model_dir, args, log_path=log).start()
    assert f"--kv-evict crystal-lookahead {NO_ROTARY}: choose another policy (crystal)" in log.read_text()
