"""`streamsink doctor`: can a worker run here? Kafka, Redis, the model, the GPU, in plain words."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Annotated

import torch
import typer
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from cache_store.exceptions import StateError
from cache_store.redis.store import RedisStore
from worker.cli.options import (
    DEFAULT_DEAD_LETTER_TOPIC,
    DEFAULT_INPUT_TOPIC,
    DEFAULT_OUTPUT_TOPIC,
    DEFAULT_REDIS_URL,
    BootstrapOption,
    InputTopicOption,
    JsonOption,
    KeyPrefixOption,
    OutputTopicOption,
    RedisPasswordOption,
    RedisUrlOption,
    SaslMechanismOption,
    SaslPasswordOption,
    SaslUsernameOption,
    SecurityProtocolOption,
    kafka_connection,
)
from worker.exceptions import StreamsinkError
from worker.model.loading import load_model


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_kafka(admin_config: dict, topics: list[str]) -> Check:
    try:
        admin = KafkaAdminClient(**admin_config, request_timeout_ms=10000)
    except KafkaError as error:
        servers = ",".join(admin_config["bootstrap_servers"])
        return Check("kafka", False, f"cannot reach {servers} ({error}): is the broker up?")
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    missing = [topic for topic in topics if topic not in existing]
    if missing:
        return Check(
            "kafka", False, f"topics missing: {', '.join(missing)} (`streamsink topics create`)"
        )
    return Check("kafka", True, f"answers; topics {', '.join(topics)} exist")


def check_redis(url: str, password: str | None, prefix: str) -> Check:
    try:
        store = RedisStore(url, prefix, password=password, retry_seconds=2)
        store.ping()
        version = store.client.info("server")["redis_version"]
        streams = len(store.list_streams())
        store.close()
    except (StateError, ValueError) as error:
        return Check("redis", False, f"{error}: is Redis up, and are the URL and password right?")
    return Check("redis", True, f"Redis {version} answers; {streams} streams under {prefix!r}")


def check_model(model: str, device: str, cache_tokens: int) -> Check:
    try:
        loaded = load_model(model, device)
    except (StreamsinkError, OSError, ValueError) as error:
        return Check("model", False, str(error))
    if cache_tokens > loaded.max_cache:
        return Check(
            "model",
            False,
            f"{loaded.name} attends to {loaded.max_cache} tokens, fewer than the cache of "
            f"{cache_tokens}: lower --window",
        )
    parameters = sum(p.numel() for p in loaded.model.parameters()) / 1e6
    return Check(
        "model",
        True,
        f"{loaded.name} ({loaded.model.config.model_type}, {parameters:.0f}M parameters) loads "
        f"on {loaded.device} as {str(loaded.dtype).removeprefix('torch.')}",
    )


def check_gpu(device: str) -> Check:
    if not torch.cuda.is_available():
        if device == "cuda":
            return Check("gpu", False, "--device cuda, but torch sees no CUDA GPU")
        return Check("gpu", True, "no GPU: the worker runs on the CPU in fp32 (slower)")
    free, total = torch.cuda.mem_get_info()
    return Check(
        "gpu",
        True,
        f"{torch.cuda.get_device_name()}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free",
    )


def doctor(
    bootstrap_servers: BootstrapOption = "127.0.0.1:9092",
    input_topic: InputTopicOption = DEFAULT_INPUT_TOPIC,
    output_topic: OutputTopicOption = DEFAULT_OUTPUT_TOPIC,
    dead_letter_topic: Annotated[
        str, typer.Option(envvar="STREAMSINK_DEAD_LETTER_TOPIC")
    ] = DEFAULT_DEAD_LETTER_TOPIC,
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    redis_password: RedisPasswordOption = None,
    key_prefix: KeyPrefixOption = "streamsink",
    model: Annotated[str, typer.Option(envvar="STREAMSINK_MODEL")] = "smollm2",
    device: Annotated[str, typer.Option(envvar="STREAMSINK_DEVICE")] = "auto",
    sinks: Annotated[int, typer.Option(envvar="STREAMSINK_SINKS")] = 4,
    window: Annotated[int, typer.Option(envvar="STREAMSINK_WINDOW")] = 1020,
    security_protocol: SecurityProtocolOption = "PLAINTEXT",
    sasl_mechanism: SaslMechanismOption = None,
    sasl_username: SaslUsernameOption = None,
    sasl_password: SaslPasswordOption = None,
    json_output: JsonOption = False,
) -> None:
    """Check what a worker needs; exit code 1 if something is wrong."""
    connection = kafka_connection(
        bootstrap_servers, security_protocol, sasl_mechanism, sasl_username, sasl_password
    )
    checks: list[Callable[[], Check]] = [
        lambda: check_kafka(
            connection.client_config(), [input_topic, output_topic, dead_letter_topic]
        ),
        lambda: check_redis(redis_url, redis_password, key_prefix),
        lambda: check_model(model, device, sinks + window),
        lambda: check_gpu(device),
    ]
    results = [check() for check in checks]
    if json_output:
        typer.echo(json.dumps([asdict(result) for result in results]))
    else:
        for result in results:
            typer.echo(f"{'ok  ' if result.ok else 'FAIL'} {result.name:<6} {result.detail}")
    if not all(result.ok for result in results):
        raise typer.Exit(1)
