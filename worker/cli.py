"""The `streamsink` command: one sub-app per noun, options that also read the environment."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cache_store import from_url
from worker.chat_format import DEFAULT_INSTRUCTION, DEFAULT_REQUEST
from worker.engine import CacheSettings, Engine
from worker.exceptions import StreamsinkError
from worker.logging_setup import configure_logging
from worker.model_loading import LoadedModel, load_model, load_random
from worker.policy import CommentaryPolicy
from worker.runner import BadStatePolicy, Runner, RunSettings
from worker.sinks import JsonLinesSink, TextSink
from worker.sources import FileSource

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Running commentary on unbounded text streams with a StreamingLLM cache.",
)
model_app = typer.Typer(no_args_is_help=True, help="The model: fetch the embedded default.")
eval_app = typer.Typer(no_args_is_help=True, help="Score texts the way the paper does.")
app.add_typer(model_app, name="model")
app.add_typer(eval_app, name="eval")

err = Console(stderr=True)

ModelOption = Annotated[
    str,
    typer.Option(
        envvar="STREAMSINK_MODEL", help="'smollm2' (the embedded default), a model dir or a .gguf"
    ),
]
DeviceOption = Annotated[str, typer.Option(envvar="STREAMSINK_DEVICE", help="auto, cpu or cuda")]
SinksOption = Annotated[int, typer.Option(envvar="STREAMSINK_SINKS", help="attention sinks kept")]
WindowOption = Annotated[int, typer.Option(envvar="STREAMSINK_WINDOW", help="recent tokens kept")]


@contextmanager
def _failures_as_exit_codes() -> Iterator[None]:
    """Known errors end the command with a message and exit code 2, not a traceback."""
    try:
        yield
    except (StreamsinkError, ValueError) as error:
        err.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None


def load_with_progress(model: str, device: str) -> LoadedModel:
    with err.status("loading model") as status:
        return load_model(model, device, progress=lambda stage: status.update(stage))


@model_app.command("fetch")
def model_fetch(model: ModelOption = "smollm2") -> None:
    """Fetch and convert the model once, so later runs load it in about a second."""
    with _failures_as_exit_codes():
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
            envvar="STREAMSINK_STATE", help="where stream states live: dir:PATH or memory:"
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
    checkpoint_every: Annotated[int, typer.Option(help="records between checkpoints")] = 256,
    max_record_bytes: Annotated[int, typer.Option(help="larger records are skipped")] = 65536,
    on_bad_state: Annotated[
        BadStatePolicy,
        typer.Option(help="a stream whose saved state is unusable: restart it, or skip it"),
    ] = BadStatePolicy.RESTART,
    log_level: Annotated[str, typer.Option(envvar="STREAMSINK_LOG_LEVEL")] = "info",
) -> None:
    """Comment on a file or stdin; a second run over a longer file continues where it stopped."""
    configure_logging(log_level)
    with _failures_as_exit_codes():
        path = source.removeprefix("file:")
        if path != "-" and not Path(path).is_file():
            raise ValueError(f"no file at {path!r}; pass --source file:PATH or - for stdin")
        policy = CommentaryPolicy(
            every_records, every_tokens, every_seconds, max_new_tokens, temperature, seed=seed
        )
        store = from_url(state)
        loaded = load_with_progress(model, device)
        engine = Engine(loaded, CacheSettings(sinks, window), policy, instruction, request)
        file_source = FileSource(path, stream, key_separator, follow)
        sink = JsonLinesSink() if json_output else TextSink()
        runner = Runner(
            engine,
            file_source,
            sink,
            store,
            RunSettings(
                checkpoint_every_records=checkpoint_every,
                max_record_bytes=max_record_bytes,
                on_bad_state=on_bad_state,
            ),
        )
        stop = threading.Event()
        _stop_on_signals(stop, file_source)
        stats = runner.run(stop)
    err.print(
        f"records {stats.records}, commentaries {stats.commentaries}, streams new "
        f"{stats.new_streams} restored {stats.restored_streams}, skipped "
        f"{dict(stats.skipped) or 0}, checkpoint bytes {stats.checkpoint_bytes}"
    )


def _stop_on_signals(stop: threading.Event, source: FileSource) -> None:
    """SIGINT/SIGTERM finish the step in flight, checkpoint and exit."""

    def handle(signum: int, frame: object) -> None:
        stop.set()
        source.stop()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)


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
    from worker.evaluation import EvalMode, evaluate_perplexity

    with _failures_as_exit_codes():
        loaded = load_with_progress(model, device)
        text = file.read_text(encoding="utf-8", errors="replace")
        result = evaluate_perplexity(
            loaded, text, EvalMode(mode), sinks, window, max_tokens, progress=err
        )
    if json_output:
        typer.echo(json.dumps(result.to_json_dict()))
    else:
        typer.echo(result.describe())


@app.command()
def bench(
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
            "(worker/bench_configs/ has a 1.7B Llama)"
        ),
    ] = None,
) -> None:
    """Per-token latency of sink against recompute at equal cache sizes, and memory over time."""
    from worker.benchmark import run_benchmark

    with _failures_as_exit_codes():
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
