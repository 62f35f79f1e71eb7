"""Options several commands share; each also reads an environment variable, as pods set them."""

from __future__ import annotations

from typing import Annotated

import typer

from worker.kafka_io import KafkaConnection

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
    return KafkaConnection(
        bootstrap_servers, security_protocol, sasl_mechanism, sasl_username, sasl_password
    )
