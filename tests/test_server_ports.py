"""Servers started side by side race for ports: a port `SGLangServer` chose that another process takes before the
server binds it is replaced; a port the caller gave that is in use is refused, saying so."""

from __future__ import annotations

import socket

import pytest

from crystal_sglang import server as server_module
from crystal_sglang.server import ServerError, SGLangServer
from tests.conftest import cpu_server_args


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_chosen_port_taken_before_the_server_binds_it_is_replaced(tiny_model_dir, server_log_dir, taken_port,
                                                                    monkeypatch):  # fmt: skip
    chosen = iter([taken_port])  # the first port chosen is taken by the time the server binds it
    free_port = server_module.free_port
    monkeypatch.setattr(server_module, "free_port", lambda: next(chosen, None) or free_port())
    with SGLangServer(tiny_model_dir, cpu_server_args(), log_path=server_log_dir / "ports.log") as server:
        assert server.port != taken_port
        answer = server.post("/generate", {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}})
        assert len(answer["output_ids"]) == 2


def test_a_given_port_in_use_is_refused_with_a_clear_error(tiny_model_dir, server_log_dir, taken_port):
    server = SGLangServer(tiny_model_dir, cpu_server_args(), log_path=server_log_dir / "given-port.log",
                          port=taken_port)  # fmt: skip
    with pytest.raises(ServerError, match=f"127.0.0.1:{taken_port} was in use by another process"):
        server.start()
    assert server.process.poll() is not None
