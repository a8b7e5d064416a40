"""Stages of a reasoning turn along a token path, and the LRFU score that orders cached prefixes (no SGLang here).

A reasoning turn reads `prompt <think> reasoning </think> answer`. Reasoning chat templates drop the think part
from the history they send on the next turn, so the KV of tokens from a think-start marker on is reused only by
a request that replays the same reasoning (a retry), while prompt tokens, and answers as resent inside later
prompts, are reused by every later turn of the conversation. `patches/radix_policy.py` ranks cached radix nodes
with this: think-stage nodes first, then everything else by LRFU (Crystal-KV's combined recency and frequency).

Stages of the tokens on one root-to-leaf path: PROMPT until a think-start marker, THINK from the first token of
that marker through the last token of the end-of-think marker, ANSWER after it (a later think-start opens THINK
again). A node's stage is the stage of its first token: a node that starts with prompt tokens can still be
matched by a later prompt even if it ends inside a think block, one that starts inside a think block cannot.
Markers are token-id sequences and may straddle node boundaries: the state passed down a path keeps the last
few tokens for that.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

_ITEM_BYTES = array("q").itemsize


class Stage(IntEnum):
    PROMPT = 0
    THINK = 1
    ANSWER = 2


EVICTION_RANK = {Stage.THINK: 0, Stage.PROMPT: 1, Stage.ANSWER: 1}  # lower ranks are evicted first


@dataclass(frozen=True)
class PathState:
    """Where a token path stands after its last token: its stage and its last few tokens (a marker may begin
    there and end in the next node)."""

    stage: Stage = Stage.PROMPT
    tail: tuple[int, ...] = ()


@dataclass(frozen=True)
class ThinkMarkers:
    """Think-start and end-of-think markers as token-id sequences (either may be empty: never matched)."""

    start: tuple[int, ...]
    end: tuple[int, ...]

    @property
    def active(self) -> bool:
        return bool(self.start or self.end)

    def scan(self, before: PathState, tokens: Sequence[int]) -> tuple[Stage, PathState]:
        """The stage of `tokens[0]` and the state after the last token, given the state before `tokens`."""
        sequence = array("q", before.tail)
        first = len(sequence)
        sequence.extend(array("q", tokens))
        data = sequence.tobytes()
        stage, first_stage, position = before.stage, None, 0
        while True:
            marker = self.end if stage is Stage.THINK else self.start
            if not marker:
                break
            # only occurrences that end in `tokens`: the tail's own markers were counted by the path before
            found = _find(data, marker, max(position, first - len(marker) + 1))
            if found < 0:
                break
            if first_stage is None:
                first_stage = Stage.THINK if found <= first else stage
            stage = Stage.ANSWER if stage is Stage.THINK else Stage.THINK
            position = found + len(marker)
        keep = max(len(self.start), len(self.end)) - 1
        tail = tuple(sequence[-keep:]) if keep > 0 else ()
        return (stage if first_stage is None else first_stage), PathState(stage, tail)


def _find(data: bytes, marker: tuple[int, ...], start: int) -> int:
    """Index of the first occurrence of `marker` in the int64 token bytes `data` at token index >= start, or -1."""
    needle = array("q", marker).tobytes()
    offset = start * _ITEM_BYTES
    while True:
        found = data.find(needle, offset)
        if found < 0:
            return -1
        if found % _ITEM_BYTES == 0:
            return found // _ITEM_BYTES
        offset = (found // _ITEM_BYTES + 1) * _ITEM_BYTES


@dataclass
class LRFUScore:
    """Crystal-KV's combined recency and frequency for one cached prefix: at each reference at time t,
    CRF = 1 + 2^(-lambda * (t - t_last)) * CRF; between references it decays by the same factor.

    Kept as log2 so that long-idle prefixes still compare (2^-x underflows to 0 for all of them alike)."""

    log_crf: float = -math.inf  # log2 of the CRF at `last`; -inf: never referenced
    last: float = 0.0
    references: int = 0

    def value(self, now: float, lam: float) -> float:
        """log2 of the CRF decayed to `now`."""
        return self.log_crf - lam * (now - self.last)

    def reference(self, now: float, lam: float, count: int = 1) -> None:
        for _ in range(count):
            decayed = self.value(now, lam)
            self.log_crf = math.log2(1.0 + 2.0**decayed)
            self.last = now
        self.references += count
