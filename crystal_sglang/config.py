"""What one request's eviction is asked to do: policy, budget and settings, parsed and validated.

The same parser serves the server flags (`--kv-evict`, `--kv-evict-budget`, `--kv-evict-config`), the per-request
`custom_params` and the transformers reference path, so a value means the same thing everywhere and a bad one gets
the same one-line message.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from crystal_sglang.budgets import CRF_PER_SLOT, REALLOC_SIGNALS, SLOTS_PER_CRF


class ConfigError(ValueError):
    """A bad eviction setting; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Budget:
    """Entries kept per (layer, KV head) after an eviction: a fixed count, or a share of the request's full length
    (prompt plus the most tokens it may generate), known when the request starts."""

    entries: int | None = None
    ratio: float | None = None

    def resolve(self, full_length: int) -> int:
        if self.entries is not None:
            return self.entries
        return max(1, math.ceil(self.ratio * full_length))

    def __str__(self) -> str:
        return str(self.entries) if self.entries is not None else f"{self.ratio * 100:g}%"


MAX_ENTRIES = 1 << 24
MAX_REALLOC_POWER = 8.0  # beyond this the shares are a winner-takes-all anyway


def parse_budget(value: Any) -> Budget:
    """`128` or `"128"` (entries), `"10%"` (share of the full length) or `0.1` / `"0.1"` (below 1: a share)."""
    if isinstance(value, bool):
        raise ConfigError(f"budget {value!r} is not a number: give entries (e.g. 128) or a share (e.g. 10%)")
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            try:
                percent = float(text[:-1])
            except ValueError:
                raise ConfigError(f"budget {value!r} is not a number: give entries (e.g. 128) or a share (e.g. 10%)")
            if not math.isfinite(percent) or not 0 < percent <= 100:
                raise ConfigError(f"budget {value!r} must be a share above 0% and at most 100%")
            return Budget(ratio=percent / 100)
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)  # "0.1" from a flag means what 0.1 means in JSON: a share
            except ValueError:
                raise ConfigError(f"budget {value!r} is not a number: give entries (e.g. 128) or a share (e.g. 10%)")
    if isinstance(value, float):
        if not math.isfinite(value) or not 0 < value < 1:
            raise ConfigError(f"budget {value!r}: a fractional budget is a share and must lie in (0, 1); "
                              "give whole entries as an integer")
        return Budget(ratio=value)
    if not isinstance(value, int):
        raise ConfigError(f"budget {value!r} is not a number: give entries (e.g. 128) or a share (e.g. 10%)")
    if value <= 0:
        raise ConfigError(f"budget {value} must be positive (entries kept per layer and KV head)")
    if value > MAX_ENTRIES:
        raise ConfigError(f"budget {value} is above the largest supported ({MAX_ENTRIES} entries)")
    return Budget(entries=value)


@dataclass(frozen=True)
class Settings:
    """Policy-independent eviction settings (keys of `--kv-evict-config` and of `custom_params.kv_evict_config`)."""

    buffer: int = 16  # entries allowed above the budget before an eviction: the cache oscillates in [budget, budget + buffer]
    sinks: int = 4  # first entries always kept (attention sinks)
    window: int = 8  # newest entries always kept
    protect_prompt: bool = True  # the prompt is never evicted (the papers compress the think stage)
    end_of_think: str | None = "</think>"  # from this marker on, entries are the answer and are never evicted
    seed: int = 0  # for policies that draw at random
    realloc_period: int = 128  # tokens between two per-layer/head budget reallocations (policies that reallocate)
    realloc_floor: float = 0.0  # share of the budget a head keeps at least after a reallocation (0.5, 0.25 measured worse)
    realloc_signal: str = SLOTS_PER_CRF  # which heads a reallocation favours: measured, not published (budgets.py)
    realloc_power: float = 2.0  # the signal raised to this power: above 1, more budget to the heads it favours (1, 3 worse)

    @property
    def protected_window(self) -> int:
        return self.sinks + self.window


@dataclass(frozen=True)
class EvictionSpec:
    """A resolved request configuration: policy name, budget, settings and the policy's own parameters."""

    policy: str
    budget: Budget
    settings: Settings = field(default_factory=Settings)
    params: Any = None  # the policy's parameter dataclass instance

    def most_entries(self, prompt_length: int, full_length: int) -> int:
        """The most entries a request holds per (layer, KV head) once a step's eviction is done: its budget, or what
        protection alone keeps (the sinks and the prompt, and the window) where that is more, plus the buffer it
        fills before an eviction; never more than its full length. Admission counts a request at this, and its
        bookkeeping is sized to it (one more: a step's new entry arrives before the eviction)."""
        settings = self.settings
        held = max(prompt_length, settings.sinks) if settings.protect_prompt else settings.sinks
        protected = held + settings.window
        return min(full_length, max(self.budget.resolve(full_length), protected) + settings.buffer)

    def describe(self) -> dict:
        return {
            "policy": self.policy,
            "budget": str(self.budget),
            **dataclasses.asdict(self.settings),
            **(dataclasses.asdict(self.params) if self.params is not None else {}),
        }


_SETTING_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _check_type(key: str, value: Any, expected: Any) -> Any:
    """Accept JSON values of the declared type (ints where floats are declared); reject anything else."""
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    spelled = expected if isinstance(expected, str) else getattr(expected, "__name__", str(expected))
    names = [part.strip() for part in spelled.split("|")]
    if value is None and "None" in names:
        return None
    for name in names:
        kind = kinds.get(name)
        if kind is None:
            continue
        if kind is bool:
            if isinstance(value, bool):
                return value
        elif isinstance(value, bool):
            continue
        elif kind is float and isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value!r} must be a finite number")
            return float(value)
        elif isinstance(value, kind):
            return value
    raise ConfigError(f"{key}={value!r} has the wrong type: expected {expected}")


def parse_config(text_or_mapping: str | dict | None) -> dict:
    """`--kv-evict-config` JSON text (or an already decoded mapping) into a plain dict of its keys."""
    if text_or_mapping is None or text_or_mapping == "":
        return {}
    if isinstance(text_or_mapping, str):
        try:
            decoded = json.loads(text_or_mapping)
        except json.JSONDecodeError as error:
            raise ConfigError(f"eviction config is not valid JSON ({error.msg} at character {error.pos}): "
                              'give an object such as {"top_p": 0.9, "window": 8}')
    else:
        decoded = text_or_mapping
    if not isinstance(decoded, dict):
        raise ConfigError('eviction config must be a JSON object such as {"top_p": 0.9, "window": 8}')
    return dict(decoded)


def build_spec(policy: str, budget: Budget, config: dict, policy_params_type: Any) -> EvictionSpec:
    """Split `config` into generic settings and the policy's parameters, checking names, types and ranges."""
    accepted = set(_SETTING_FIELDS)
    param_fields = {f.name: f for f in dataclasses.fields(policy_params_type)} if policy_params_type else {}
    accepted |= set(param_fields)
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ConfigError(f"unknown eviction setting(s) {', '.join(unknown)} for policy {policy!r}; "
                          f"accepted: {', '.join(sorted(accepted))}")
    settings_values = {k: _check_type(k, v, _SETTING_FIELDS[k].type) for k, v in config.items() if k in _SETTING_FIELDS}
    settings = Settings(**settings_values)
    for name in ("buffer", "sinks", "window"):
        value = getattr(settings, name)
        if not 0 <= value <= MAX_ENTRIES:
            raise ConfigError(f"{name}={value} must lie in [0, {MAX_ENTRIES}]")
    if settings.buffer < 1:
        raise ConfigError("buffer must be at least 1 entry")
    if not 0 <= settings.seed < 1 << 63:
        raise ConfigError(f"seed={settings.seed} must lie in [0, 2**63)")
    if not 1 <= settings.realloc_period <= MAX_ENTRIES:
        raise ConfigError(f"realloc_period={settings.realloc_period} must lie in [1, {MAX_ENTRIES}] tokens")
    if not 0 <= settings.realloc_floor <= 1:
        raise ConfigError(f"realloc_floor={settings.realloc_floor} must lie in [0, 1] (a share of the budget)")
    if not 0 <= settings.realloc_power <= MAX_REALLOC_POWER:
        raise ConfigError(
            f"realloc_power={settings.realloc_power} must lie in [0, {MAX_REALLOC_POWER}] "
            "(0: equal shares above the floors)"
        )
    if settings.realloc_signal not in REALLOC_SIGNALS:
        raise ConfigError(
            f"realloc_signal={settings.realloc_signal!r} is not one of {', '.join(map(repr, REALLOC_SIGNALS))}: "
            f"{CRF_PER_SLOT!r} is Algorithm 2 as published, {SLOTS_PER_CRF!r} (the default) gives budget to "
            "seldom-hit heads"
        )
    if settings.end_of_think == "":
        raise ConfigError("end_of_think must be a non-empty marker or null")
    params = None
    if policy_params_type is not None:
        values = {k: _check_type(k, v, param_fields[k].type) for k, v in config.items() if k in param_fields}
        params = policy_params_type(**values)
        check = getattr(params, "validate", None)
        if check is not None:
            check()
    if budget.entries is not None and budget.entries <= settings.protected_window:
        raise ConfigError(
            f"budget {budget.entries} is not above the protected window (sinks {settings.sinks} + window "
            f"{settings.window} = {settings.protected_window}): raise the budget or lower sinks/window"
        )
    return EvictionSpec(policy=policy, budget=budget, settings=settings, params=params)
