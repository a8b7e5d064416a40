"""SGLang plugin entry point (group `sglang.srt.plugins`): registers every crystal-sglang hook.

SGLang calls `load` in the launcher and in each scheduler and detokenizer process, then applies the registered
hooks. Each hook names the exact function it wraps; the modules that implement them hold the why.
"""

from __future__ import annotations

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from crystal_sglang.patches import hooks, pool_sizing, radix_policy, server_flags

_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"


def load() -> None:
    HookRegistry.register(f"{_SERVER_ARGS}.add_cli_args", server_flags.add_flags, HookType.AFTER)
    HookRegistry.register(f"{_SERVER_ARGS}.from_cli_args", server_flags.from_cli_args_with_flags, HookType.AROUND)
    radix_policy.add_policy_choice()
    for targets in (hooks.TARGETS, pool_sizing.TARGETS, radix_policy.TARGETS):
        for target, (hook, kind) in targets.items():
            HookRegistry.register(target, hook, kind)
