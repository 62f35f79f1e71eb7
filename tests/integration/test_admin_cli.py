"""The admin CLI (typer's CliRunner) against the real Redis server and Kafka broker."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cache_store.redis.store import RedisStore
from tests.models.checkpoint_harness import tiny_commentator
from worker.cli.app import app
from worker.model.cache_settings import CacheSettings
from worker.stream.commentator import StreamInput
from worker.stream.policy import CommentaryPolicy
from worker.stream.session_state import snapshot

SCOPE = "orders-in/2"


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.fixture
def stored(redis_service):
    """A real session's state committed to partition 2, as a worker would leave it."""
    prefix = f"cli{uuid.uuid4().hex[:8]}"
    commentator = tiny_commentator(
        CacheSettings(sinks=4, window=60, max_chunk=16),
        CommentaryPolicy(every_records=2, max_new_tokens=3),
    )
    session = commentator.new_session("orders")
    commentator.step([StreamInput(session, [(0, "order 1 paid"), (1, "order 2 refunded")])])
    store = RedisStore(redis_service.url, prefix)
    store.claim(SCOPE).commit([snapshot(session, commentator)], next_offset=2)
    store.close()
    return ["--redis-url", redis_service.url, "--key-prefix", prefix], session


def test_streams_list_show_export_evict_import(stored, tmp_path: Path) -> None:
    options, session = stored
    listed = _invoke("streams", "list", *options, "--json")
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    assert row["stream_id"] == "orders" and row["partition"] == 2 and row["epoch"] == 1
    assert row["partition_next_offset"] == 2
    assert row["tokens_seen"] == session.tokens_seen and row["last_offset"] == 1
    assert row["next_seq"] == 1 and row["last_commentary_time"] is not None
    assert row["bytes"] > 0 and row["cache_fill"].endswith("/64")

    shown = _invoke("streams", "show", "orders", *options)
    assert shown.exit_code == 0 and "orders-in" in shown.stdout
    exported = tmp_path / "orders.state"
    assert _invoke("streams", "export", "orders", str(exported), *options).exit_code == 0
    assert _invoke("streams", "evict", "orders", *options).exit_code == 0
    missing = _invoke("streams", "show", "orders", *options)
    assert missing.exit_code == 1 and "no saved state" in missing.output
    assert _invoke("streams", "evict", "orders", *options).exit_code == 1

    assert _invoke("streams", "import", str(exported), *options).exit_code == 0
    again = json.loads(_invoke("streams", "show", "orders", *options, "--json").stdout)
    assert again | {"epoch": None} == row | {"epoch": None}


def test_a_damaged_export_is_refused_with_a_clear_error(stored, tmp_path: Path) -> None:
    options, _ = stored
    exported = tmp_path / "orders.state"
    _invoke("streams", "export", "orders", str(exported), *options)
    data = bytearray(exported.read_bytes())
    data[-100] ^= 0xFF
    exported.write_bytes(bytes(data))
    result = _invoke("streams", "import", str(exported), *options)
    assert result.exit_code == 2 and "error" in result.output


def test_topics_create_is_idempotent_and_describe_reports_them(kafka_service) -> None:
    name = f"cli{uuid.uuid4().hex[:8]}"
    options = [
        "--bootstrap-servers", kafka_service.bootstrap,
        "--input-topic", f"{name}-in",
        "--output-topic", f"{name}-out",
        "--dead-letter-topic", f"{name}-dead",
    ]  # fmt: skip
    missing = _invoke("topics", "describe", *options)
    assert missing.exit_code == 1 and "missing" in missing.stdout
    created = _invoke("topics", "create", *options, "--partitions", "3")
    assert created.exit_code == 0 and created.stdout.count("created") == 3
    assert _invoke("topics", "create", *options).stdout.count("exists") == 3
    described = json.loads(_invoke("topics", "describe", *options, "--json").stdout)
    assert [(t["topic"], t["partitions"]) for t in described] == [
        (f"{name}-in", 3),
        (f"{name}-out", 3),
        (f"{name}-dead", 1),
    ]
    assert described[0]["retention_ms"] == 7 * 24 * 3600 * 1000


def test_produce_and_consume_refuse_a_missing_topic_at_once(kafka_service, tmp_path) -> None:
    """A producer would wait a minute for the topic and fail with a timeout, and a consumer
    would wait for it forever (here, until its 5 idle seconds end with no error)."""
    name = f"cli{uuid.uuid4().hex[:8]}"
    lines = tmp_path / "app.log"
    lines.write_text("INFO one\nINFO two\n")
    brokers = ["--bootstrap-servers", kafka_service.bootstrap]
    produced = _invoke("produce", str(lines), "--stream", "s", *brokers, "--input-topic", name)
    consumed = _invoke("consume", "--idle-seconds", "5", *brokers, "--output-topic", name)
    for result in (produced, consumed):
        assert result.exit_code == 2
        assert f"topic '{name}' does not exist; create it with" in " ".join(result.output.split())


@pytest.mark.real_model
def test_doctor_says_what_is_wrong_in_plain_words(kafka_service, redis_service) -> None:
    name = f"doc{uuid.uuid4().hex[:8]}"
    topics = ["--input-topic", f"{name}-in", "--output-topic", f"{name}-out",
              "--dead-letter-topic", f"{name}-dead"]  # fmt: skip
    kafka = ["--bootstrap-servers", kafka_service.bootstrap]
    _invoke("topics", "create", *kafka, *topics)
    healthy = _invoke("doctor", *kafka, *topics, "--redis-url", redis_service.url, "--json")
    assert healthy.exit_code == 0, healthy.output
    assert {c["name"]: c["ok"] for c in json.loads(healthy.stdout)} == {
        "kafka": True, "redis": True, "model": True, "gpu": True,
    }  # fmt: skip
    model = next(c for c in json.loads(healthy.stdout) if c["name"] == "model")
    assert "linear layers through" in model["detail"]  # which kernels: ours, or the stock ones
    assert "decode attention through" in model["detail"]
    broken = _invoke(
        "doctor", *kafka, "--input-topic", f"{name}-absent", "--redis-url",
        "redis://127.0.0.1:1/0", "--window", "1000000", "--json",
    )  # fmt: skip
    assert broken.exit_code == 1
    checks = {c["name"]: c for c in json.loads(broken.stdout)}
    assert not checks["kafka"]["ok"] and "missing" in checks["kafka"]["detail"]
    assert not checks["redis"]["ok"] and "unavailable" in checks["redis"]["detail"]
    assert not checks["model"]["ok"] and "lower --window" in checks["model"]["detail"]
