"""Every option group of the `streamsink` command, each declared once (see option_groups).

Each option also reads an environment variable, as pods set them. A group builds the frozen
settings object of its concern; the commands take those objects, never loose values.

Settings are plain objects, and what needs torch (the model, the stores' states) is imported
where it is used, so `--help` and the commands that need no model start at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

import typer
from kafka.admin import KafkaAdminClient

from cache_store.redis.settings import DEFAULT_KEY_PREFIX, DEFAULT_REDIS_URL, RedisSettings
from worker.cli.console import err, exit_on_known_errors
from worker.cli.option_groups import option_group
from worker.io.file_source import LineKeys
from worker.io.kafka_connection import KafkaConnection
from worker.io.topics import (
    DEFAULT_DEAD_LETTER_TOPIC,
    DEFAULT_INPUT_TOPIC,
    DEFAULT_OUTPUT_TOPIC,
    TopicNames,
)
from worker.model.cache_settings import BatchSettings, CacheSettings
from worker.model.model_sources import check_dtype, locate_model
from worker.model.packaged_models import DEFAULT_MODEL
from worker.ops.cpu_threads import apply_threads, available_cpus
from worker.runtime.checkpoint_schedule import CheckpointSchedule
from worker.runtime.kafka_settings import GroupSettings
from worker.runtime.state_loss import StateLossPolicy
from worker.stream.chat_format import DEFAULT_INSTRUCTION, DEFAULT_REQUEST, Prompt
from worker.stream.policy import CommentaryPolicy
from worker.stream.process_settings import BadStatePolicy, ProcessSettings
from worker.stream.records import DEFAULT_MAX_RECORD_BYTES

if TYPE_CHECKING:
    from cache_store.redis.store import RedisStore
    from worker.model.loading import LoadedModel

JsonOption = Annotated[bool, typer.Option("--json", help="machine-readable JSON on stdout")]


@option_group("Kafka")
def kafka_options(
    bootstrap_servers: Annotated[
        str | None,
        typer.Option(envvar="STREAMSINK_BOOTSTRAP_SERVERS", help="Kafka brokers, host:port[,...]"),
    ] = None,
    security_protocol: Annotated[
        str,
        typer.Option(
            envvar="STREAMSINK_KAFKA_SECURITY_PROTOCOL",
            help="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        ),
    ] = "PLAINTEXT",
    sasl_mechanism: Annotated[
        str | None,
        typer.Option(envvar="STREAMSINK_KAFKA_SASL_MECHANISM", help="PLAIN, SCRAM-SHA-512, ..."),
    ] = None,
    sasl_username: Annotated[
        str | None, typer.Option(envvar="STREAMSINK_KAFKA_SASL_USERNAME", help="SASL user")
    ] = None,
    sasl_password: Annotated[
        str | None,
        typer.Option(
            envvar="STREAMSINK_KAFKA_SASL_PASSWORD", help="SASL password", show_default=False
        ),
    ] = None,
    kafka_ssl_cafile: Annotated[
        str | None,
        typer.Option(
            envvar="STREAMSINK_KAFKA_SSL_CAFILE", help="CA of a TLS listener (a mounted file)"
        ),
    ] = None,
) -> KafkaConnection | None:
    """None when no brokers are named: `run` then reads a file, admin commands refuse."""
    if not bootstrap_servers:
        return None
    return KafkaConnection(
        bootstrap_servers,
        security_protocol,
        sasl_mechanism,
        sasl_username,
        sasl_password,
        kafka_ssl_cafile or None,
    )


def require_brokers(kafka: KafkaConnection | None) -> KafkaConnection:
    """The connection of a command that cannot work without Kafka."""
    if kafka is None:
        raise typer.BadParameter(
            "no Kafka brokers: pass --bootstrap-servers or set STREAMSINK_BOOTSTRAP_SERVERS",
            param_hint="--bootstrap-servers",
        )
    return kafka


def admin_client(kafka: KafkaConnection | None) -> KafkaAdminClient:
    """An admin client on the brokers of a command that cannot work without Kafka."""
    return KafkaAdminClient(**require_brokers(kafka).client_config())


@option_group("Kafka")
def topic_options(
    input_topic: Annotated[
        str, typer.Option(envvar="STREAMSINK_INPUT_TOPIC", help="topic of the input streams")
    ] = DEFAULT_INPUT_TOPIC,
    output_topic: Annotated[
        str, typer.Option(envvar="STREAMSINK_OUTPUT_TOPIC", help="topic of the commentary")
    ] = DEFAULT_OUTPUT_TOPIC,
    dead_letter_topic: Annotated[
        str,
        typer.Option(
            envvar="STREAMSINK_DEAD_LETTER_TOPIC", help="where bad records go ('' = nowhere)"
        ),
    ] = DEFAULT_DEAD_LETTER_TOPIC,
) -> TopicNames:
    return TopicNames(input_topic, output_topic, dead_letter_topic or None)


@option_group("Redis")
def redis_options(
    redis_url: Annotated[
        str,
        typer.Option(
            envvar="STREAMSINK_REDIS_URL", help="Redis of the states: redis:// or rediss:// (TLS)"
        ),
    ] = DEFAULT_REDIS_URL,
    redis_password: Annotated[
        str | None,
        typer.Option(envvar="STREAMSINK_REDIS_PASSWORD", help="Redis AUTH", show_default=False),
    ] = None,
    key_prefix: Annotated[
        str, typer.Option(envvar="STREAMSINK_KEY_PREFIX", help="prefix of every Redis key")
    ] = DEFAULT_KEY_PREFIX,
    state_ttl_seconds: Annotated[
        int | None,
        typer.Option(envvar="STREAMSINK_STATE_TTL_SECONDS", help="forget streams idle this long"),
    ] = None,
    redis_cluster: Annotated[
        bool,
        typer.Option(
            "--redis-cluster",
            envvar="STREAMSINK_REDIS_CLUSTER",
            help="--redis-url is a node of a Redis Cluster; the others are found from it",
        ),
    ] = False,
) -> RedisSettings:
    return RedisSettings(redis_url, redis_password, key_prefix, state_ttl_seconds, redis_cluster)


def open_store(redis: RedisSettings, retry_seconds: float = 30.0) -> RedisStore:
    """A store on the configured Redis, not asked anything yet (a worker waits for Redis)."""
    from cache_store.redis.store import RedisStore

    return RedisStore(
        redis.url,
        redis.prefix,
        redis.idle_ttl_seconds,
        redis.password,
        retry_seconds,
        redis.cluster,
    )


def connect(redis: RedisSettings, retry_seconds: float = 30.0) -> RedisStore:
    """A store on the configured Redis that has answered a PING."""
    store = open_store(redis, retry_seconds)
    store.ping()
    return store


@dataclass(frozen=True)
class ModelChoice:
    """Which model to load, and where."""

    spec: str = DEFAULT_MODEL
    device: str = "auto"
    threads: int | None = None  # None: the CPUs this process is given
    dtype: str = "auto"  # auto: fp32 on the CPU, bf16 (or fp16) on CUDA

    def check(self) -> None:
        """Refuse a model that is not there, or a dtype there is none of, before the seconds
        that importing the model code takes."""
        locate_model(self.spec)
        check_dtype(self.dtype)

    def use_threads(self) -> int:
        """Size torch's thread pools; before the model loads, so every forward runs on them."""
        return apply_threads(self.threads or available_cpus())

    def load(self) -> LoadedModel:
        """Load it with a spinner on stderr that says what is going on (fetch, convert, load)."""
        from worker.model.loading import load_model

        self.use_threads()
        with err.status("loading model") as status:
            return load_model(
                self.spec, self.device, lambda stage: status.update(stage), self.dtype
            )


@option_group("Model")
def model_options(
    model: Annotated[
        str,
        typer.Option(
            envvar="STREAMSINK_MODEL",
            help="'smollm2' (the embedded default), 'gemma3-270m', a model dir or a .gguf",
        ),
    ] = DEFAULT_MODEL,
    device: Annotated[
        str, typer.Option(envvar="STREAMSINK_DEVICE", help="auto, cpu or cuda")
    ] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            envvar="STREAMSINK_THREADS", min=1, help="torch threads (default: the CPU quota)"
        ),
    ] = None,
    dtype: Annotated[
        str,
        typer.Option(
            envvar="STREAMSINK_DTYPE",
            help="auto (float32 on the CPU, bfloat16 on CUDA), float32, bfloat16 or float16",
        ),
    ] = "auto",
) -> ModelChoice:
    choice = ModelChoice(model, device, threads, dtype)
    with exit_on_known_errors():  # every command that takes a model, before it imports torch
        choice.check()
    return choice


@option_group("Cache")
def cache_options(
    sinks: Annotated[int, typer.Option(envvar="STREAMSINK_SINKS", help="attention sinks kept")] = 4,
    window: Annotated[
        int, typer.Option(envvar="STREAMSINK_WINDOW", help="recent tokens kept")
    ] = 1020,
) -> CacheSettings:
    return CacheSettings(sinks, window)


@option_group("Cache")
def batch_options(
    max_batch: Annotated[
        int | None,
        typer.Option(
            envvar="STREAMSINK_MAX_BATCH",
            min=1,
            help="streams decoded in one forward at most (default: every stream due; 1: one "
            "at a time)",
        ),
    ] = None,
) -> BatchSettings:
    return BatchSettings(max_batch)


@option_group("Commentary")
def policy_options(
    every_records: Annotated[
        int | None,
        typer.Option(envvar="STREAMSINK_EVERY_RECORDS", help="comment every N records"),
    ] = 8,
    every_tokens: Annotated[
        int | None, typer.Option(envvar="STREAMSINK_EVERY_TOKENS", help="comment every N tokens")
    ] = None,
    every_seconds: Annotated[
        float | None,
        typer.Option(envvar="STREAMSINK_EVERY_SECONDS", help="comment every T seconds"),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(envvar="STREAMSINK_MAX_NEW_TOKENS", help="cap on one commentary")
    ] = 48,
    temperature: Annotated[
        float, typer.Option(envvar="STREAMSINK_TEMPERATURE", help="0 = greedy")
    ] = 0.0,
    seed: Annotated[int, typer.Option(envvar="STREAMSINK_SEED", help="sampling seed")] = 0,
    repetition_penalty: Annotated[
        float,
        typer.Option(
            envvar="STREAMSINK_REPETITION_PENALTY",
            help="penalty on tokens of the earlier commentary still in the cache (1 = none)",
        ),
    ] = CommentaryPolicy.repetition_penalty,
    no_repeat_ngram: Annotated[
        int,
        typer.Option(
            envvar="STREAMSINK_NO_REPEAT_NGRAM",
            min=0,
            help=(
                "never repeat an n-gram of that commentary, of the last ones' openings or of"
                " the turn (0 = off)"
            ),
        ),
    ] = CommentaryPolicy.no_repeat_ngram,
) -> CommentaryPolicy:
    return CommentaryPolicy(
        every_records,
        every_tokens,
        every_seconds,
        max_new_tokens,
        temperature,
        seed=seed,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram=no_repeat_ngram,
    )


@option_group("Commentary")
def prompt_options(
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
) -> Prompt:
    return Prompt(instruction, request)


@option_group("Records and streams")
def process_options(
    max_record_bytes: Annotated[
        int,
        typer.Option(envvar="STREAMSINK_MAX_RECORD_BYTES", help="larger records are set aside"),
    ] = DEFAULT_MAX_RECORD_BYTES,
    on_bad_state: Annotated[
        BadStatePolicy,
        typer.Option(
            envvar="STREAMSINK_ON_BAD_STATE",
            help="a stream whose saved state is unusable: set its records aside, or restart it",
        ),
    ] = BadStatePolicy.SKIP,
    max_live_streams: Annotated[
        int | None,
        typer.Option(
            envvar="STREAMSINK_MAX_LIVE_STREAMS",
            min=1,
            help="stream caches kept in memory; idle streams beyond wait in the state store",
        ),
    ] = None,
) -> ProcessSettings:
    return ProcessSettings(max_record_bytes, on_bad_state, max_live_streams)


@option_group("Lines")
def line_key_options(
    stream: Annotated[
        str | None, typer.Option(help="stream id of every line (default: the file's name)")
    ] = None,
    key_separator: Annotated[
        str | None,
        typer.Option(help="the text before this separator on each line is its stream id"),
    ] = None,
) -> LineKeys:
    return LineKeys(stream, key_separator)


@option_group("Checkpoints")
def schedule_options(
    checkpoint_every: Annotated[
        int,
        typer.Option(
            envvar="STREAMSINK_CHECKPOINT_EVERY_RECORDS", help="records between checkpoints"
        ),
    ] = CheckpointSchedule.every_records,
    checkpoint_every_seconds: Annotated[
        float,
        typer.Option(
            envvar="STREAMSINK_CHECKPOINT_EVERY_SECONDS", help="seconds between checkpoints"
        ),
    ] = CheckpointSchedule.every_seconds,
) -> CheckpointSchedule:
    return CheckpointSchedule(checkpoint_every, checkpoint_every_seconds)


@option_group("Kafka")
def group_options(
    group: Annotated[
        str, typer.Option(envvar="STREAMSINK_GROUP", help="Kafka consumer group")
    ] = GroupSettings.name,
    session_timeout_ms: Annotated[
        int, typer.Option(envvar="STREAMSINK_SESSION_TIMEOUT_MS", help="Kafka group session")
    ] = GroupSettings.session_timeout_ms,
    shutdown_seconds: Annotated[
        float,
        typer.Option(envvar="STREAMSINK_SHUTDOWN_SECONDS", help="budget of the final checkpoint"),
    ] = GroupSettings.shutdown_seconds,
    on_state_loss: Annotated[
        StateLossPolicy,
        typer.Option(
            envvar="STREAMSINK_ON_STATE_LOSS",
            help="Redis behind Kafka's committed offset: replay, or resume at Kafka's",
        ),
    ] = GroupSettings.on_state_loss,
) -> GroupSettings:
    return GroupSettings(group, session_timeout_ms, shutdown_seconds, on_state_loss)
