"""`streamsink doctor`: can a worker run here? Kafka, Redis, the model, the GPU, in plain words.

torch and the model code are imported by the checks that use them, as in every CLI module:
the command line starts without them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import typer
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from cache_store.exceptions import StateError
from cache_store.redis.settings import RedisSettings
from worker.cli.option_groups import uses_groups
from worker.cli.options import JsonOption, ModelChoice, connect
from worker.exceptions import StreamsinkError
from worker.io.kafka_connection import KafkaConnection
from worker.io.topics import TopicNames
from worker.model.cache_settings import CacheSettings

if TYPE_CHECKING:
    from worker.model.loading import LoadedModel


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_kafka(kafka: KafkaConnection | None, topics: list[str]) -> Check:
    if kafka is None:
        return Check(
            "kafka", False, "no brokers named: pass --bootstrap-servers or set "
            "STREAMSINK_BOOTSTRAP_SERVERS",
        )  # fmt: skip
    try:
        admin = KafkaAdminClient(**kafka.client_config(), request_timeout_ms=10000)
    except KafkaError as error:
        return Check(
            "kafka", False, f"cannot reach {kafka.bootstrap_servers} ({error}): is the broker up?"
        )
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


def check_redis(redis: RedisSettings) -> Check:
    try:
        store = connect(redis, retry_seconds=2)
        version = store.client.info("server")["redis_version"]
        streams = len(store.list_streams())
        store.close()
    except (StateError, ValueError) as error:
        return Check("redis", False, f"{error}: is Redis up, and are the URL and password right?")
    return Check(
        "redis", True, f"Redis {version} answers; {streams} streams under {redis.prefix!r}"
    )


def check_model(model: ModelChoice, cache_tokens: int) -> Check:
    from worker.model.loading import load_model

    threads = model.use_threads()
    try:
        loaded = load_model(model.spec, model.device, dtype=model.dtype)
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
        f"on {loaded.device} as {str(loaded.dtype).removeprefix('torch.')}, "
        f"{threads} CPU threads{_cpu_kernels(loaded)}",
    )


def _cpu_kernels(loaded: LoadedModel) -> str:
    """Which kernels a CPU worker's forwards run: ours (cpu_kernels.py), or the stock ones and
    why."""
    from worker.model import cpu_kernels, decode_kernel
    from worker.model.batch_invariance import PackedLinear

    if loaded.device.type != "cpu":
        return ""
    kernels = cpu_kernels.status()
    if not kernels.ready:
        return f"; linear layers through oneDNN, decode attention through torch ({kernels.summary})"
    linear = any(isinstance(m, PackedLinear) and m.ours for m in loaded.model.modules())
    attention = loaded.dtype in decode_kernel.DTYPES
    return (
        f"; linear layers through {'streamsink' if linear else 'oneDNN'}'s kernels, "
        f"decode attention through {'streamsink' if attention else 'torch'}'s kernels "
        f"({kernels.instruction_set})"
    )


def check_gpu(device: str) -> Check:
    import torch

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


@uses_groups
def doctor(
    kafka: KafkaConnection | None,
    topics: TopicNames,
    redis: RedisSettings,
    model: ModelChoice,
    cache: CacheSettings,
    json_output: JsonOption = False,
) -> None:
    """Check what a worker needs; exit code 1 if something is wrong."""
    checks: list[Callable[[], Check]] = [
        lambda: check_kafka(kafka, topics.all()),
        lambda: check_redis(redis),
        lambda: check_model(model, cache.capacity),
        lambda: check_gpu(model.device),
    ]
    results = [check() for check in checks]
    if json_output:
        typer.echo(json.dumps([asdict(result) for result in results]))
    else:
        for result in results:
            typer.echo(f"{'ok  ' if result.ok else 'FAIL'} {result.name:<6} {result.detail}")
    if not all(result.ok for result in results):
        raise typer.Exit(1)
