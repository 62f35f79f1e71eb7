"""The distributed worker against a real Kafka broker, a real Redis server and the real model.

Every scenario feeds the same keyed lines and compares its commentary with one uninterrupted
worker's: greedy decoding and exact state make every (stream, seq) text identical however
the streams moved between workers.
"""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from cache_store.redis.store import RedisStore
from cache_store.state import StreamState
from tests.http_probe import scrape
from tests.integration.cluster import check_against, metrics_port, sample
from tests.integration.worker_harness import EXPECTED, STREAMS, commentary, read_topic

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

HALF = slice(0, 8)
REST = slice(8, None)


def test_round_trip_in_order_with_seq_offsets_and_dead_letters(cluster, reference) -> None:
    c = cluster("roundtrip")
    c.produce(HALF)
    bad = [(None, b"no key at all"), (b"svc-api", b"\xff\xfe not utf-8"), (b"svc-db", b"x" * 70000)]
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=c.bootstrap, max_request_size=200000)
    for key, value in bad:
        producer.send(c.topics.input, key=key, value=value)
    producer.flush()
    producer.close()
    c.produce(REST)
    worker = c.worker("one")
    records = c.wait_for(EXPECTED)
    assert worker.terminate() == 0

    per_stream: dict[str, list[dict]] = {}
    for r in records:
        per_stream.setdefault(r["stream_id"], []).append(r)
    for stream, items in per_stream.items():
        assert [r["seq"] for r in items] == sorted(r["seq"] for r in items), stream
        assert [r["first_offset"] for r in items] == sorted(r["first_offset"] for r in items)
        assert {"text", "model", "time", "last_offset"} <= set(items[0])
    check_against(reference, records)
    dead = read_topic(c.bootstrap, c.topics.dead_letter)
    reasons = Counter(dict(m.headers)["streamsink.reason"].decode() for m in dead)
    assert reasons == {"no_key": 1, "invalid_utf8": 1, "too_large": 1}
    assert {m.value for m in dead} == {value for _, value in bad}


def test_sigkill_mid_stream_the_other_worker_finishes_identically(cluster, reference) -> None:
    c = cluster("crash")
    c.produce(HALF)
    first, second = c.worker("first"), c.worker("second")
    for worker in (first, second):
        worker.wait_for_event("partition claimed")
    c.wait_for(set(sorted(EXPECTED)[:1]))  # work is under way
    first.kill()  # mid-step, or between checkpoints: either way nothing is saved on the way out
    c.produce(REST)
    second.wait_for(
        lambda events: (
            {e["partition"] for e in events if e.get("event") == "partition claimed"}
            == {0, 1, 2, 3}
        ),
        "the survivor to take the killed worker's partitions",
    )
    records = c.wait_for(EXPECTED)
    check_against(reference, records)
    assert second.terminate() == 0


def test_graceful_handoff_restores_with_zero_prefill(cluster, reference) -> None:
    c = cluster("handoff")
    c.produce(HALF)
    first = c.worker("first")
    c.wait_for({(stream, 1) for stream in STREAMS})  # every stream has state in Redis
    second = c.worker("second")  # joins: cooperative rebalance moves partitions to it
    second.wait_for_event("partition claimed")
    assert first.terminate() == 0  # SIGTERM: the rest move to the second worker
    c.produce(REST)
    records = c.wait_for(EXPECTED)
    assert second.terminate() == 0
    check_against(reference, records)
    took_over = second.summary()
    assert took_over["restored_streams"] == len(STREAMS)
    assert took_over["prefill_tokens"] == 0


def test_a_paused_zombie_writes_nothing_that_sticks(cluster, reference) -> None:
    c = cluster("zombie")
    c.produce(HALF)
    zombie = c.worker("zombie")
    c.wait_for({(stream, 0) for stream in STREAMS})
    zombie.signal(signal.SIGSTOP)
    successor = c.worker("successor")
    try:
        successor.wait_for_event("partition claimed", count=1)
        c.produce(REST)
        c.wait_for(EXPECTED)
    finally:
        zombie.signal(signal.SIGCONT)
    # Back from the pause, the zombie finds its partitions gone or its writes fenced.
    zombie.wait_for(
        lambda events: any(
            e.get("event") in ("write fenced off: partition moved", "partition released")
            for e in events
        ),
        "the zombie to notice",
    )
    assert zombie.terminate() == 0
    assert successor.terminate() == 0
    check_against(reference, commentary(c.bootstrap, c.topics.output))


def test_redis_and_kafka_restarts_lose_nothing(cluster, reference, kafka_service, redis_service):
    c = cluster("restarts")
    c.produce(HALF)
    worker = c.worker("one")
    c.wait_for({(stream, 0) for stream in STREAMS})
    redis_service.restart()
    c.wait_for({(stream, 1) for stream in STREAMS})
    kafka_service.restart()
    c.produce(REST)
    records = c.wait_for(EXPECTED)
    assert worker.terminate() == 0
    check_against(reference, records)


def test_unusable_states_are_reported_and_their_records_set_aside(cluster, redis_service) -> None:
    c = cluster("badstate")
    c.produce(HALF)
    first = c.worker("first")
    c.wait_for({(stream, 1) for stream in STREAMS})
    assert first.terminate() == 0

    store = RedisStore(redis_service.url, prefix=c.name)
    client = redis_service.client()
    checksum, foreign, truncated, healthy = "svc-api", "svc-db", "svc-cache", "svc-auth"
    tag = f"{c.name}:{{{store.scope_of(checksum)}}}"
    block = sorted(client.keys(f"{tag}:b:{checksum}:*"))[0]
    client.setrange(block, 0, b"\x00\x01\x02\x03")
    state = store.load(foreign)
    other = StreamState(foreign, "another-model", state.tensors, state.meta)
    store.commit_unfenced(store.scope_of(foreign), [other])
    manifest = f"{c.name}:{{{store.scope_of(truncated)}}}:m:{truncated}"
    client.set(manifest, client.get(manifest)[:50])
    store.close()

    c.produce(REST)
    second = c.worker("second")
    c.wait_for({(healthy, seq) for seq in range(3)})
    second.wait_for(
        lambda events: sum(e.get("event") == "record set aside" for e in events) == 12,
        "the records of the three unusable streams to be set aside",
    )
    assert second.terminate() == 0
    errors = {
        e["stream_id"]: e["error"]
        for e in second.events()
        if e.get("event") == "unusable saved state"
    }
    assert set(errors) == {checksum, foreign, truncated}
    assert "checksum" in errors[checksum] and "another model" in errors[foreign]
    summary = second.summary()
    assert summary["bad_states"] == 3 and summary["dead_letter_records"] == 12
    dead = read_topic(c.bootstrap, c.topics.dead_letter)
    assert Counter(m.key.decode() for m in dead) == {checksum: 4, foreign: 4, truncated: 4}
    assert {dict(m.headers)["streamsink.reason"] for m in dead} == {b"bad_state"}
    # Nothing was written for the unusable streams: no output from a silently wrong state.
    late = [r for r in commentary(c.bootstrap, c.topics.output) if r["seq"] >= 2]
    assert {r["stream_id"] for r in late} == {healthy}


def test_metrics_of_a_running_worker_move_and_it_reports_ready(cluster) -> None:
    c = cluster("metrics")
    worker = c.worker("one")
    worker.wait_for_event("serving metrics")
    port = next(e["port"] for e in worker.events() if e.get("event") == "serving metrics")
    worker.wait_for_event("partition assigned")
    worker.wait_for(lambda _: scrape(port, "/readyz")[0] == 200, "readiness")
    before = scrape(port, "/metrics")[1]
    assert sample(before, "streamsink_records_total") == 0
    c.produce(HALF)
    c.wait_for({(stream, 1) for stream in STREAMS})
    worker.wait_for(
        lambda _: sample(scrape(port, "/metrics")[1], "streamsink_checkpoints_total") > 0,
        "a checkpoint",
    )
    after = scrape(port, "/metrics")[1]
    assert sample(after, "streamsink_records_total") == 32
    assert sample(after, "streamsink_commentaries_total") == 8
    assert sample(after, "streamsink_tokens_total") > 32
    assert sample(after, "streamsink_partitions_owned") == 4
    assert sample(after, "streamsink_checkpoint_bytes_total") > 0
    assert scrape(port, "/healthz")[0] == 200
    assert worker.terminate() == 0


def test_a_budget_of_one_live_stream_writes_what_an_unbounded_worker_does(
    cluster, reference
) -> None:
    c = cluster("budget")
    c.produce(HALF)
    worker = c.worker("one", "--max-live-streams", "1")
    c.wait_for({(stream, 0) for stream in STREAMS})
    c.produce(REST)  # every stream comes back after the others had its room
    records = c.wait_for(EXPECTED)
    live = sample(scrape(metrics_port(worker), "/metrics")[1], "streamsink_live_streams")
    assert worker.terminate() == 0
    check_against(reference, records)
    summary = worker.summary()
    assert live == 1  # the last stream's
    assert summary["evicted_streams"] >= len(STREAMS) - 1
    assert summary["restored_streams"] >= len(STREAMS) - 1
