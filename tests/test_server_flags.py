"""The `--kv-evict*` flags reach SGLang's launcher, and bad values stop it with one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from crystal_sglang.policies import POLICY_NAMES


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sglang.launch_server", *args], capture_output=True, text=True,
                          timeout=300)


def test_help_lists_the_flags():
    result = launch("--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--kv-evict ", "--kv-evict-budget", "--kv-evict-config"):
        assert flag in result.stdout
    assert ",".join(POLICY_NAMES) in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kv-evict", "lru"], "unknown eviction policy 'lru'; choose one of: crystal"),
        (["--kv-evict", "crystal", "--kv-evict-budget", "0"], "budget 0 must be positive"),
        (["--kv-evict", "crystal", "--kv-evict-budget", "-5"], "budget -5 must be positive"),
        (["--kv-evict", "crystal", "--kv-evict-budget", "many"], "is not a number"),
        (["--kv-evict", "crystal", "--kv-evict-budget", "10"], "is not above the protected window"),
        (["--kv-evict", "crystal", "--kv-evict-config", "{top_p: 1"], "is not valid JSON"),
        (["--kv-evict", "crystal", "--kv-evict-config", '{"topp": 0.9}'], "unknown eviction setting(s) topp"),
        (["--kv-evict", "crystal", "--kv-evict-config", '{"top_p": "high"}'], "has the wrong type"),
        (["--kv-evict", "crystal", "--page-size", "16"], "needs --page-size 1"),
        (["--kv-evict", "rkv", "--speculative-algorithm", "EAGLE"], "cannot run with speculative decoding"),
        (["--kv-evict", "h2o", "--enable-mixed-chunk"], "cannot run with --enable-mixed-chunk"),
        (["--kv-evict", "crystal", "--tp-size", "2"], "runs on one rank only"),
        (["--kv-evict", "crystal", "--enable-hierarchical-cache"], "is not built for --enable-hierarchical-cache"),
        (["--kv-evict", "crystal", "--disaggregation-mode", "decode"], "is not built for --disaggregation-mode decode"),
    ],
)
def test_bad_settings_are_refused_at_start_up(args, message, tmp_path):
    """In-process, through the launcher's own argument path (plugins loaded as the launcher loads them)."""
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    load_plugins()
    with pytest.raises(SystemExit) as stopped:
        prepare_server_args(["--model-path", str(tmp_path), *args])
    assert str(stopped.value).startswith("error: ") and message in str(stopped.value)
    assert "\n" not in str(stopped.value)


def test_the_launcher_exits_with_the_message(tmp_path):
    result = launch("--model-path", str(tmp_path), "--kv-evict", "crystal", "--kv-evict-budget", "0")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --kv-evict: budget 0 must be positive (entries kept per layer and KV head)"
    )


def test_valid_flags_are_carried_on_the_server_args(tmp_path):
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    from crystal_sglang.patches.server_flags import spec_of

    load_plugins()
    server_args = prepare_server_args(["--model-path", str(tmp_path), "--kv-evict", "rkv", "--kv-evict-budget",
                                       "10%", "--kv-evict-config", '{"window": 16}'])
    spec = spec_of(server_args)
    assert (spec.policy, str(spec.budget), spec.settings.window) == ("rkv", "10%", 16)
    import pickle

    assert spec_of(pickle.loads(pickle.dumps(server_args))) == spec  # what the scheduler processes receive
    assert spec_of(prepare_server_args(["--model-path", str(tmp_path)])) is None
