"""Kafka plumbing the worker and the CLI share: client settings, record conversion, output.

Output records are keyed by stream id, so a stream's commentary keeps its order on the output
topic. Dead letters keep the original key and bytes, with the reason in headers, so nothing
set aside is lost and a fixed record can be replayed from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kafka import KafkaProducer
from kafka.consumer.fetcher import ConsumerRecord

from worker.exceptions import BadRecordError
from worker.records import Commentary, Record


@dataclass(frozen=True)
class KafkaConnection:
    """How to reach the brokers; SASL and TLS settings come from the environment in pods."""

    bootstrap_servers: str
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None

    def client_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers.split(","),
            "security_protocol": self.security_protocol,
            "client_id": "streamsink",
        }
        if self.sasl_mechanism:
            config |= {
                "sasl_mechanism": self.sasl_mechanism,
                "sasl_plain_username": self.sasl_username,
                "sasl_plain_password": self.sasl_password,
            }
        if self.ssl_cafile:
            config["ssl_cafile"] = self.ssl_cafile
        return config


def to_record(message: ConsumerRecord) -> Record:
    """An input record as the processor sees it; a key that is not UTF-8 counts as no key."""
    try:
        stream_id = None if message.key is None else message.key.decode("utf-8")
    except UnicodeDecodeError:
        stream_id = None
    return Record(stream_id, message.offset, message.value or b"", message.partition)


def commentary_payload(commentary: Commentary) -> bytes:
    """The output record's value: the JSON consumers read (stream id, seq, offsets, text...)."""
    return json.dumps(commentary.to_json_dict(), ensure_ascii=False).encode()


class OutputProducer:
    """Commentary and dead letters out, idempotent and acknowledged by all in-sync replicas."""

    def __init__(
        self, connection: KafkaConnection, output_topic: str, dead_letter_topic: str | None
    ) -> None:
        self.output_topic = output_topic
        self.dead_letter_topic = dead_letter_topic
        self.producer = KafkaProducer(
            **connection.client_config(), acks="all", enable_idempotence=True, linger_ms=5
        )

    def send_commentary(self, stream_id: str, payload: bytes) -> None:
        self.producer.send(self.output_topic, key=stream_id.encode(), value=payload)

    def send_dead_letter(self, topic: str, record: Record, error: BadRecordError) -> None:
        """Forward a record set aside; without a dead-letter topic it is only logged."""
        if self.dead_letter_topic is None:
            return
        headers = [
            ("streamsink.reason", error.reason.encode()),
            ("streamsink.error", str(error).encode()),
            ("streamsink.source", f"{topic}/{record.partition}@{record.offset}".encode()),
        ]
        self.producer.send(
            self.dead_letter_topic,
            key=None if record.stream_id is None else record.stream_id.encode(),
            value=record.value,
            headers=headers,
        )

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything sent is acknowledged; raises KafkaTimeoutError if not."""
        self.producer.flush(timeout=timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.producer.close(timeout=timeout)
