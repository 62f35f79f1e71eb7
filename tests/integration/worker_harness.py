"""Worker processes, input and output for the distributed tests, against the real services.

Workers are real `streamsink run` processes (so SIGKILL, SIGSTOP and SIGTERM mean what they
mean in a pod) with the default model, one torch thread each so runs compare bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

EVENTS = [
    "INFO request /login took 12ms",
    "INFO request /cart took 40ms",
    "WARN cache miss ratio 0.4",
    "ERROR upstream timeout after 3000ms",
    "INFO retry succeeded",
    "INFO request /pay took 95ms",
    "WARN queue depth 120",
    "INFO request /login took 11ms",
    "ERROR disk usage 91%",
    "INFO cleanup freed 2GB",
    "INFO request /cart took 38ms",
    "WARN slow query 1.2s",
]


def log_lines(name: str, count: int, shift: int = 0) -> list[str]:
    """`count` timestamped log lines of service `name`, the events taken from `shift` on."""
    return [
        f"2026-11-23T{12 + minute // 60:02d}:{minute % 60:02d}:00 {name} "
        f"{EVENTS[(minute + shift) % len(EVENTS)]}"
        for minute in range(count)
    ]


STREAMS = {f"svc-{name}": log_lines(name, 12) for name in ("api", "db", "cache", "auth")}
EVERY_RECORDS = 4
EXPECTED = {(stream, seq) for stream, lines in STREAMS.items() for seq in range(len(lines) // 4)}

WORKER_ARGS = [
    "--every-records", str(EVERY_RECORDS),
    "--max-new-tokens", "6",
    "--window", "124",
    "--checkpoint-every", "2",
    "--checkpoint-every-seconds", "1",
    "--session-timeout-ms", "6000",
    "--shutdown-seconds", "30",
    "--metrics-port", "0",
    "--log-level", "info",
]  # fmt: skip


@dataclass(frozen=True)
class Topics:
    input: str
    output: str
    dead_letter: str


def produce_lines(bootstrap: str, topic: str, part: slice = slice(None)) -> int:
    """Send each stream's lines (the given slice of them), keyed by stream id, in order."""
    items = [
        (stream.encode(), line.encode())
        for stream, lines in STREAMS.items()
        for line in lines[part]
    ]
    return len(produce_records(bootstrap, topic, items))


def produce_records(
    bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes]]
) -> list[tuple[int, int]]:
    """Send (key, value) records in order; the (partition, offset) each was written at."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in items]
        producer.flush()
        return [(meta.partition, meta.offset) for meta in (f.get(timeout=60) for f in futures)]
    finally:
        producer.close()


def read_topic(bootstrap: str, topic: str, timeout: float = 2.0) -> list:
    """Every record now on the topic (all partitions), oldest first per partition."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        consumer_timeout_ms=int(timeout * 1000),
    )
    try:
        return list(consumer)
    finally:
        consumer.close()


def commentary(bootstrap: str, topic: str) -> list[dict]:
    return [json.loads(message.value) for message in read_topic(bootstrap, topic)]


def wait_for_commentary(
    bootstrap: str, topic: str, wanted: set[tuple[str, int]], timeout: float = 600.0
) -> list[dict]:
    """Read the output topic until every wanted (stream, seq) is there; all records read."""
    deadline = time.monotonic() + timeout
    while True:
        records = commentary(bootstrap, topic)
        if wanted <= {(r["stream_id"], r["seq"]) for r in records}:
            return records
        if time.monotonic() > deadline:
            have = sorted({(r["stream_id"], r["seq"]) for r in records})
            raise AssertionError(f"timed out waiting for commentary; have {have}")
        time.sleep(1.0)


class Worker:
    """One `streamsink run` process; its JSON logs are kept in a file for assertions."""

    def __init__(
        self,
        name: str,
        log_dir: Path,
        bootstrap: str,
        redis_url: str,
        topics: Topics,
        group: str,
        prefix: str,
        extra: list[str] = (),
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        args = [
            sys.executable, "-m", "worker", "run",
            "--bootstrap-servers", bootstrap,
            "--input-topic", topics.input,
            "--output-topic", topics.output,
            "--dead-letter-topic", topics.dead_letter,
            "--group", group,
            "--redis-url", redis_url,
            "--key-prefix", prefix,
            *WORKER_ARGS,
            *extra,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=Path.cwd()
            )

    def events(self) -> list[dict]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    continue
        return events

    def wait_for(
        self, predicate: Callable[[list[dict]], bool], what: str, timeout: float = 120.0
    ) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.events()):
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited ({self.process.returncode}): {self.tail()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: timed out waiting for {what}: {self.tail()}")
            time.sleep(0.5)

    def wait_for_event(self, event: str, timeout: float = 120.0, count: int = 1) -> None:
        self.wait_for(
            lambda events: sum(e.get("event") == event for e in events) >= count, event, timeout
        )

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, as Kubernetes sends it; returns the exit code."""
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(10)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def summary(self) -> dict:
        """The counters the worker logged as it stopped."""
        stopped = [e for e in self.events() if e.get("event") == "worker stopped"]
        assert stopped, f"{self.name} did not log its stop: {self.tail()}"
        return stopped[-1]

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop_quietly(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def create_topics(bootstrap: str, name: str, partitions: int = 4) -> Topics:
    """Input (with `partitions`), output and dead-letter topics named after `name`."""
    from kafka.admin import KafkaAdminClient, NewTopic

    topics = Topics(f"{name}-in", f"{name}-out", f"{name}-dead")
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics(
            [
                NewTopic(topics.input, partitions, 1),
                NewTopic(topics.output, 2, 1),
                NewTopic(topics.dead_letter, 1, 1),
            ]
        )
    finally:
        admin.close()
    return topics
