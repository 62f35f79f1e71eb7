"""`streamsink bench`: side-by-side speed figures in one run."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cache_store.redis.settings import RedisSettings
from worker.cli.console import err, exit_on_known_errors
from worker.cli.option_groups import uses_groups
from worker.cli.options import JsonOption, ModelChoice, connect
from worker.model.model_sources import check_dtype

if TYPE_CHECKING:
    from worker.model.loading import LoadedModel
    from worker.tools.llama_cpp_bench import LlamaCpp

app = typer.Typer(no_args_is_help=True, help="Side-by-side speed figures in one run.")

SizesOption = Annotated[str, typer.Option(help="cache sizes to compare")]
RandomConfigOption = Annotated[
    Path | None,
    typer.Option(
        help="time a model built from this config.json with random weights instead "
        "(worker/tools/bench_configs/ has SmolLM2's and a 1.7B Llama's)"
    ),
]


def _sizes(text: str) -> list[int]:
    return [int(size) for size in text.split(",")]


@app.command("decode")
@uses_groups
def decode(
    model: ModelChoice,
    sizes: SizesOption = "256,1024,4096",
    tokens: Annotated[int, typer.Option(help="decode steps timed per size")] = 32,
    stream_lengths: Annotated[str, typer.Option(help="stream lengths for memory")] = (
        "1000,10000,100000"
    ),
    random_config: RandomConfigOption = None,
) -> None:
    """Per-token latency of sink against recompute at equal cache sizes, and memory over time."""
    from worker.tools.decode_bench import run_benchmark

    with exit_on_known_errors():
        loaded = _load(model, random_config)
        run_benchmark(loaded, _sizes(sizes), tokens, _sizes(stream_lengths), out=typer.echo)


def _load(model: ModelChoice, random_config: Path | None) -> LoadedModel:
    """The chosen model, or one of random weights from `random_config`."""
    from worker.model.loading import load_random

    if random_config is None:
        return model.load()
    model.use_threads()
    return load_random(random_config, model.device, model.dtype)


@app.command("throughput")
@uses_groups
def throughput(
    model: ModelChoice,
    streams: Annotated[str, typer.Option(help="numbers of streams to compare")] = "1,4,8,16,32",
    size: Annotated[int, typer.Option(help="cache size, full (every step evicts)")] = 1024,
    steps: Annotated[int, typer.Option(help="decode steps timed per figure (median)")] = 8,
    max_batch: Annotated[
        int | None, typer.Option(min=1, help="at most N rows a batched forward (larger split)")
    ] = None,
    dtypes: Annotated[
        str | None,
        typer.Option(help="dtypes side by side, e.g. float32,bfloat16 (default: --dtype)"),
    ] = None,
    llama_cpp: Annotated[
        bool,
        typer.Option(  # rich would read [llama] as markup and drop it
            help="llama.cpp on the same weights beside float32, where llama-cpp-python is "
            "installed (pip install 'streamsink\\[llama]')"
        ),
    ] = True,
    random_config: RandomConfigOption = None,
    as_json: JsonOption = False,
) -> None:
    """Decode and prefill tokens/s and memory across streams: the batched sink path, one
    forward per stream, plain transformers batched with a DynamicCache (no sinks), and
    llama.cpp where it is installed."""
    with exit_on_known_errors():
        names = dtypes.split(",") if dtypes else [model.dtype]
        for name in names:  # before the seconds that importing the model code takes
            check_dtype(name)
        from worker.tools.throughput_bench import run_throughput_benchmark

        models = [_load(dataclasses.replace(model, dtype=name), random_config) for name in names]
        llama = _llama_cpp(model.spec, models) if llama_cpp and random_config is None else None
        try:
            report = run_throughput_benchmark(
                models, _sizes(streams), size, steps, max_batch, llama
            )
        finally:
            if llama is not None:
                llama.close()
        if as_json:
            typer.echo(json.dumps(report.to_dict()))
        else:
            for line in report.lines():
                typer.echo(line)


def _llama_cpp(spec: str, models: list[LoadedModel]) -> LlamaCpp | None:
    """llama.cpp on the float32 model's weights, or None (and why, on stderr)."""
    import torch

    from worker.tools import llama_cpp_bench

    float32 = [loaded for loaded in models if loaded.dtype == torch.float32]
    why = None
    if not llama_cpp_bench.available():
        why = "llama-cpp-python is not installed (pip install 'streamsink[llama]')"
    elif not float32 or float32[0].device.type != "cpu":
        why = "it runs beside float32 on the CPU only"
    elif llama_cpp_bench.f32_path(spec) is None:
        why = f"{spec} comes from no GGUF"
    if why is not None:
        typer.echo(f"no llama.cpp column: {why}", err=True)
        return None
    with err.status("llama.cpp") as status:
        gguf = llama_cpp_bench.f32_gguf(spec, lambda stage: status.update(stage))
    return llama_cpp_bench.LlamaCpp(gguf, float32[0], torch.get_num_threads())


@app.command("restore")
@uses_groups
def restore(
    model: ModelChoice,
    redis: RedisSettings,
    sizes: SizesOption = "256,1024,4096",
    repeats: Annotated[int, typer.Option(help="timed runs per figure (median)")] = 3,
    json_output: JsonOption = False,
) -> None:
    """Restore from Redis against prefilling the window, with the bytes and time of a full
    checkpoint and of the next one, 16 tokens later (the table goes to stderr with --json).

    Its states go under the key prefix plus '-bench', apart from any worker's."""
    from worker.tools.restore_bench import run_restore_benchmark

    with exit_on_known_errors():
        store = connect(dataclasses.replace(redis, prefix=f"{redis.prefix}-bench"))
        loaded = model.load()
        out = functools.partial(typer.echo, err=json_output)
        figures = run_restore_benchmark(loaded, store, _sizes(sizes), repeats, out=out)
        store.close()
    if json_output:
        typer.echo(json.dumps([row.to_json_dict() for row in figures]))
