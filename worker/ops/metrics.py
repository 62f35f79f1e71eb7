"""The worker's Prometheus metrics, in a registry of its own.

Counters count events since the process started; rates (records and tokens per second) are
what Prometheus derives from them with rate(), so the worker exports no rate of its own. A
registry per WorkerMetrics keeps tests, and several workers in one process, apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# The counters a run reports as it stops, by name without the streamsink_ prefix.
SUMMARY_COUNTERS = (
    "records",
    "commentaries",
    "new_streams",
    "restored_streams",
    "evicted_streams",
    "prefill_tokens",
    "dead_letter_records",
    "bad_states",
    "fenced_writes",
    "replayed_outputs",
    "redelivered_commentaries",
    "checkpoint_bytes",
)
_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._declare_stream_metrics()
        self._declare_state_metrics()
        self.errors = self._counter("errors", "errors by kind", "kind")
        self.dead_letters = self._counter(
            "dead_letter_records", "records set aside, by reason", "reason"
        )
        self.live_streams = self._gauge(
            "live_streams", "stream caches in memory (at most --max-live-streams)"
        )
        self.partitions_owned = self._gauge("partitions_owned", "input partitions owned")
        self.partitions_unowned = self._gauge(
            "partitions_unowned", "input partitions with lag that no member of the group owns"
        )
        self.consumer_lag = self._gauge(
            "consumer_lag_records", "records behind the partition's end", "partition"
        )

    def _declare_stream_metrics(self) -> None:
        self.records = self._counter("records", "records applied to a stream")
        self.tokens = self._counter("tokens", "tokens fed to the model")
        self.prefill_tokens = self._counter(
            "prefill_tokens",
            "tokens prefilled to build a stream's cache from nothing (a restore adds none)",
        )
        self.new_streams = self._counter("new_streams", "streams started afresh")
        self.replayed_records = self._counter(
            "replayed_records", "records skipped because the stream's state already covers them"
        )
        self.commentaries = self._counter("commentaries", "commentaries written")
        self.commentary_seconds = self._histogram(
            "commentary_seconds", "time to write one commentary"
        )

    def _declare_state_metrics(self) -> None:
        self.bad_states = self._counter(
            "bad_states", "saved states that could not be used, by kind", "kind"
        )
        self.checkpoints = self._counter("checkpoints", "checkpoints committed")
        self.checkpoint_seconds = self._histogram(
            "checkpoint_seconds", "time of one checkpoint commit"
        )
        self.checkpoint_bytes = self._counter("checkpoint_bytes", "bytes written by checkpoints")
        self.restore_seconds = self._histogram("restore_seconds", "time to restore one stream")
        self.restored_streams = self._counter(
            "restored_streams", "streams restored from saved state (after a move or an eviction)"
        )
        self.evicted_streams = self._counter(
            "evicted_streams", "saved stream caches dropped from memory to stay within the budget"
        )
        self.fenced_writes = self._counter(
            "fenced_writes",
            "checkpoint writes refused because another worker owns the partition now",
        )
        self.replayed_outputs = self._counter(
            "replayed_outputs", "committed commentary re-sent after a takeover"
        )
        self.redelivered_commentaries = self._counter(
            "redelivered_commentaries",
            "commentary sent again that may have been delivered already (the same stream, seq "
            "and text): a takeover's replay, or a send again after a failed flush",
        )
        self.dead_letters_held_back = self._counter(
            "dead_letters_held_back",
            "dead letters in doubt (a takeover's replay, a failed flush) not sent again: their "
            "topic had them already",
        )

    def _counter(self, name: str, documentation: str, *labels: str) -> Counter:
        return Counter(f"streamsink_{name}", documentation, labels, registry=self.registry)

    def _gauge(self, name: str, documentation: str, *labels: str) -> Gauge:
        return Gauge(f"streamsink_{name}", documentation, labels, registry=self.registry)

    def _histogram(self, name: str, documentation: str) -> Histogram:
        return Histogram(
            f"streamsink_{name}", documentation, buckets=_SECONDS, registry=self.registry
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def summary(self) -> dict[str, float]:
        """The stop summary: each of SUMMARY_COUNTERS, summed over its labels."""
        return {name: self.value(f"streamsink_{name}") for name in SUMMARY_COUNTERS}

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value, summed over unnamed labels; counters with or without _total.

        For a histogram, ask for `<name>_count` or `<name>_sum`.
        """
        wanted = {name, f"{name}_total"}
        total = 0.0
        for family in self.registry.collect():
            for sample in family.samples:
                if sample.name in wanted and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total
