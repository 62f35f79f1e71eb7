"""One scenario's own topics, group and key prefix, and the checks every scenario shares:
its commentary against an uninterrupted run's, and the worker's HTTP endpoints."""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.integration.worker_harness import (
    STREAMS,
    Topics,
    Worker,
    create_topics,
    produce_lines,
    wait_for_commentary,
)


def _name(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


class Cluster:
    """Topics, a group and a key prefix of their own for one scenario."""

    def __init__(self, label: str, kafka, redis, log_dir: Path, partitions: int = 4) -> None:
        self.name = _name(label)
        self.bootstrap, self.redis_url = kafka.bootstrap, redis.url
        self.redis_options = ["--redis-cluster"] if redis.cluster else []
        self.topics: Topics = create_topics(self.bootstrap, self.name, partitions)
        self.log_dir = log_dir
        self.workers: list[Worker] = []

    def worker(self, label: str, *extra: str) -> Worker:
        worker = Worker(
            f"{self.name}-{label}",
            self.log_dir,
            self.bootstrap,
            self.redis_url,
            self.topics,
            group=self.name,
            prefix=self.name,
            extra=[*self.redis_options, *extra],
        )
        self.workers.append(worker)
        return worker

    def produce(self, part: slice = slice(None)) -> None:
        produce_lines(self.bootstrap, self.topics.input, part)

    def wait_for(self, wanted: set[tuple[str, int]]) -> list[dict]:
        return wait_for_commentary(self.bootstrap, self.topics.output, wanted)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop_quietly()


def check_against(reference: dict, records: list[dict]) -> None:
    """Same text per (stream, seq); every input offset covered; repeats carry a known seq."""
    by_key: dict[tuple[str, int], set[str]] = {}
    for r in records:
        by_key.setdefault((r["stream_id"], r["seq"]), set()).add(r["text"])
    assert set(by_key) == set(reference)
    for key, texts in by_key.items():
        assert texts == {reference[key]}, key
    for stream, lines in STREAMS.items():
        seqs = sorted({r["seq"] for r in records if r["stream_id"] == stream})
        assert seqs == list(range(len(lines) // 4))
        spans = {(r["first_offset"], r["last_offset"]) for r in records if r["stream_id"] == stream}
        covered = sorted(o for first, last in spans for o in range(first, last + 1))
        assert len(covered) == len(set(covered)) == len(lines), (stream, spans)


def sample(text: str, name: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(lines[0].split()[-1]) if lines else 0.0


def metrics_port(worker: Worker) -> int:
    """The port the worker serves /metrics, /healthz and /readyz on, once it said so."""
    worker.wait_for_event("serving metrics")
    return next(e["port"] for e in worker.events() if e.get("event") == "serving metrics")
