"""What several commands share: options (each also read from an environment variable, as pods
set them) and how known errors end a command."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from kafka.errors import KafkaError
from rich.console import Console

from cache_store.exceptions import StateError
from worker.exceptions import StreamsinkError
from worker.io.kafka_connection import KafkaConnection

err = Console(stderr=True)


@contextmanager
def exit_on_known_errors() -> Iterator[None]:
    """Known errors end the command with a message and exit code 2, not a traceback."""
    try:
        yield
    except (StreamsinkError, StateError, KafkaError, ValueError) as error:
        err.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None


BootstrapOption = Annotated[
    str,
    typer.Option(envvar="STREAMSINK_BOOTSTRAP_SERVERS", help="Kafka brokers, host:port[,...]"),
]
InputTopicOption = Annotated[
    str, typer.Option(envvar="STREAMSINK_INPUT_TOPIC", help="topic of the input streams")
]
OutputTopicOption = Annotated[
    str, typer.Option(envvar="STREAMSINK_OUTPUT_TOPIC", help="topic of the commentary")
]
SecurityProtocolOption = Annotated[
    str,
    typer.Option(
        envvar="STREAMSINK_KAFKA_SECURITY_PROTOCOL",
        help="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
    ),
]
SaslMechanismOption = Annotated[
    str | None,
    typer.Option(envvar="STREAMSINK_KAFKA_SASL_MECHANISM", help="PLAIN, SCRAM-SHA-512, ..."),
]
SaslUsernameOption = Annotated[
    str | None, typer.Option(envvar="STREAMSINK_KAFKA_SASL_USERNAME", help="SASL user")
]
SaslPasswordOption = Annotated[
    str | None,
    typer.Option(envvar="STREAMSINK_KAFKA_SASL_PASSWORD", help="SASL password", show_default=False),
]

DEFAULT_INPUT_TOPIC = "streamsink-input"
DEFAULT_OUTPUT_TOPIC = "streamsink-commentary"
DEFAULT_DEAD_LETTER_TOPIC = "streamsink-dead-letter"


def kafka_connection(
    bootstrap_servers: str,
    security_protocol: str,
    sasl_mechanism: str | None,
    sasl_username: str | None,
    sasl_password: str | None,
) -> KafkaConnection:
    """The connection settings; the CA of a TLS listener comes from STREAMSINK_KAFKA_SSL_CAFILE
    (a mounted file in pods), since no one types a CA path by hand."""
    return KafkaConnection(
        bootstrap_servers,
        security_protocol,
        sasl_mechanism,
        sasl_username,
        sasl_password,
        os.environ.get("STREAMSINK_KAFKA_SSL_CAFILE") or None,
    )


RedisUrlOption = Annotated[
    str,
    typer.Option(
        envvar="STREAMSINK_REDIS_URL", help="Redis of the states: redis:// or rediss:// (TLS)"
    ),
]
RedisPasswordOption = Annotated[
    str | None,
    typer.Option(envvar="STREAMSINK_REDIS_PASSWORD", help="Redis AUTH", show_default=False),
]
KeyPrefixOption = Annotated[
    str, typer.Option(envvar="STREAMSINK_KEY_PREFIX", help="prefix of every Redis key")
]
JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")]
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
