"""The `streamsink` command: one sub-app per noun, options that also read the environment."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import structlog
import typer

from cache_store import from_url
from cache_store.redis.store import RedisStore
from worker.cli import streams, topics
from worker.cli.doctor import doctor
from worker.cli.options import (
    DEFAULT_DEAD_LETTER_TOPIC,
    DEFAULT_INPUT_TOPIC,
    DEFAULT_OUTPUT_TOPIC,
    DEFAULT_REDIS_URL,
    InputTopicOption,
    KeyPrefixOption,
    OutputTopicOption,
    RedisPasswordOption,
    RedisUrlOption,
    SaslMechanismOption,
    SaslPasswordOption,
    SaslUsernameOption,
    SecurityProtocolOption,
    err,
    exit_on_known_errors,
    kafka_connection,
)
from worker.cli.traffic import consume, produce
from worker.io.file_source import FileSource
from worker.io.outputs import JsonLinesOutput, TextOutput
from worker.model.cache_settings import CacheSettings
from worker.model.loading import LoadedModel, load_model, load_random
from worker.ops.health import Health, serve
from worker.ops.logs import configure_logging
from worker.ops.metrics import WorkerMetrics
from worker.runtime.checkpoint_schedule import CheckpointSchedule
from worker.runtime.kafka_run import KafkaWorker, StateLossPolicy, WorkerSettings
from worker.runtime.local_run import Runner, RunSettings
from worker.stream.chat_format import DEFAULT_INSTRUCTION, DEFAULT_REQUEST, Prompt
from worker.stream.commentator import Commentator
from worker.stream.policy import CommentaryPolicy
from worker.stream.processor import BadStatePolicy, ProcessSettings

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Running commentary on unbounded text streams with a StreamingLLM cache.",
)
model_app = typer.Typer(no_args_is_help=True, help="The model: fetch the embedded default.")
eval_app = typer.Typer(no_args_is_help=True, help="Score texts the way the paper does.")
app.add_typer(model_app, name="model")
bench_app = typer.Typer(no_args_is_help=True, help="Side-by-side speed figures in one run.")
app.add_typer(eval_app, name="eval")
app.add_typer(bench_app, name="bench")

log = structlog.get_logger("streamsink.cli")

ModelOption = Annotated[
    str,
    typer.Option(
        envvar="STREAMSINK_MODEL", help="'smollm2' (the embedded default), a model dir or a .gguf"
    ),
]
DeviceOption = Annotated[str, typer.Option(envvar="STREAMSINK_DEVICE", help="auto, cpu or cuda")]
SinksOption = Annotated[int, typer.Option(envvar="STREAMSINK_SINKS", help="attention sinks kept")]
WindowOption = Annotated[int, typer.Option(envvar="STREAMSINK_WINDOW", help="recent tokens kept")]


def load_with_progress(model: str, device: str) -> LoadedModel:
    with err.status("loading model") as status:
        return load_model(model, device, progress=lambda stage: status.update(stage))


@model_app.command("fetch")
def model_fetch(model: ModelOption = "smollm2") -> None:
    """Fetch and convert the model once, so later runs load it in about a second."""
    with exit_on_known_errors():
        loaded = load_with_progress(model, "cpu")
    typer.echo(
        f"{loaded.name}: {loaded.model.config.model_type}, "
        f"{sum(p.numel() for p in loaded.model.parameters()) / 1e6:.1f}M parameters, "
        f"fingerprint {loaded.fingerprint}"
    )


@app.command()
def run(
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
    stream: Annotated[str | None, typer.Option(help="stream id (default: the file's name)")] = None,
    key_separator: Annotated[
        str | None,
        typer.Option(help="the text before this separator on each line is its stream id"),
    ] = None,
    bootstrap_servers: Annotated[
        str | None,
        typer.Option(
            envvar="STREAMSINK_BOOTSTRAP_SERVERS",
            help="Kafka brokers: run as a distributed worker instead of on a file",
        ),
    ] = None,
    input_topic: InputTopicOption = DEFAULT_INPUT_TOPIC,
    output_topic: OutputTopicOption = DEFAULT_OUTPUT_TOPIC,
    dead_letter_topic: Annotated[
        str,
        typer.Option(
            envvar="STREAMSINK_DEAD_LETTER_TOPIC", help="where bad records go ('' = nowhere)"
        ),
    ] = DEFAULT_DEAD_LETTER_TOPIC,
    group: Annotated[
        str, typer.Option(envvar="STREAMSINK_GROUP", help="Kafka consumer group")
    ] = "streamsink",
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    redis_password: RedisPasswordOption = None,
    key_prefix: KeyPrefixOption = "streamsink",
    state_ttl_seconds: Annotated[
        int | None,
        typer.Option(envvar="STREAMSINK_STATE_TTL_SECONDS", help="forget streams idle this long"),
    ] = None,
    security_protocol: SecurityProtocolOption = "PLAINTEXT",
    sasl_mechanism: SaslMechanismOption = None,
    sasl_username: SaslUsernameOption = None,
    sasl_password: SaslPasswordOption = None,
    session_timeout_ms: Annotated[
        int, typer.Option(envvar="STREAMSINK_SESSION_TIMEOUT_MS", help="Kafka group session")
    ] = 30000,
    shutdown_seconds: Annotated[
        float,
        typer.Option(envvar="STREAMSINK_SHUTDOWN_SECONDS", help="budget of the final checkpoint"),
    ] = 60.0,
    on_state_loss: Annotated[
        StateLossPolicy,
        typer.Option(help="Redis behind Kafka's committed offset: replay, or resume at Kafka's"),
    ] = StateLossPolicy.REPLAY,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            envvar="STREAMSINK_METRICS_PORT",
            help="serve /metrics, /healthz, /readyz (0 = any free port; Kafka runs: 9400)",
        ),
    ] = None,
    model: ModelOption = "smollm2",
    device: DeviceOption = "auto",
    sinks: SinksOption = 4,
    window: WindowOption = 1020,
    instruction: Annotated[
        str,
        typer.Option(envvar="STREAMSINK_INSTRUCTION", help="system prompt, pinned in the cache"),
    ] = DEFAULT_INSTRUCTION,
    request: Annotated[
        str,
        typer.Option(
            envvar="STREAMSINK_REQUEST", help="question that closes each batch of records"
        ),
    ] = DEFAULT_REQUEST,
    every_records: Annotated[int | None, typer.Option(help="comment every N records")] = 8,
    every_tokens: Annotated[int | None, typer.Option(help="comment every N tokens")] = None,
    every_seconds: Annotated[float | None, typer.Option(help="comment every T seconds")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="cap on one commentary")] = 48,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    json_output: Annotated[bool, typer.Option("--json", help="JSON lines on stdout")] = False,
    checkpoint_every: Annotated[
        int,
        typer.Option(
            envvar="STREAMSINK_CHECKPOINT_EVERY_RECORDS", help="records between checkpoints"
        ),
    ] = 256,
    checkpoint_every_seconds: Annotated[
        float,
        typer.Option(
            envvar="STREAMSINK_CHECKPOINT_EVERY_SECONDS", help="seconds between checkpoints"
        ),
    ] = 10.0,
    max_record_bytes: Annotated[int, typer.Option(help="larger records are set aside")] = 65536,
    on_bad_state: Annotated[
        BadStatePolicy,
        typer.Option(
            envvar="STREAMSINK_ON_BAD_STATE",
            help="a stream whose saved state is unusable: set its records aside, or restart it",
        ),
    ] = BadStatePolicy.SKIP,
    log_level: Annotated[str, typer.Option(envvar="STREAMSINK_LOG_LEVEL")] = "info",
) -> None:
    """Comment on a file or stdin, or, with --bootstrap-servers, on a Kafka topic.

    Local runs keep state in --state, and a second run over a longer file continues where
    the first stopped. Kafka runs join --group, keep state in Redis and move streams
    between workers without recomputation.
    """
    configure_logging(log_level)
    metrics, health = WorkerMetrics(), Health()
    stop = threading.Event()
    with exit_on_known_errors():
        policy = CommentaryPolicy(
            every_records, every_tokens, every_seconds, max_new_tokens, temperature, seed=seed
        )
        process = ProcessSettings(max_record_bytes, on_bad_state)
        if bootstrap_servers is None:
            path = source.removeprefix("file:")
            if path != "-" and not Path(path).is_file():
                raise ValueError(f"no file at {path!r}; pass --source file:PATH or - for stdin")
            store = from_url(state)
            file_source = FileSource(path, stream, key_separator, follow)
            _stop_on_signals(stop, file_source.stop)
        else:
            store = RedisStore(redis_url, key_prefix, state_ttl_seconds, redis_password)
            store.ping()
            _stop_on_signals(stop)
            metrics_port = 9400 if metrics_port is None else metrics_port
        server = None if metrics_port is None else serve(metrics, health, port=metrics_port)
        if server is not None:
            log.info("serving metrics", port=server.port)
        loaded = load_with_progress(model, device)
        engine = Commentator(
            loaded, CacheSettings(sinks, window), policy, Prompt(instruction, request)
        )
        health.model_loaded = True
        if bootstrap_servers is None:
            health.group_joined = True  # a local run has no group to join
            output = JsonLinesOutput() if json_output else TextOutput()
            schedule = CheckpointSchedule(checkpoint_every, checkpoint_every_seconds)
            settings = RunSettings(schedule, process)
            Runner(engine, file_source, output, store, settings, metrics).run(stop)
        else:
            connection = kafka_connection(
                bootstrap_servers, security_protocol, sasl_mechanism, sasl_username, sasl_password
            )
            settings = WorkerSettings(
                input_topic,
                output_topic,
                group,
                dead_letter_topic or None,
                CheckpointSchedule(checkpoint_every, checkpoint_every_seconds),
                shutdown_seconds,
                session_timeout_ms,
                on_state_loss=on_state_loss,
                process=process,
            )
            KafkaWorker(engine, connection, store, settings, metrics, health).run(stop)
        if server is not None:
            server.close()
    typer.echo(
        f"records {metrics.value('streamsink_records'):.0f}, commentaries "
        f"{metrics.value('streamsink_commentaries'):.0f}, streams new "
        f"{metrics.value('streamsink_new_streams'):.0f} restored "
        f"{metrics.value('streamsink_restored_streams'):.0f}, set aside "
        f"{metrics.value('streamsink_dead_letter_records'):.0f}, checkpoint bytes "
        f"{metrics.value('streamsink_checkpoint_bytes'):.0f}",
        err=True,
    )


def _stop_on_signals(stop: threading.Event, also: Callable[[], None] | None = None) -> None:
    """SIGINT/SIGTERM finish the step in flight, checkpoint and exit."""

    def handle(signum: int, frame: object) -> None:
        stop.set()
        if also is not None:
            also()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


app.command()(produce)
app.command()(consume)
app.command()(doctor)
app.add_typer(streams.app, name="streams")
app.add_typer(topics.app, name="topics")


@eval_app.command("ppl")
def eval_ppl(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="text to score")],
    mode: Annotated[str, typer.Option(help="dense, window, sink or recompute")] = "sink",
    sinks: SinksOption = 4,
    window: WindowOption = 252,
    max_tokens: Annotated[int, typer.Option(help="score at most this many tokens")] = 2000,
    model: ModelOption = "smollm2",
    device: DeviceOption = "auto",
    json_output: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Perplexity token by token: dense, window (no sinks), sink, or recompute."""
    from worker.tools.evaluation import EvalMode, evaluate_perplexity

    with exit_on_known_errors():
        loaded = load_with_progress(model, device)
        text = file.read_text(encoding="utf-8", errors="replace")
        result = evaluate_perplexity(
            loaded, text, EvalMode(mode), sinks, window, max_tokens, progress=err
        )
    if json_output:
        typer.echo(json.dumps(result.to_json_dict()))
    else:
        typer.echo(result.describe())


@bench_app.command("decode")
def bench_decode(
    model: ModelOption = "smollm2",
    device: DeviceOption = "auto",
    sizes: Annotated[str, typer.Option(help="cache sizes to compare")] = "256,1024,4096",
    tokens: Annotated[int, typer.Option(help="decode steps timed per size")] = 32,
    stream_lengths: Annotated[str, typer.Option(help="stream lengths for memory")] = (
        "1000,10000,100000"
    ),
    random_config: Annotated[
        Path | None,
        typer.Option(
            help="time a model built from this config.json with random weights instead "
            "(worker/tools/bench_configs/ has a 1.7B Llama)"
        ),
    ] = None,
) -> None:
    """Per-token latency of sink against recompute at equal cache sizes, and memory over time."""
    from worker.tools.decode_bench import run_benchmark

    with exit_on_known_errors():
        if random_config is None:
            loaded = load_with_progress(model, device)
        else:
            loaded = load_random(random_config, device)
        run_benchmark(
            loaded,
            [int(s) for s in sizes.split(",")],
            tokens,
            [int(s) for s in stream_lengths.split(",")],
            out=typer.echo,
        )


@bench_app.command("restore")
def bench_restore(
    redis_url: RedisUrlOption = DEFAULT_REDIS_URL,
    model: ModelOption = "smollm2",
    device: DeviceOption = "auto",
    sizes: Annotated[str, typer.Option(help="cache sizes to compare")] = "256,1024,4096",
    repeats: Annotated[int, typer.Option(help="timed runs per figure (median)")] = 3,
) -> None:
    """Restore from Redis against prefilling the window, with checkpoint bytes and time."""
    from worker.tools.restore_bench import run_restore_benchmark

    with exit_on_known_errors():
        store = RedisStore(redis_url, prefix="streamsink-bench")
        store.ping()
        loaded = load_with_progress(model, device)
        run_restore_benchmark(
            loaded, store, [int(s) for s in sizes.split(",")], repeats, out=typer.echo
        )
        store.close()
