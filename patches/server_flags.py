"""The `--kv-evict*` server flags: added to SGLang's parser, validated at start-up, carried to every process.

Hooks (registered by `plugin.load`):
- `sglang.srt.server_args.ServerArgs.add_cli_args` (after): adds the three flags.
- `sglang.srt.server_args.ServerArgs.from_cli_args` (around): validates them with the rest of the settings and
  attaches the resolved `EvictionSpec` to the record as `_kv_evict_spec`. Underscore attributes that are not
  fields are bookkeeping for ServerArgs: they survive its pickling into the scheduler processes.

A bad value stops the launcher with one line that says what to do (SystemExit), before any process starts.
"""

from __future__ import annotations

import argparse

from crystal_sglang.config import ConfigError, EvictionSpec, parse_budget
from crystal_sglang.policies import POLICY_NAMES, make_spec

SPEC_ATTRIBUTE = "_kv_evict_spec"
DEFAULT_BUDGET = "256"
_process_spec: EvictionSpec | None = None  # what this (launcher/HTTP) process parsed, for per-request checks


def add_flags(result, parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("crystal-sglang KV eviction")
    group.add_argument(
        "--kv-evict",
        default="none",
        metavar="{" + ",".join(POLICY_NAMES) + "}",
        help="Evict KV entries of running requests with this policy; freed slots return to the pool. "
        "'none' (the default) leaves SGLang unchanged.",
    )
    group.add_argument(
        "--kv-evict-budget",
        default=DEFAULT_BUDGET,
        help="Entries kept per request, layer and KV head (e.g. 256), or a share of the request's prompt plus "
        f"max_new_tokens (e.g. 10%%). Default {DEFAULT_BUDGET}. Requests may override it with "
        "custom_params.kv_budget.",
    )
    group.add_argument(
        "--kv-evict-config",
        default=None,
        help='Policy settings as a JSON object, e.g. \'{"top_p": 0.9, "lam": 0.6, "sinks": 4, "window": 8, '
        '"end_of_think": "</think>"}\'.',
    )


def refusal(server_args, spec: EvictionSpec) -> str | None:
    """Why SGLang settings cannot run with in-flight eviction, or None when they can."""
    if spec.policy == "none":
        return None
    if (server_args.page_size or 1) > 1:
        return (f"--kv-evict {spec.policy} needs --page-size 1 (got {server_args.page_size}): eviction frees "
                "single token slots")
    if server_args.speculative_algorithm:
        return (f"--kv-evict {spec.policy} cannot run with speculative decoding "
                f"(--speculative-algorithm {server_args.speculative_algorithm}): drop one of them")
    if server_args.enable_mixed_chunk:
        return f"--kv-evict {spec.policy} cannot run with --enable-mixed-chunk: drop that flag"
    mode = server_args.disaggregation_mode
    for flag, chosen in (("--enable-hierarchical-cache", server_args.enable_hierarchical_cache),
                         (f"--disaggregation-mode {mode}", mode != "null")):  # fmt: skip
        if chosen:
            return (f"--kv-evict {spec.policy} is not built for {flag} (it moves and frees pool slots that this also "
                    "manages; never tested together): drop that flag or serve with --kv-evict none")
    for name, flag in (("tp_size", "--tp-size"), ("pp_size", "--pp-size"), ("dp_size", "--dp-size")):
        value = getattr(server_args, name, 1) or 1
        if value > 1:
            return (f"--kv-evict {spec.policy} runs on one rank only for now ({flag} {value}): ranks do not yet "
                    "agree on what to evict; use one GPU per server or --kv-evict none")
    return None


def resolve_spec(namespace: argparse.Namespace) -> EvictionSpec:
    return make_spec(namespace.kv_evict, parse_budget(namespace.kv_evict_budget), namespace.kv_evict_config)


def from_cli_args_with_flags(original, cls, namespace: argparse.Namespace):
    try:
        spec = resolve_spec(namespace)
    except ConfigError as error:
        raise SystemExit(f"error: --kv-evict: {error}") from None
    server_args = original(cls, namespace)
    reason = refusal(server_args, spec)
    if reason:
        raise SystemExit(f"error: {reason}")
    if spec.policy != "none":
        _disable_step_fusion(server_args)
    setattr(server_args, SPEC_ATTRIBUTE, spec)
    global _process_spec
    _process_spec = spec
    return server_args


def _disable_step_fusion(server_args) -> None:
    """Eviction runs between decode steps on the CPU side and changes lengths: the overlap scheduler (which
    prepares step t+1 before step t's results) and CUDA graphs (fixed shapes) must be off."""
    import logging

    for name in ("disable_overlap_schedule", "disable_cuda_graph"):
        if not getattr(server_args, name):
            setattr(server_args, name, True)
            logging.getLogger("crystal_sglang").info("--kv-evict: set %s (needed by in-flight eviction)", name)


def current_spec() -> EvictionSpec | None:
    """The eviction spec parsed in this process (None when eviction is off)."""
    return _process_spec if _process_spec is not None and _process_spec.policy != "none" else None


def spec_of(server_args) -> EvictionSpec | None:
    """The server's eviction spec, or None when eviction is off (flag absent or `none`)."""
    spec = getattr(server_args, SPEC_ATTRIBUTE, None)
    return spec if spec is not None and spec.policy != "none" else None
