"""A model whose attention eviction cannot keep faithful stops the real CPU server at start-up with one line: a tiny
Gemma 3 with a sliding-window layer (SGLang windows a row's last slots, and a compacted row's last slots reach
further back than the window)."""

from __future__ import annotations

import pytest

from crystal_sglang.server import SGLangServer, ServerError
from tests.conftest import cpu_server_args
from tests.tiny_model import build_tiny_gemma3

pytestmark = pytest.mark.server


def test_a_sliding_window_model_stops_at_start_up(tmp_path, server_log_dir):
    model_dir = build_tiny_gemma3(tmp_path / "tiny-gemma3")
    log = server_log_dir / "sliding-window.log"
    args = cpu_server_args("--kv-evict", "crystal", max_total_tokens=2048)
    with pytest.raises(ServerError, match="exited with code"):
        SGLangServer(model_dir, args, log_path=log).start()
    assert ("--kv-evict crystal cannot serve a model with sliding-window attention (layers 0): SGLang windows a "
            "row's last slots, which eviction fills with tokens from further back; serve this model with --kv-evict "
            "none") in log.read_text()
