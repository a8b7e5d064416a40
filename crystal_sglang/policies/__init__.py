"""The registry from policy name to policy class, and the one place that turns a request's settings into a spec."""

from __future__ import annotations

from crystal_sglang.config import Budget, ConfigError, EvictionSpec, build_spec, parse_config
from crystal_sglang.policies.base import EvictionPolicy
from crystal_sglang.policies.h2o import H2O
from crystal_sglang.policies.lookahead import CrystalLookahead
from crystal_sglang.policies.lrfu import Crystal, CrystalLite
from crystal_sglang.policies.no_eviction import NoEviction
from crystal_sglang.policies.random_eviction import RandomEviction
from crystal_sglang.policies.rkv import RKV, SnapKV
from crystal_sglang.policies.streaming import StreamingLLM
from crystal_sglang.policies.thinkv import ThinKV

POLICIES: dict[str, type[EvictionPolicy]] = {
    policy.name: policy
    for policy in (
        Crystal, CrystalLite, CrystalLookahead, RKV, ThinKV, SnapKV, H2O, StreamingLLM, RandomEviction, NoEviction
    )
}
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)
DEFAULT_POLICY = "crystal"


def policy_class(name: str) -> type[EvictionPolicy]:
    try:
        return POLICIES[name]
    except KeyError:
        raise ConfigError(f"unknown eviction policy {name!r}; choose one of: {', '.join(POLICY_NAMES)}") from None


def make_spec(policy: str, budget: Budget, config: str | dict | None = None) -> EvictionSpec:
    """Validate a policy name, budget and configuration (JSON text or mapping) into a spec."""
    return build_spec(policy, budget, parse_config(config), policy_class(policy).Params)


def create_policy(spec: EvictionSpec) -> EvictionPolicy:
    return policy_class(spec.policy)(spec)
