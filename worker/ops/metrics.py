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
    "prefill_tokens",
    "dead_letter_records",
    "bad_states",
    "fenced_writes",
    "replayed_outputs",
    "checkpoint_bytes",
)
_SECONDS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.records = Counter("streamsink_records", "records applied to a stream", registry=r)
        self.tokens = Counter("streamsink_tokens", "tokens fed to the model", registry=r)
        self.prefill_tokens = Counter(
            "streamsink_prefill_tokens",
            "tokens prefilled to build a stream's cache from nothing (a restore adds none)",
            registry=r,
        )
        self.new_streams = Counter("streamsink_new_streams", "streams started afresh", registry=r)
        self.replayed_records = Counter(
            "streamsink_replayed_records",
            "records skipped because the stream's state already covers them",
            registry=r,
        )
        self.commentaries = Counter("streamsink_commentaries", "commentaries written", registry=r)
        self.commentary_seconds = Histogram(
            "streamsink_commentary_seconds", "time to write one commentary", buckets=_SECONDS,
            registry=r,
        )  # fmt: skip
        self.dead_letters = Counter(
            "streamsink_dead_letter_records", "records set aside, by reason", ["reason"],
            registry=r,
        )  # fmt: skip
        self.errors = Counter("streamsink_errors", "errors by kind", ["kind"], registry=r)
        self.bad_states = Counter(
            "streamsink_bad_states", "saved states that could not be used, by kind", ["kind"],
            registry=r,
        )  # fmt: skip
        self.checkpoints = Counter("streamsink_checkpoints", "checkpoints committed", registry=r)
        self.checkpoint_seconds = Histogram(
            "streamsink_checkpoint_seconds", "time of one checkpoint commit", buckets=_SECONDS,
            registry=r,
        )  # fmt: skip
        self.checkpoint_bytes = Counter(
            "streamsink_checkpoint_bytes", "bytes written by checkpoints", registry=r
        )
        self.restore_seconds = Histogram(
            "streamsink_restore_seconds", "time to restore one stream", buckets=_SECONDS,
            registry=r,
        )  # fmt: skip
        self.restored_streams = Counter(
            "streamsink_restored_streams", "streams restored from saved state", registry=r
        )
        self.fenced_writes = Counter(
            "streamsink_fenced_writes",
            "checkpoint writes refused because another worker owns the partition now",
            registry=r,
        )
        self.replayed_outputs = Counter(
            "streamsink_replayed_outputs",
            "committed commentary re-sent after a takeover",
            registry=r,
        )
        self.streams_owned = Gauge("streamsink_streams_owned", "streams in memory", registry=r)
        self.partitions_owned = Gauge(
            "streamsink_partitions_owned", "input partitions owned", registry=r
        )
        self.consumer_lag = Gauge(
            "streamsink_consumer_lag_records", "records behind the partition's end",
            ["partition"], registry=r,
        )  # fmt: skip

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
