"""`streamsink produce` and `streamsink consume`: try the whole loop by hand from a terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from kafka import KafkaConsumer, KafkaProducer

from worker.cli.options import (
    DEFAULT_INPUT_TOPIC,
    DEFAULT_OUTPUT_TOPIC,
    BootstrapOption,
    SaslMechanismOption,
    SaslPasswordOption,
    SaslUsernameOption,
    SecurityProtocolOption,
    kafka_connection,
)
from worker.io.outputs import JsonLinesOutput, TextOutput
from worker.stream.records import Commentary


def produce(
    file: Annotated[str, typer.Argument(help="lines to send, or - for stdin")] = "-",
    bootstrap_servers: BootstrapOption = "127.0.0.1:9092",
    topic: Annotated[
        str, typer.Option(envvar="STREAMSINK_INPUT_TOPIC", help="topic to write to")
    ] = DEFAULT_INPUT_TOPIC,
    stream: Annotated[
        str | None, typer.Option(help="stream id (the record key) of every line")
    ] = None,
    key_separator: Annotated[
        str | None, typer.Option(help="the text before this separator on each line is its key")
    ] = None,
    security_protocol: SecurityProtocolOption = "PLAINTEXT",
    sasl_mechanism: SaslMechanismOption = None,
    sasl_username: SaslUsernameOption = None,
    sasl_password: SaslPasswordOption = None,
) -> None:
    """Send a file or stdin to a topic, one record per line, keyed by stream id."""
    if (stream is None) == (key_separator is None):
        raise typer.BadParameter("give exactly one of --stream or --key-separator")
    if file != "-" and not Path(file).is_file():
        raise typer.BadParameter(f"no file at {file!r}")
    connection = kafka_connection(
        bootstrap_servers, security_protocol, sasl_mechanism, sasl_username, sasl_password
    )
    producer = KafkaProducer(**connection.client_config(), acks="all")
    handle = sys.stdin.buffer if file == "-" else open(file, "rb")  # noqa: SIM115
    sent = 0
    with handle:
        for line in handle:
            value = line.rstrip(b"\r\n")
            if key_separator is None:
                key = stream.encode() if stream else None
            else:
                raw_key, separator, rest = value.partition(key_separator.encode())
                key, value = (raw_key, rest) if separator else (None, value)
            producer.send(topic, key=key, value=value)
            sent += 1
    producer.flush()
    producer.close()
    typer.echo(f"sent {sent} records to {topic}", err=True)


def consume(
    bootstrap_servers: BootstrapOption = "127.0.0.1:9092",
    topic: Annotated[
        str, typer.Option(envvar="STREAMSINK_OUTPUT_TOPIC", help="commentary topic to follow")
    ] = DEFAULT_OUTPUT_TOPIC,
    from_beginning: Annotated[bool, typer.Option(help="start at the oldest record")] = True,
    max_records: Annotated[int | None, typer.Option(help="stop after this many records")] = None,
    idle_seconds: Annotated[
        float | None, typer.Option(help="stop after this long without a record")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
    security_protocol: SecurityProtocolOption = "PLAINTEXT",
    sasl_mechanism: SaslMechanismOption = None,
    sasl_username: SaslUsernameOption = None,
    sasl_password: SaslPasswordOption = None,
) -> None:
    """Follow the commentary topic, one line per commentary (no consumer group: reads only)."""
    connection = kafka_connection(
        bootstrap_servers, security_protocol, sasl_mechanism, sasl_username, sasl_password
    )
    consumer = KafkaConsumer(
        topic,
        **connection.client_config(),
        group_id=None,
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
