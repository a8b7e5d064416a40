"""Pool savings where SGLang reports pool usage: the decode log line and the Prometheus metrics (`--enable-metrics`).

"Saved" counts the KV slots the running requests would hold without eviction minus the slots they hold: the memory
eviction gave back to the allocator for other requests. The metrics are created in the scheduler process with the
labels of SGLang's own scheduler metrics, so `/metrics` shows them beside `sglang:token_usage`.
"""

from __future__ import annotations

from dataclasses import dataclass

PREFIX = "crystal_kv"


@dataclass
class PoolSavings:
    saved: int = 0  # slots given back by eviction, over the running requests
    retained: int = 0  # slots the evicting requests hold


class EvictionMetrics:
    """Prometheus gauges and counters of in-flight eviction; built only when SGLang collects metrics."""

    def __init__(self, collector):
        from prometheus_client import Counter, Gauge  # after SGLang set PROMETHEUS_MULTIPROC_DIR, as its own code does

        names, labels = list(collector.labels), dict(collector.labels)
        self.saved = Gauge(f"{PREFIX}:saved_tokens", "KV slots the running requests would hold without eviction, "
                           "minus those they hold.", labelnames=names, multiprocess_mode="mostrecent")  # fmt: skip
        self.retained = Gauge(f"{PREFIX}:retained_tokens", "KV slots held by the requests that evict.",
                              labelnames=names, multiprocess_mode="mostrecent")  # fmt: skip
        self.evicted = Counter(f"{PREFIX}:evicted_tokens", "KV slots freed by eviction.", labelnames=names)
        self.relieved = Counter(f"{PREFIX}:pressure_reliefs", "Times budgets were halved instead of retracting.",
                                labelnames=names)  # fmt: skip
        # The series exist (at 0) from the start, so a scrape before the first eviction sees them.
        self.saved, self.retained, self.evicted, self.relieved = (
            metric.labels(**labels) for metric in (self.saved, self.retained, self.evicted, self.relieved)
        )

    @classmethod
    def for_scheduler(cls, scheduler) -> "EvictionMetrics | None":
        collector = getattr(scheduler, "metrics_collector", None)
        return None if collector is None else cls(collector)

    def record(self, savings: PoolSavings, freed: int, reliefs: int) -> None:
        self.saved.set(savings.saved)
        self.retained.set(savings.retained)
        self.evicted.inc(freed)
        self.relieved.inc(reliefs)


def usage_message(savings: PoolSavings) -> str:
    """The part added to SGLang's "Decode batch" log line."""
    return f"#kv-evict saved token: {savings.saved}, #kv-evict retained token: {savings.retained}"
