"""`streamsink run`: comment on a file or stdin, or, with brokers named, on a Kafka topic."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import structlog
import typer

from cache_store import from_url
from cache_store.redis.settings import RedisSettings
from worker.cli.console import exit_on_known_errors
from worker.cli.option_groups import option_group, uses_groups
from worker.cli.options import JsonOption, ModelChoice, open_store
from worker.io.file_source import FileSource, LineKeys
from worker.io.kafka_connection import KafkaConnection
from worker.io.outputs import JsonLinesOutput, TextOutput
from worker.io.topics import TopicNames
from worker.model.cache_settings import BatchSettings, CacheSettings
from worker.ops.health import Health, serve
from worker.ops.logs import configure_logging
from worker.ops.metrics import WorkerMetrics
from worker.runtime.checkpoint_schedule import CheckpointSchedule
from worker.runtime.kafka_settings import GroupSettings, WorkerSettings
from worker.stream.chat_format import Prompt
from worker.stream.policy import CommentaryPolicy
from worker.stream.process_settings import ProcessSettings

if TYPE_CHECKING:
    from worker.stream.commentator import Commentator

    Start = Callable[[Commentator, WorkerMetrics, Health], None]

log = structlog.get_logger("streamsink.cli")

DEFAULT_METRICS_PORT = 9400  # of Kafka runs; local runs serve none unless asked


@dataclass(frozen=True)
class LocalInput:
    """What a local run reads, where it keeps its states, and how it prints."""

    source: str  # file:PATH or - for stdin
    state: str  # a state store URL: dir:PATH, memory: or a Redis URL
    follow: bool
    json_output: bool


@option_group("Local run")
def local_input_options(
    source: Annotated[
        str, typer.Option(envvar="STREAMSINK_SOURCE", help="file:PATH, or - for stdin")
    ] = "-",
    state: Annotated[
        str,
        typer.Option(
            envvar="STREAMSINK_STATE",
            help="local runs: where stream states live (dir:PATH, memory: or a Redis URL)",
        ),
    ] = "dir:.streamsink-state",
    follow: Annotated[
        bool, typer.Option(help="wait for new lines at the end, like tail -f")
    ] = False,
    json_output: JsonOption = False,
) -> LocalInput:
    return LocalInput(source, state, follow, json_output)


@dataclass(frozen=True)
class Operations:
    metrics_port: int | None  # None: Kafka runs serve on 9400, local runs serve nothing
    log_level: str


@option_group("Operations")
def operations_options(
    metrics_port: Annotated[
        int | None,
        typer.Option(
            envvar="STREAMSINK_METRICS_PORT",
            help="serve /metrics, /healthz, /readyz (0 = any free port; Kafka runs: 9400)",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="STREAMSINK_LOG_LEVEL")] = "info",
) -> Operations:
    return Operations(metrics_port, log_level)


@uses_groups
def run(
    model: ModelChoice,
    cache: CacheSettings,
    batching: BatchSettings,
    policy: CommentaryPolicy,
    prompt: Prompt,
    local: LocalInput,
    keys: LineKeys,
    process: ProcessSettings,
    schedule: CheckpointSchedule,
    kafka: KafkaConnection | None,
    topics: TopicNames,
    group: GroupSettings,
    redis: RedisSettings,
    operations: Operations,
) -> None:
    """Comment on a file or stdin, or, with --bootstrap-servers, on a Kafka topic.

    Local runs keep state in --state, and a second run over a longer file continues where
    the first stopped. Kafka runs join --group, keep state in Redis and move streams
    between workers without recomputation.
    """
    configure_logging(operations.log_level)
    metrics, health, stop = WorkerMetrics(), Health(), threading.Event()
    metrics_port = operations.metrics_port
    with exit_on_known_errors():
        if kafka is None:
            start = _local_run(local, keys, schedule, process, stop)
        else:
            start = _kafka_run(kafka, redis, WorkerSettings(topics, group, schedule, process), stop)
            metrics_port = DEFAULT_METRICS_PORT if metrics_port is None else metrics_port
        server = None if metrics_port is None else serve(metrics, health, port=metrics_port)
        if server is not None:
            log.info("serving metrics", port=server.port)
        from worker.stream.commentator import Commentator  # torch: once the inputs are checked

        commentator = Commentator(model.load(), cache, policy, prompt, batching)
        health.model_loaded = True
        start(commentator, metrics, health)
        if server is not None:
            server.close()
    typer.echo(_summary_line(metrics), err=True)


def _local_run(
    local: LocalInput,
    keys: LineKeys,
    schedule: CheckpointSchedule,
    process: ProcessSettings,
    stop: threading.Event,
) -> Start:
    """Check the local run's inputs before the model loads; return what starts it."""
    path = local.source.removeprefix("file:")
    if path != "-" and not Path(path).is_file():
        raise ValueError(f"no file at {path!r}; pass --source file:PATH or - for stdin")
    store = from_url(local.state)
    from worker.runtime.local_run import Runner, RunSettings

    settings = RunSettings(schedule, process)
    lines = FileSource(path, keys, local.follow)
    _stop_on_signals(stop, lines.stop)
    output = JsonLinesOutput() if local.json_output else TextOutput()

    def start(commentator: Commentator, metrics: WorkerMetrics, health: Health) -> None:
        health.group_joined = True  # a local run has no group to join
        Runner(commentator, lines, output, store, settings, metrics).run(stop)

    return start


def _kafka_run(
    kafka: KafkaConnection,
    redis: RedisSettings,
    settings: WorkerSettings,
    stop: threading.Event,
) -> Start:
    """Return what starts the worker; it waits for Redis and the brokers if they are down."""
    from worker.runtime.kafka_run import KafkaWorker

    store = open_store(redis)
    _stop_on_signals(stop)

    def start(commentator: Commentator, metrics: WorkerMetrics, health: Health) -> None:
        KafkaWorker(commentator, kafka, store, settings, metrics, health).run(stop)

    return start


def _summary_line(metrics: WorkerMetrics) -> str:
    """The stop summary (the counters the Kafka worker also logs) as one line for a person."""
    return ", ".join(
        f"{name.replace('_', ' ')} {value:.0f}" for name, value in metrics.summary().items()
    )


def _stop_on_signals(stop: threading.Event, also: Callable[[], None] | None = None) -> None:
    """SIGINT/SIGTERM finish the step in flight, checkpoint and exit."""

    def handle(signum: int, frame: object) -> None:
        stop.set()
        if also is not None:
            also()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
