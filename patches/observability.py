"""Pool savings where SGLang reports pool usage: the decode log line and the Prometheus metrics (`--enable-metrics`).

"Saved" counts the KV slots the running requests would hold without eviction minus the slots they hold: the memory
eviction gave back to the allocator for other requests. "State" is the memory eviction itself holds for them beside
the pool: per-entry positions and policy statistics, which the pool's sizing leaves room for (`pool_sizing`), and
query windows, which it does not. The time share is eviction's part of the decode steps' wall time (scoring,
observe, decide, compaction), measured inside each step. The metrics are created in the scheduler process with
the labels of SGLang's own scheduler metrics, so `/metrics` shows them beside `sglang:token_usage`.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "crystal_kv"


@dataclass
class PoolSavings:
    saved: int = 0  # slots given back by eviction, over the running requests
    retained: int = 0  # slots the evicting requests hold
    state_bytes: int = 0  # eviction's own memory beside the pool, over the tracked requests


class EvictionMetrics:
    """Prometheus gauges and counters of in-flight eviction; built only when SGLang collects metrics."""

    def __init__(self, collector):
        from prometheus_client import Counter, Gauge  # after SGLang set PROMETHEUS_MULTIPROC_DIR, as its own code does

        names, labels = list(collector.labels), dict(collector.labels)

        def gauge(name: str, meaning: str):
            return Gauge(f"{PREFIX}:{name}", meaning, labelnames=names, multiprocess_mode="mostrecent").labels(**labels)

        def counter(name: str, meaning: str):
            return Counter(f"{PREFIX}:{name}", meaning, labelnames=names).labels(**labels)

        # Labelled at once, so the series exist (at 0) from the start and a scrape before the first eviction sees them.
        self.saved = gauge("saved_tokens", "KV slots the running requests would hold without eviction, minus those "
                           "they hold.")  # fmt: skip
        self.retained = gauge("retained_tokens", "KV slots held by the requests that evict.")
        self.state_bytes = gauge("state_bytes", "Memory eviction holds beside the KV pool for the running requests: "
                                 "per-entry positions and statistics, query windows.")  # fmt: skip
        self.evicted = counter("evicted_tokens", "KV slots freed by eviction.")
        self.relieved = counter("pressure_reliefs", "Times budgets were halved instead of retracting.")
        self.policy_seconds = counter("policy_seconds", "Wall time of eviction work in decode steps.")
        self.decode_seconds = counter("decode_seconds", "Wall time of the decode steps (forward pass to the end of "
                                      "eviction).")  # fmt: skip
        self._clock_seen = (0.0, 0.0)

    @classmethod
    def for_scheduler(cls, scheduler) -> "EvictionMetrics | None":
        collector = getattr(scheduler, "metrics_collector", None)
        return None if collector is None else cls(collector)

    def record(self, savings: PoolSavings, freed: int, reliefs: int, clock) -> None:
        self.saved.set(savings.saved)
        self.retained.set(savings.retained)
        self.state_bytes.set(savings.state_bytes)
        self.evicted.inc(freed)
        self.relieved.inc(reliefs)
        self.policy_seconds.inc(clock.policy - self._clock_seen[0])
        self.decode_seconds.inc(clock.steps - self._clock_seen[1])
        self._clock_seen = (clock.policy, clock.steps)


def usage_message(savings: PoolSavings, time_share: float | None) -> str:
    """The part added to SGLang's "Decode batch" log line; `time_share`: eviction's share of the decode steps since
    the previous line."""
    share = "n/a" if time_share is None else f"{100 * time_share:.1f}%"
    return (f"#kv-evict saved token: {savings.saved}, #kv-evict retained token: {savings.retained}, "
            f"#kv-evict time: {share}")
