"""Parsing and validating eviction settings: what is accepted, and that every refusal says what to do."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crystal_sglang.config import MAX_ENTRIES, Budget, ConfigError, Settings, build_spec, parse_budget, parse_config
from crystal_sglang.policies import POLICY_NAMES, create_policy, make_spec, policy_class
from crystal_sglang.policies.lrfu import LRFUParams
from crystal_sglang.policies.rkv import RKVParams
from tests.policy_helpers import make_evictor

HOW_TO_GIVE_A_BUDGET = r"give entries \(e\.g\. 128\) or a share \(e\.g\. 10%\)"


# ---- budgets -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value, expected",
    [
        (128, Budget(entries=128)),
        ("128", Budget(entries=128)),
        (" 64 ", Budget(entries=64)),
        (MAX_ENTRIES, Budget(entries=MAX_ENTRIES)),
        ("10%", Budget(ratio=0.1)),
        (" 12.5% ", Budget(ratio=0.125)),
        ("100%", Budget(ratio=1.0)),
        (0.1, Budget(ratio=0.1)),
        ("0.1", Budget(ratio=0.1)),  # a flag's text means what the JSON number means
    ],
)
def test_valid_budgets(value, expected):
    assert parse_budget(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "budget 0 must be positive"),
        ("0", "budget 0 must be positive"),
        (-5, "budget -5 must be positive"),
        (True, f"budget True is not a number: {HOW_TO_GIVE_A_BUDGET}"),
        (None, f"budget None is not a number: {HOW_TO_GIVE_A_BUDGET}"),
        ("many", f"budget 'many' is not a number: {HOW_TO_GIVE_A_BUDGET}"),
        ("", f"budget '' is not a number: {HOW_TO_GIVE_A_BUDGET}"),
        ("12 entries", "is not a number"),
        ([128], "is not a number"),
        ("abc%", "is not a number"),
        ("0%", "must be a share above 0% and at most 100%"),
        ("-5%", "must be a share above 0% and at most 100%"),
        ("150%", "must be a share above 0% and at most 100%"),
        ("nan%", "must be a share above 0% and at most 100%"),
        ("inf%", "must be a share above 0% and at most 100%"),
        (1.5, r"a fractional budget is a share and must lie in \(0, 1\); give whole entries as an integer"),
        ("1.5", r"must lie in \(0, 1\)"),
        (1.0, r"must lie in \(0, 1\)"),
        (0.0, r"must lie in \(0, 1\)"),
        (-0.1, r"must lie in \(0, 1\)"),
        (math.nan, r"must lie in \(0, 1\)"),
        (math.inf, r"must lie in \(0, 1\)"),
        (MAX_ENTRIES + 1, f"above the largest supported \\({MAX_ENTRIES} entries\\)"),
        (10**30, "above the largest supported"),
        (str(10**30), "above the largest supported"),
    ],
)
def test_bad_budgets_say_what_to_give(value, message):
    with pytest.raises(ConfigError, match=message) as refused:
        parse_budget(value)
    assert "\n" not in str(refused.value)


def test_budget_resolution():
    assert Budget(entries=100).resolve(10_000) == 100
    assert Budget(ratio=0.1).resolve(1001) == 101  # rounded up
    assert Budget(ratio=0.01).resolve(10) == 1  # never below one entry
    assert str(parse_budget("10%")) == "10%" and str(parse_budget(256)) == "256"


@settings(max_examples=50, deadline=None)
@given(st.integers(1, MAX_ENTRIES))
def test_any_entry_count_round_trips(entries):
    assert parse_budget(entries) == parse_budget(str(entries)) == Budget(entries=entries)
    assert parse_budget(str(parse_budget(entries))) == Budget(entries=entries)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.01, 100.0))
def test_any_share_resolves_within_the_full_length(percent):
    budget = parse_budget(f"{percent}%")
    for full_length in (1, 17, 4096):
        assert 1 <= budget.resolve(full_length) <= full_length


# ---- the config mapping and the spec ---------------------------------------------------------------------------------
def test_config_accepts_json_text_a_mapping_or_nothing():
    assert parse_config(None) == {} and parse_config("") == {}
    assert parse_config('{"top_p": 0.8}') == {"top_p": 0.8}
    mapping = {"window": 4}
    assert parse_config(mapping) == mapping and parse_config(mapping) is not mapping


@pytest.mark.parametrize("text", ["{top_p: 1", '{"window": 8,}', "[1, 2", "'single'"])
def test_malformed_json_says_what_to_give(text):
    with pytest.raises(ConfigError, match=r"is not valid JSON \(.* at character \d+\): give an object such as") as e:
        parse_config(text)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["[1, 2]", "3", '"window"', "null"])
def test_config_must_be_an_object(text):
    with pytest.raises(ConfigError, match='must be a JSON object such as {"top_p": 0.9, "window": 8}'):
        parse_config(text)


def test_spec_splits_settings_from_policy_parameters():
    spec = make_spec("crystal", parse_budget(64), '{"top_p": 0.8, "lam": 1, "window": 16, "sinks": 2, '
                     '"buffer": 32, "protect_prompt": false, "end_of_think": null, "seed": 7}')  # fmt: skip
    assert spec.settings == Settings(buffer=32, sinks=2, window=16, protect_prompt=False, end_of_think=None, seed=7)
    assert spec.params == LRFUParams(top_p=0.8, lam=1.0)
    assert isinstance(spec.params.lam, float)  # a JSON integer where a float is declared
    described = spec.describe()
    assert described["policy"] == "crystal" and described["budget"] == "64" and described["top_p"] == 0.8
    assert described["window"] == 16


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_every_policy_builds_with_defaults(policy, calibration):
    config = {"calibration": calibration} if policy == "thinkv" else {}
    spec = make_spec(policy, parse_budget(256), config)
    assert spec.settings == Settings()
    assert create_policy(spec).name == policy


@pytest.mark.parametrize(
    "policy, config, message",
    [
        ("crystal", {"topp": 0.9}, r"unknown eviction setting\(s\) topp for policy 'crystal'; accepted: .*top_p"),
        ("rkv", {"top_p": 0.9}, r"unknown eviction setting\(s\) top_p for policy 'rkv'; accepted: .*similarity"),
        ("h2o", {"lam": 0.5, "alpha": 1}, r"unknown eviction setting\(s\) alpha, lam for policy 'h2o'"),
        ("none", {"pool_kernel": 7}, r"unknown eviction setting\(s\) pool_kernel"),
    ],
)
def test_unknown_keys_list_the_accepted_ones(policy, config, message):
    with pytest.raises(ConfigError, match=message):
        make_spec(policy, parse_budget(256), config)


@pytest.mark.parametrize(
    "policy, config",
    [
        ("crystal", {"top_p": "high"}),
        ("crystal", {"top_p": True}),
        ("crystal", {"lam": None}),
        ("crystal", {"window": "8"}),
        ("crystal", {"window": 8.0}),
        ("crystal", {"window": True}),
        ("crystal", {"protect_prompt": 1}),
        ("crystal", {"protect_prompt": "yes"}),
        ("crystal", {"end_of_think": 5}),
        ("rkv", {"pool_kernel": 7.0}),
        ("thinkv", {"bits_transition": 2.5}),
        ("thinkv", {"calibration": 3}),
        ("random", {"seed": "7"}),
        ("crystal", {"realloc_period": 12.5}),
    ],
)
def test_wrong_types_name_the_expected_type(policy, config):
    (key,) = config
    with pytest.raises(ConfigError, match=f"^{key}=.* has the wrong type: expected "):
        make_spec(policy, parse_budget(256), config)


@pytest.mark.parametrize(
    "policy, config, message",
    [
        ("crystal", '{"top_p": NaN}', "top_p=nan must be a finite number"),
        ("crystal", '{"lam": Infinity}', "lam=inf must be a finite number"),
        ("crystal", {"top_p": 0}, r"top_p=0.0 must lie in \(0, 1\]"),
        ("crystal", {"top_p": 1.5}, r"top_p=1.5 must lie in \(0, 1\]"),
        ("crystal-lite", {"lam": -0.1}, r"lam=-0.1 must lie in \[0, 1\]"),
        ("rkv", {"lam": 2}, r"lam=2.0 must lie in \[0, 1\]"),
        ("rkv", {"similarity_threshold": 1.5}, r"must lie in \[-1, 1\]"),
        ("snapkv", {"pool_kernel": 4}, "pool_kernel=4 must be a positive odd number"),
        ("snapkv", {"pool_kernel": 0}, "pool_kernel=0 must be a positive odd number"),
        ("snapkv", {"pool_kernel": 2**62 + 1}, f"must be a positive odd number up to {MAX_ENTRIES}"),
        ("crystal", {"window": -1}, rf"window=-1 must lie in \[0, {MAX_ENTRIES}\]"),
        ("crystal", {"sinks": -1}, r"sinks=-1 must lie in \[0, "),
        ("crystal", {"window": 10**9}, rf"window=1000000000 must lie in \[0, {MAX_ENTRIES}\]"),
        ("crystal", {"buffer": 10**12}, r"buffer=1000000000000 must lie in \[0, "),
        ("crystal", {"buffer": 0}, "buffer must be at least 1 entry"),
        ("crystal", {"end_of_think": ""}, "end_of_think must be a non-empty marker or null"),
        ("random", {"seed": 10**30}, r"seed=1000000000000000000000000000000 must lie in \[0, 2\*\*63\)"),
        ("crystal", {"realloc_period": 0}, rf"realloc_period=0 must lie in \[1, {MAX_ENTRIES}\] tokens"),
        ("crystal", {"realloc_floor": 1.5}, r"realloc_floor=1.5 must lie in \[0, 1\] \(a share of the budget\)"),
        ("crystal", {"realloc_signal": "x"}, "realloc_signal='x' is not one of 'crf-per-slot', 'slots-per-crf'"),
        ("crystal", {"realloc_power": -1}, r"realloc_power=-1.0 must lie in \[0, 8.0\] \(0: equal shares above"),
        ("crystal", {"realloc_power": 9}, r"realloc_power=9.0 must lie in \[0, 8.0\]"),
        ("random", {"seed": -1}, r"seed=-1 must lie in \[0, 2\*\*63\)"),
        ("thinkv", {"segment": 6, "floor": 4}, "segment=6 must be at least twice floor=4"),
        ("thinkv", {"floor": 0}, r"floor=0 \(floor >= 1\)"),
        ("thinkv", {"bits_reasoning": 0}, r"bits_reasoning=0 must lie in \[1, 16\]"),
        ("thinkv", {"bits_execution": 17}, r"bits_execution=17 must lie in \[1, 16\]"),
        ("thinkv", {"group": 0}, "group must be at least 1"),
        ("thinkv", {"kmeans_iterations": -1}, "kmeans_iterations in"),
        ("thinkv", {"kmeans_iterations": 10**9}, "kmeans_iterations in"),
        ("thinkv", {"segment": 2**40, "floor": 4}, f"segment=1099511627776 must be at most {MAX_ENTRIES}"),
    ],
)
def test_out_of_range_values_are_refused(policy, config, message, calibration):
    if policy == "thinkv":
        config = {"calibration": calibration, **config}
    with pytest.raises(ConfigError, match=message) as refused:
        make_spec(policy, parse_budget(256), config)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    "budget, config",
    [(12, {}), (5, {}), (10, {"sinks": 2, "window": 8}), (1, {"sinks": 0, "window": 1}), (4, {"window": 0})],
)
def test_budget_must_exceed_the_protected_window(budget, config):
    settings_ = Settings(**config)
    with pytest.raises(ConfigError) as refused:
        make_spec("crystal", parse_budget(budget), config)
    assert str(refused.value) == (
        f"budget {budget} is not above the protected window (sinks {settings_.sinks} + window {settings_.window} = "
        f"{settings_.protected_window}): raise the budget or lower sinks/window"
    )


def test_budget_just_above_the_protected_window_is_accepted():
    assert make_spec("crystal", parse_budget(13)).budget.entries == 13
    assert make_spec("crystal", parse_budget(2), {"sinks": 0, "window": 1}).budget.entries == 2
    assert make_spec("crystal", parse_budget("1%")).budget.ratio == 0.01  # shares are resolved per request


def test_build_spec_without_policy_parameters():
    spec = build_spec("h2o", parse_budget(64), {"window": 4}, None)
    assert spec.params is None and spec.settings.window == 4
    assert spec.describe()["window"] == 4


def test_large_seed_reaches_the_generator():
    spec = make_spec("random", parse_budget(64), {"seed": 2**63 - 1})
    evictor = make_evictor(spec, 4, 100)
    assert evictor.state.extra["generator"].initial_seed() == 2**63 - 1


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["top_p", "lam", "window", "sinks", "buffer", "protect_prompt", "seed", "pool_kernel"]),
        st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True), st.text(max_size=3)),
        max_size=4,
    ),
    st.sampled_from(["crystal", "rkv", "h2o"]),
)
def test_any_config_is_accepted_or_refused_with_a_config_error(config, policy):
    """Nothing but a ConfigError escapes validation, and an accepted spec always makes a working policy."""
    try:
        spec = make_spec(policy, parse_budget(5000), json.dumps(config))
    except ConfigError as error:
        assert str(error) and "\n" not in str(error)
        return
    params_type = policy_class(policy).Params
    assert spec.params is None or isinstance(spec.params, params_type)
    if isinstance(spec.params, (LRFUParams, RKVParams)):
        assert 0 <= spec.params.lam <= 1
    evictor = make_evictor(spec, 4, 100)
    assert evictor.budget == 5000
