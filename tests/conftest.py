"""Shared fixtures: the tiny offline model, the prepared default model, and real SGLang servers."""

from __future__ import annotations

import os

import pytest
import torch

from tests.policy_helpers import NO_TRANSITION, torch_threads, write_calibration
from tests.tiny_model import build_tiny_gpt2, build_tiny_llama


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (FlashInfer, compiled Triton)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): see
    `torch_threads`."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def calibration(tmp_path_factory) -> str:
    """A ThinKV thresholds file whose thought types all occur in the policy tests' sparsity streams."""
    return write_calibration(tmp_path_factory.mktemp("thinkv"))


@pytest.fixture(scope="session")
def calm_calibration(tmp_path_factory) -> str:
    """ThinKV thresholds under which no segment is a Transition (no demotion within budget)."""
    return write_calibration(tmp_path_factory.mktemp("thinkv_calm"), NO_TRANSITION)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_rotaryless_model_dir(tmp_path_factory):
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def default_model_dir():
    from crystal_sglang.models import prepare_default_model

    return prepare_default_model(progress=False)


@pytest.fixture(scope="session")
def server_log_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("server-logs")


def cpu_server_args(*extra: str, max_total_tokens: int = 4096) -> list[str]:
    from crystal_sglang.server import CPU_SERVER_ARGS

    device = [] if torch.cuda.is_available() else list(CPU_SERVER_ARGS)
    return [*device, "--max-total-tokens", str(max_total_tokens), "--log-level", "info", *extra]


@pytest.fixture(scope="session", autouse=True)
def _quiet_tokenizers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
