"""The full cache: never evicts (the reference every comparison is made against)."""

from __future__ import annotations

from crystal_sglang.policies.base import EvictionPolicy


class NoEviction(EvictionPolicy):
    name = "none"
    evicts = False
