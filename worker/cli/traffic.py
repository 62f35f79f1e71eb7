"""`streamsink produce` and `streamsink consume`: try the whole loop by hand from a terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from kafka import KafkaConsumer, KafkaProducer

from worker.cli.console import exit_on_known_errors
from worker.cli.option_groups import uses_groups
from worker.cli.options import JsonOption, admin_client, require_brokers
from worker.exceptions import StreamsinkError
from worker.io.file_source import LineKeys
from worker.io.kafka_connection import KafkaConnection
from worker.io.outputs import JsonLinesOutput, TextOutput
from worker.io.topics import TopicNames
from worker.stream.records import Commentary


@uses_groups
def produce(
    kafka: KafkaConnection | None,
    topics: TopicNames,
    keys: LineKeys,
    file: Annotated[str, typer.Argument(help="lines to send, or - for stdin")] = "-",
) -> None:
    """Send a file or stdin to the input topic, one record per line, keyed by stream id."""
    if (keys.stream is None) == (keys.separator is None):
        raise typer.BadParameter("give exactly one of --stream or --key-separator")
    if file != "-" and not Path(file).is_file():
        raise typer.BadParameter(f"no file at {file!r}")
    with exit_on_known_errors():
        connection = _require_topic(kafka, topics.input)
        producer = KafkaProducer(**connection.client_config(), acks="all")
        handle = sys.stdin.buffer if file == "-" else open(file, "rb")  # noqa: SIM115
        sent = 0
        with handle:
            for line in handle:
                key, value = keys.split(line.rstrip(b"\r\n"))
                producer.send(topics.input, key=key, value=value)
                sent += 1
        producer.flush()
        producer.close()
    typer.echo(f"sent {sent} records to {topics.input}", err=True)


@uses_groups
def consume(
    kafka: KafkaConnection | None,
    topics: TopicNames,
    from_beginning: Annotated[bool, typer.Option(help="start at the oldest record")] = True,
    max_records: Annotated[int | None, typer.Option(help="stop after this many records")] = None,
    idle_seconds: Annotated[
        float | None, typer.Option(help="stop after this long without a record")
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Follow the commentary topic, one line per commentary (no consumer group: reads only)."""
    with exit_on_known_errors():
        connection = _require_topic(kafka, topics.output)
    consumer = KafkaConsumer(
        topics.output,
        **connection.client_config(),
        group_id=None,
        allow_auto_create_topics=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        consumer_timeout_ms=int(idle_seconds * 1000) if idle_seconds else float("inf"),
    )
    output = JsonLinesOutput() if json_output else TextOutput()
    seen = 0
    try:
        for message in consumer:
            try:
                output.emit(Commentary(**json.loads(message.value)))
            except (ValueError, TypeError):
                typer.echo(f"not a commentary record: {message.value[:200]!r}", err=True)
            output.flush()
            seen += 1
            if max_records is not None and seen >= max_records:
                break
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


def _require_topic(kafka: KafkaConnection | None, topic: str) -> KafkaConnection:
    """The connection, once the brokers said they have `topic`. Asked first, since a producer
    waits a minute for a missing topic and then fails, and a consumer waits for it forever."""
    admin = admin_client(kafka)
    try:
        if topic not in admin.list_topics():
            raise StreamsinkError(
                f"topic {topic!r} does not exist; create it with `streamsink topics create`"
            )
    finally:
        admin.close()
    return require_brokers(kafka)
