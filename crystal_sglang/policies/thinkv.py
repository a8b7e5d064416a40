"""ThinKV: thought-type-aware eviction (TBE) and quantization (TBQ).

Generated tokens form segments of `segment` tokens. A finished segment is labelled by the mean attention
sparsity of its decode steps (share of an attention row below 1 % of the row's max, averaged over the
calibrated layers and their query heads) against two calibrated thresholds: Transition (sparsest), Reasoning,
Execution (densest). Its keys and values are then stored at the type's precision (Reasoning/Execution/Transition
4/4/2 bits by default, groups of 16).

Eviction demotes whole segments through retention levels (segment/2, segment/4, ... down to `floor`): when a
new Transition segment appears every earlier segment goes down one level; while the cache is over budget the
oldest segment of the least important type (Transition < Execution < Reasoning) goes down one level. A demoted
segment keeps, per KV head, the real keys nearest to the k-means centroids of its keys.

Choices made here (docs/DESIGN.md): the segment length is capped at a quarter of the budget (at least 16) so
that small budgets still hold several segments; when every segment sits at the floor and the cache is still over
budget, the two oldest floor segments merge into one floor segment, which bounds memory without ever deleting a
segment outright; segments at or after the end-of-think marker are the answer and are never demoted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from crystal_sglang.config import MAX_ENTRIES, ConfigError
from crystal_sglang.policies.base import (
    Decision,
    EvictionPolicy,
    PolicyState,
    QuantizeOrder,
    ScoreNeeds,
    SelectionInput,
    StepScores,
    member_slots,
)

TRANSITION, EXECUTION, REASONING = 0, 1, 2  # ascending importance
KIND_NAMES = {TRANSITION: "transition", EXECUTION: "execution", REASONING: "reasoning"}
CALIBRATION_RESOURCE = "thinkv_calibration.json"
MAX_KMEANS_ITERATIONS = 1000


@dataclass(frozen=True)
class ThinKVParams:
    segment: int = 128
    floor: int = 4
    bits_reasoning: int = 4
    bits_execution: int = 4
    bits_transition: int = 2
    group: int = 16
    kmeans_iterations: int = 8
    calibration: str | None = None  # thresholds file; default: the one shipped for the default model

    def validate(self) -> None:
        if self.segment < 2 * self.floor or self.floor < 1:
            raise ConfigError(f"segment={self.segment} must be at least twice floor={self.floor} (floor >= 1)")
        for name in ("bits_reasoning", "bits_execution", "bits_transition"):
            if not 1 <= getattr(self, name) <= 16:
                raise ConfigError(f"{name}={getattr(self, name)} must lie in [1, 16] (16 keeps full precision)")
        for name in ("segment", "floor", "group"):
            if getattr(self, name) > MAX_ENTRIES:
                raise ConfigError(f"{name}={getattr(self, name)} must be at most {MAX_ENTRIES}")
        if self.group < 1 or not 0 <= self.kmeans_iterations <= MAX_KMEANS_ITERATIONS:
            raise ConfigError(f"group must be at least 1 and kmeans_iterations in [0, {MAX_KMEANS_ITERATIONS}]")
        load_calibration(self.calibration)  # a missing thresholds file is a bad setting: report it up front


@dataclass(frozen=True)
class Calibration:
    layers: tuple[int, ...]
    thresholds: tuple[float, float]  # (execution|reasoning boundary, reasoning|transition boundary)

    def classify(self, sparsity: float) -> int:
        low, high = self.thresholds
        if sparsity >= high:
            return TRANSITION
        return REASONING if sparsity >= low else EXECUTION


def load_calibration(path: str | None) -> Calibration:
    try:
        if path is None:
            text = resources.files("crystal_sglang").joinpath("data", CALIBRATION_RESOURCE).read_text()
        else:
            text = Path(path).read_text()
        data = json.loads(text)
        return Calibration(layers=tuple(data["layers"]), thresholds=tuple(data["thresholds"]))
    except (OSError, KeyError, ValueError) as error:
        raise ConfigError(
            f"ThinKV needs sparsity thresholds ({error}): run `crystal-sglang calibrate-thinkv` and pass its "
            'output as {"calibration": "PATH"}'
        ) from None


def kmeans_survivors(
    keys: torch.Tensor, keep_count: int, must_keep: torch.Tensor, iterations: int
) -> torch.Tensor:
    """Per row of keys [R, c, d]: a bool [R, c] marking `must_keep` plus the real keys nearest to the k-means
    centroids of the others, `keep_count` in all (or just `must_keep` where that is already as many)."""
    rows, count, _ = keys.shape
    chosen = must_keep.clone()
    wanted = keep_count - int(must_keep.sum(-1).max())
    free = ~must_keep
    if wanted <= 0:
        return chosen
    points = keys.to(torch.float32)
    # Deterministic start: evenly spaced free keys.
    free_rank = torch.cumsum(free.to(torch.int64), -1) - 1
    free_count = free.sum(-1, keepdim=True)
    targets = (torch.arange(wanted).view(1, wanted) * free_count) // wanted  # [R, k]
    start = torch.argmax(((free_rank.unsqueeze(1) == targets.unsqueeze(-1)) & free.unsqueeze(1)).to(torch.int8), -1)
    centroids = torch.gather(points, 1, start.unsqueeze(-1).expand(-1, -1, points.shape[-1]))
    for _ in range(iterations):
        distance = torch.cdist(points, centroids).masked_fill(~free.unsqueeze(-1), float("inf"))  # [R, c, k]
        assign = distance.argmin(-1)
        one_hot = torch.nn.functional.one_hot(assign, wanted).to(torch.float32) * free.unsqueeze(-1)
        members = one_hot.sum(1)  # [R, k]
        sums = one_hot.transpose(1, 2) @ points  # [R, k, d]
        centroids = torch.where(members.unsqueeze(-1) > 0, sums / members.clamp_min(1).unsqueeze(-1), centroids)
    distance = torch.cdist(centroids, points)  # [R, k, c]
    for j in range(wanted):
        candidate = distance[:, j].masked_fill(chosen, float("inf"))
        pick = candidate.argmin(-1)
        has_free = torch.isfinite(torch.gather(candidate, 1, pick.unsqueeze(-1))).squeeze(-1)
        chosen[torch.arange(rows)[has_free], pick[has_free]] = True
    return chosen


class ThinKV(EvictionPolicy):
    name = "thinkv"
    Params = ThinKVParams
    changes_precision = True
    acts_within_budget = True  # segments are quantized as they close, and a transition demotes under budget

    def __init__(self, spec):
        super().__init__(spec)
        self.calibration = load_calibration(self.params.calibration)

    @property
    def needs(self) -> ScoreNeeds:
        return ScoreNeeds(sparsity=True, keys_at_selection=True)

    def segment_length(self, budget: int) -> int:
        return max(2 * self.params.floor, min(self.params.segment, max(16, budget // 4)))

    def new_state(self, shape, device="cpu") -> PolicyState:
        state = super().new_state(shape, device)
        state.extra.update(segments=[], open_start=None, open_sparsity=[], to_quantize=[], transition_at=None)
        return state

    def observe(self, state: PolicyState, scores: StepScores, step: int, valid: torch.Tensor) -> None:
        extra = state.extra
        if extra["open_start"] is None:
            extra["open_start"] = step
        layers = [layer for layer in self.calibration.layers if layer < scores.sparsity.shape[0]]
        extra["open_sparsity"].append(float(scores.sparsity[layers].mean()))
        length = self.segment_length(state.budget)
        if step + 1 - extra["open_start"] < length:
            return
        kind = self.calibration.classify(sum(extra["open_sparsity"]) / len(extra["open_sparsity"]))
        segment = {"start": extra["open_start"], "end": step + 1, "kind": kind, "level": length}
        if kind == TRANSITION and extra["segments"]:
            extra["transition_at"] = segment["start"]
        extra["segments"].append(segment)
        extra["to_quantize"].append(segment)
        extra["open_start"], extra["open_sparsity"] = None, []

    def pending(self, state: PolicyState) -> bool:
        return state.extra["transition_at"] is not None

    def transforms(self, state: PolicyState, selection: SelectionInput) -> list[QuantizeOrder]:
        orders = []
        bits = {REASONING: self.params.bits_reasoning, EXECUTION: self.params.bits_execution,
                TRANSITION: self.params.bits_transition}  # fmt: skip
        for segment in state.extra["to_quantize"]:
            if bits[segment["kind"]] >= 16:
                continue
            member = self._members(selection, segment)
            entries = member_slots(member, int(member.sum(-1).min()))
            orders.append(QuantizeOrder(entries=entries, bits=bits[segment["kind"]], group=self.params.group))
        state.extra["to_quantize"] = []
        return orders

    @staticmethod
    def _members(selection: SelectionInput, segment: dict) -> torch.Tensor:
        positions = selection.positions
        return (positions >= segment["start"]) & (positions < segment["end"]) & selection.valid

    def select(self, state: PolicyState, selection: SelectionInput) -> Decision:
        keep = selection.valid.clone()
        segments = state.extra["segments"]
        answer_start = self._answer_start(selection)
        demotable = [s for s in segments if s["end"] <= answer_start]
        if state.extra["transition_at"] is not None:
            for segment in [s for s in demotable if s["end"] <= state.extra["transition_at"]]:
                self._demote(state, selection, keep, segment)
            state.extra["transition_at"] = None
        budget = int(selection.budgets.max())
        while int(keep.sum(-1).max()) > budget:
            candidates = [s for s in demotable if s["level"] > self.params.floor]
            if candidates:
                victim = min(candidates, key=lambda s: (s["kind"], s["start"]))
                self._demote(state, selection, keep, victim)
                continue
            floor_segments = [s for s in demotable if s["level"] <= self.params.floor]
            if len(floor_segments) < 2:
                break
            first, second = floor_segments[0], floor_segments[1]
            merged = {"start": first["start"], "end": second["end"], "kind": max(first["kind"], second["kind"]),
                      "level": 2 * self.params.floor}  # fmt: skip
            segments[segments.index(first)] = merged
            segments.remove(second)
            demotable = [s for s in segments if s["end"] <= answer_start]
            self._demote(state, selection, keep, merged)
        count = int(keep.sum(-1).max())
        kept = member_slots(keep, count)
        kept_valid = torch.gather(keep, -1, kept)
        order = torch.sort(kept.masked_fill(~kept_valid, keep.shape[-1]), dim=-1, stable=True).indices
        kept, kept_valid = torch.gather(kept, -1, order), torch.gather(kept_valid, -1, order)
        return Decision(keep=kept, keep_valid=None if bool(kept_valid.all()) else kept_valid)

    @staticmethod
    def _answer_start(selection: SelectionInput) -> int:
        """First position no demotion may touch: the protected tail (the window, and the answer when it began)."""
        unprotected_generated = selection.valid & ~selection.protected
        if not bool(unprotected_generated.any()):
            return 0
        newest_evictable = int(selection.positions.masked_fill(~unprotected_generated, -1).max())
        return newest_evictable + 1

    def _demote(self, state: PolicyState, selection: SelectionInput, keep: torch.Tensor, segment: dict) -> None:
        new_level = max(self.params.floor, segment["level"] // 2)
        member = self._members(selection, segment) & keep
        count = int(member.sum(-1).max())
        if count <= new_level:
            segment["level"] = new_level
            return
        layers, heads, _ = keep.shape
        index = member_slots(member, count)
        keys = torch.gather(
            selection.context.keys(), 2, index.unsqueeze(-1).expand(-1, -1, -1, state.shape.head_dim)
        )
        protected = torch.gather(selection.protected, -1, index)
        survivors = kmeans_survivors(
            keys.reshape(layers * heads, count, -1), new_level, protected.reshape(layers * heads, count),
            self.params.kmeans_iterations,
        ).reshape(layers, heads, count)  # fmt: skip
        keep.scatter_(-1, index, torch.gather(keep, -1, index) & survivors)
        segment["level"] = new_level
