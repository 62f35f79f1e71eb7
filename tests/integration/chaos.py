"""Random faults under three real workers, checked against one uninterrupted run.

Three `streamsink run` processes share a group on a topic of eight partitions, fed twelve or
more keyed streams with a few bad records among them. Between slices of that input, a seeded
generator picks the faults: SIGKILL and a restart, SIGSTOP past the session timeout then
SIGCONT, a Redis restart (append-only file), a broker restart. Then everything must be there,
as an uninterrupted local run of the same streams wrote it: every (stream, seq) with the same
text, seqs contiguous, every input offset covered once, every bad record dead-lettered once,
no worker gone but those killed on purpose, and every partition owned.

`bash deploy/chaos.sh --faults 50` runs it by hand (this module's main); the `chaos` test
runs a small N in CI.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kafka.admin import KafkaAdminClient

from tests.http_probe import scrape
from tests.integration.cluster import Cluster, metrics_port, sample
from tests.integration.services import KafkaService, RedisService
from tests.integration.worker_harness import (
    EVERY_RECORDS,
    WORKER_ARGS,
    Worker,
    commentary,
    log_lines,
    produce_records,
    read_topic,
    wait_for_commentary,
)

KINDS = ("sigkill", "sigstop", "redis_restart", "broker_restart")
SESSION_SECONDS = 6  # the harness's --session-timeout-ms
# Three workers on a small machine: one torch thread each, or they fight over the cores; the
# reference run on one thread too, so its sums run in the same order.
THREADS = ["--threads", "1"]
BAD_REASONS = {"keyless": "no_key", "invalid_utf8": "invalid_utf8"}


@dataclass(frozen=True)
class ChaosPlan:
    faults: int
    seed: int = 0
    streams: int = 12
    lines: int = 8  # per stream; a multiple of EVERY_RECORDS, so every line is commented on
    workers: int = 3
    partitions: int = 8
    bad_records: int = 4


@dataclass
class ChaosReport:
    faults: Counter = field(default_factory=Counter)
    records: int = 0
    bad_records: int = 0
    commentaries: int = 0
    duplicates: int = 0
    dead_letters: int = 0
    unowned_detected: float = 0.0
    redelivered: float = 0.0  # as the live workers' metric counts it (the killed ones' is gone)
    held_back: float = 0.0  # dead letters in doubt the live workers found on the topic
    rejoined: float = 0.0  # times a live worker found the group had dropped it unnoticed
    producers_replaced: float = 0.0  # output producers live workers found stopped
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def summary(self, plan: ChaosPlan) -> str:
        kinds = ", ".join(f"{kind} {self.faults[kind]}" for kind in KINDS)
        verdict = "clean" if not self.problems else f"{len(self.problems)} problems"
        return (
            f"chaos seed {plan.seed}: {sum(self.faults.values())} faults ({kinds}); "
            f"{self.records} records ({self.bad_records} bad) on {plan.streams} streams, "
            f"{plan.partitions} partitions, {plan.workers} workers; "
            f"{self.commentaries} commentaries, {self.duplicates} duplicates "
            f"({self.redelivered:g} counted redelivered by live workers), "
            f"{self.dead_letters} dead letters ({self.held_back:g} held back as already there), "
            f"{self.unowned_detected:g} unowned-partition alarms, "
            f"{self.rejoined:g} rejoins of a dropped member, "
            f"{self.producers_replaced:g} stopped producers replaced; "
            f"{self.seconds:.0f} s: {verdict}"
        )


def fault_kinds(rng: random.Random, count: int) -> list[str]:
    """Every kind once in each run of four, in a seeded order: a small N still has them all."""
    kinds: list[str] = []
    while len(kinds) < count:
        kinds += rng.sample(KINDS, len(KINDS))
    return kinds[:count]


def chaos_streams(plan: ChaosPlan) -> dict[str, list[str]]:
    return {
        f"svc-{number:02d}": log_lines(f"svc-{number:02d}", plan.lines, shift=number)
        for number in range(plan.streams)
    }


def bad_records(
    plan: ChaosPlan, streams: dict[str, list[str]]
) -> list[tuple[str, bytes | None, bytes]]:
    """(kind, key, value): keyless and invalid UTF-8 records, each value unique."""
    names = sorted(streams)
    bad = []
    for number in range(plan.bad_records):
        if number % 2 == 0:
            bad.append(("keyless", None, f"keyless record {number}".encode()))
        else:
            key = names[number % len(names)].encode()
            bad.append(("invalid_utf8", key, b"\xff\xfe not utf-8 " + str(number).encode()))
    return bad


def slices(count: int, parts: int) -> list[slice]:
    """`parts` contiguous slices of range(count), as even as they come."""
    bounds = [round(count * i / parts) for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def reference_texts(streams: dict[str, list[str]], log_dir: Path) -> dict[tuple[str, int], str]:
    """(stream, seq) -> text of one local run over every stream, start to end, never moved."""
    source = log_dir / "reference-input.txt"
    source.write_text("".join(f"{s}\t{line}\n" for s, lines in streams.items() for line in lines))
    args = [sys.executable, "-m", "worker", "run", "--source", f"file:{source}"]
    args += ["--key-separator", "\t", "--state", "memory:", "--json", *WORKER_ARGS, *THREADS]
    args += ["--checkpoint-every", str(10**6), "--checkpoint-every-seconds", str(10**6)]
    with open(log_dir / "reference.log", "wb") as log:
        done = subprocess.run(args, stdout=subprocess.PIPE, stderr=log, check=True, timeout=3600)
    lines = done.stdout.decode().splitlines()
    return {(c["stream_id"], c["seq"]): c["text"] for c in map(json.loads, lines)}


class ChaosRun:
    """One run of the plan against the given services; `run` returns its report."""

    def __init__(
        self, plan: ChaosPlan, kafka: KafkaService, redis: RedisService, log_dir: Path, say=print
    ) -> None:
        self.plan, self.kafka, self.redis, self.log_dir, self.say = plan, kafka, redis, log_dir, say
        self.rng = random.Random(plan.seed)
        self.streams = chaos_streams(plan)
        self.bad = bad_records(plan, self.streams)
        self.report = ChaosReport()
        self.slots: list[Worker] = []
        self.killed: list[Worker] = []  # exits that were injected
        self.restarts = 0
        self._gone: set[str] = set()  # workers whose uninjected exit is reported

    def run(self) -> ChaosReport:
        started = time.monotonic()
        self.say(f"chaos: the reference run over {len(self.streams)} streams")
        reference = reference_texts(self.streams, self.log_dir)
        cluster = Cluster("chaos", self.kafka, self.redis, self.log_dir, self.plan.partitions)
        try:
            self.slots = [cluster.worker(f"w{n}", *THREADS) for n in range(self.plan.workers)]
            for worker in self.slots:
                worker.wait_for_event("group joined", timeout=600)
            offsets = self._inject_between_slices(cluster)
            expected = set(reference)
            try:
                records = wait_for_commentary(
                    cluster.bootstrap, cluster.topics.output, expected, 900 + 30 * len(expected)
                )
            except AssertionError as error:  # timed out: the checks below say what is missing
                self._problem(str(error)[:600])
                records = commentary(cluster.bootstrap, cluster.topics.output)
            self._check_owned()
            dead = read_topic(cluster.bootstrap, cluster.topics.dead_letter)
            self._check_output(reference, records, offsets)
            self._check_dead_letters(dead)
            self._check_exits()
            self._check_group(cluster)
            self.stop_workers()
            if self.report.problems:
                self._tell_each_workers_story()
        finally:
            cluster.close()
        self.report.seconds = time.monotonic() - started
        return self.report

    def _inject_between_slices(self, cluster: Cluster) -> dict[str, list[tuple[int, int]]]:
        """Produce a slice of the input, wait a little, inject a fault; again; the rest last."""
        kinds = fault_kinds(self.rng, self.plan.faults)
        parts = slices(self.plan.lines, len(kinds) + 1)
        bad_parts = {
            i: [b for n, b in enumerate(self.bad) if n % len(parts) == i] for i in range(len(parts))
        }
        offsets: dict[str, list[tuple[int, int]]] = {s: [] for s in self.streams}
        for i, part in enumerate(parts):
            offsets_of_slice = self._produce(cluster, part, bad_parts[i])
            for stream, written in offsets_of_slice.items():
                offsets[stream] += written
            if i < len(kinds):
                time.sleep(self.rng.uniform(1.0, 5.0))
                self._inject(kinds[i], cluster)
                self._check_exits()
        return offsets

    def _produce(
        self, cluster: Cluster, part: slice, bad: list
    ) -> dict[str, list[tuple[int, int]]]:
        """Each stream's lines of `part`, interleaved across streams, bad records among them."""
        rows = [
            (s, lines[i]) for i in range(part.start, part.stop) for s, lines in self.streams.items()
        ]
        items = [(s.encode(), line.encode()) for s, line in rows]
        for _, key, value in bad:
            items.insert(self.rng.randrange(len(items) + 1), (key, value))
        written = produce_records(cluster.bootstrap, cluster.topics.input, items)
        by_value = {value: where for (_, value), where in zip(items, written, strict=True)}
        self.report.records += len(items)
        self.report.bad_records += len(bad)
        return {
            s: [by_value[line.encode()] for line in lines[part]]
            for s, lines in self.streams.items()
        }

    def _inject(self, kind: str, cluster: Cluster) -> None:
        self.report.faults[kind] += 1
        number = sum(self.report.faults.values())
        if kind == "sigkill":
            slot = self.rng.randrange(len(self.slots))
            self.say(f"fault {number}: SIGKILL {self.slots[slot].name}, then a restart")
            self.slots[slot].kill()
            self.killed.append(self.slots[slot])
            self.restarts += 1
            self.slots[slot] = cluster.worker(f"w{slot}-r{self.restarts}", *THREADS)
        elif kind == "sigstop":
            worker = self.rng.choice(self.slots)
            pause = SESSION_SECONDS + self.rng.uniform(1.0, 4.0)
            self.say(f"fault {number}: SIGSTOP {worker.name} for {pause:.1f} s, then SIGCONT")
            worker.signal(signal.SIGSTOP)
            time.sleep(pause)
            worker.signal(signal.SIGCONT)
        elif kind == "redis_restart":
            self.say(f"fault {number}: Redis restart")
            self.redis.restart()
        else:
            self.say(f"fault {number}: broker restart")
            self.kafka.restart()

    def _check_exits(self) -> None:
        """Only the SIGKILLs ended workers."""
        for worker in self.killed:
            if worker.process.returncode != -signal.SIGKILL:
                self._problem(f"{worker.name} ended {worker.process.returncode}, not by SIGKILL")
        for worker in self.slots:
            code = worker.process.poll()
            if code is not None and worker.name not in self._gone:
                self._gone.add(worker.name)
                self._problem(f"{worker.name} exited ({code}) uninjected: {worker.tail()[-600:]}")

    def _check_group(self, cluster: Cluster, settle_seconds: float = 60.0) -> None:
        """The coordinator's view: each partition assigned to exactly one of the live workers.

        The group may still be settling a rebalance the last faults began. The workers'
        cooperative assignor moves a partition in two rebalances: the first revokes it (its
        owner releases it, with a last checkpoint, then rejoins), the second assigns it; in
        between the group is Stable with that partition unassigned. It has `settle_seconds` to
        get there.
        """
        deadline = time.monotonic() + settle_seconds
        admin = KafkaAdminClient(bootstrap_servers=cluster.bootstrap)
        try:
            while True:
                group = admin.describe_groups([cluster.name])[cluster.name]
                assigned = Counter(
                    number
                    for member in group["members"]
                    for part in member["member_assignment"]["assigned_partitions"]
                    for number in part["partitions"]
                )
                settled = (
                    group["group_state"] == "Stable"
                    and assigned == Counter(range(self.plan.partitions))
                    and len(group["members"]) == self.plan.workers
                )
                if settled or time.monotonic() > deadline:
                    break
                time.sleep(2.0)
        finally:
            admin.close()
        if group["group_state"] != "Stable" or assigned != Counter(range(self.plan.partitions)):
            self._problem(f"group {group['group_state']}, partitions assigned {dict(assigned)}")
        if len(group["members"]) != self.plan.workers:
            self._problem(f"{len(group['members'])} members in the group, not {self.plan.workers}")

    def _check_owned(self, timeout: float = 240.0) -> None:
        """Every partition owned by a live worker, and no worker's alarm of an unowned one on."""
        deadline = time.monotonic() + timeout
        while True:
            live = [w for w in self.slots if w.process.poll() is None]
            pages = [scrape(metrics_port(w), "/metrics")[1] for w in live]
            owned = sum(sample(page, "streamsink_partitions_owned") for page in pages)
            unowned = max(
                (sample(page, "streamsink_partitions_unowned") for page in pages), default=0
            )
            if owned == self.plan.partitions and unowned == 0:
                break
            if time.monotonic() > deadline:
                self._problem(f"at the end {owned:g} partitions owned, {unowned:g} unowned")
                break
            time.sleep(2.0)
        alarms = 'streamsink_errors_total{kind="partition_unowned"}'
        self.report.unowned_detected = sum(sample(page, alarms) for page in pages)
        redelivered = "streamsink_redelivered_commentaries_total"
        self.report.redelivered = sum(sample(page, redelivered) for page in pages)
        held_back = "streamsink_dead_letters_held_back_total"
        self.report.held_back = sum(sample(page, held_back) for page in pages)
        rejoined = 'streamsink_errors_total{kind="membership_dropped"}'
        self.report.rejoined = sum(sample(page, rejoined) for page in pages)
        replaced = 'streamsink_errors_total{kind="producer_stopped"}'
        self.report.producers_replaced = sum(sample(page, replaced) for page in pages)

    def _check_output(
        self,
        reference: dict[tuple[str, int], str],
        records: list[dict],
        offsets: dict[str, list[tuple[int, int]]],
    ) -> None:
        texts: dict[tuple[str, int], set[str]] = {}
        spans: dict[tuple[str, int], set[tuple[int, int]]] = {}
        for r in records:
            key = (r["stream_id"], r["seq"])
            texts.setdefault(key, set()).add(r["text"])
            spans.setdefault(key, set()).add((r["first_offset"], r["last_offset"]))
        self.report.commentaries = len(texts)
        self.report.duplicates = len(records) - len(texts)
        for key in sorted(set(texts) | set(reference)):
            if texts.get(key) != {reference.get(key)}:
                self._problem(
                    f"{key}: written {texts.get(key)}, uninterrupted {reference.get(key)!r}"
                )
        for stream, written in offsets.items():
            seqs = sorted(seq for s, seq in texts if s == stream)
            if seqs != list(range(len(seqs))):
                self._problem(f"{stream}: seqs not contiguous: {seqs}")
            for seq in seqs:
                group = written[seq * EVERY_RECORDS : (seq + 1) * EVERY_RECORDS]
                wanted = {(group[0][1], group[-1][1])} if len(group) == EVERY_RECORDS else set()
                if spans[(stream, seq)] != wanted:
                    self._problem(f"{stream} #{seq} covers {spans[(stream, seq)]}, not {wanted}")

    def _check_dead_letters(self, dead: list) -> None:
        self.report.dead_letters = len(dead)
        sent = Counter(
            (m.key, m.value, dict(m.headers)["streamsink.reason"].decode()) for m in dead
        )
        wanted = Counter((key, value, BAD_REASONS[kind]) for kind, key, value in self.bad)
        if sent != wanted:
            self._problem(f"dead letters {dict(sent)}, wanted each of {dict(wanted)} once")

    def _tell_each_workers_story(self, last: int = 30) -> None:
        """Each worker's own last events (kafka-python's left out), for a failed run's log:
        the workers' log files go with the machine that ran it."""
        for worker in self.killed + self.slots:
            self.say(f"--- {worker.name}, its last {last} events:")
            own = [e for e in worker.events() if "logger" not in e]
            for event in own[-last:]:
                details = {k: v for k, v in event.items() if k not in ("event", "timestamp")}
                self.say(f"{event.get('timestamp', '')[11:23]} {event.get('event')} {details}")

    def _problem(self, text: str) -> None:
        self.say(f"PROBLEM: {text}")
        self.report.problems.append(text)

    def stop_workers(self) -> None:
        """SIGTERM every live worker; an exit other than 0 is a problem."""
        for worker in self.slots:
            if worker.process.poll() is None and (code := worker.terminate()) != 0:
                self._problem(f"{worker.name} exited {code} on SIGTERM: {worker.tail()[-600:]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/chaos.sh", description=__doc__.split("\n")[0])
    parser.add_argument("--faults", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--streams", type=int, default=12)
    parser.add_argument("--lines", type=int, default=16, help="per stream, a multiple of 4")
    parser.add_argument("--dir", type=Path, help="for services and logs (default: a temp dir)")
    options = parser.parse_args(argv)
    plan = ChaosPlan(options.faults, options.seed, options.streams, options.lines)
    directory = options.dir or Path(tempfile.mkdtemp(prefix="streamsink-chaos-"))
    directory.mkdir(parents=True, exist_ok=True)
    print(f"chaos: services and logs in {directory}", flush=True)
    kafka, redis = KafkaService(directory / "kafka"), RedisService(directory / "redis")
    kafka.start()
    redis.start()
    try:
        report = ChaosRun(plan, kafka, redis, directory, say=lambda s: print(s, flush=True)).run()
    finally:
        kafka.stop()
        redis.stop()
    for problem in report.problems:
        print(f"problem: {problem}")
    print(report.summary(plan))
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
