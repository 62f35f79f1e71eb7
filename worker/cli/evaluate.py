"""`streamsink eval`: score texts the way the paper does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from worker.cli.console import err, exit_on_known_errors
from worker.cli.option_groups import uses_groups
from worker.cli.options import JsonOption, ModelChoice
from worker.model.cache_settings import CacheSettings

app = typer.Typer(no_args_is_help=True, help="Score texts the way the paper does.")


@app.command("ppl")
@uses_groups
def perplexity(
    model: ModelChoice,
    cache: CacheSettings,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="text to score")],
    mode: Annotated[str, typer.Option(help="dense, window, sink or recompute")] = "sink",
    max_tokens: Annotated[int, typer.Option(help="score at most this many tokens")] = 2000,
    json_output: JsonOption = False,
) -> None:
    """Perplexity token by token: dense, window (no sinks), sink, or recompute."""
    from worker.tools.evaluation import EvalMode, evaluate_perplexity

    with exit_on_known_errors():
        loaded = model.load()
        text = file.read_text(encoding="utf-8", errors="replace")
        result = evaluate_perplexity(
            loaded, text, EvalMode(mode), cache.sinks, cache.window, max_tokens, progress=err
        )
    if json_output:
        typer.echo(json.dumps(result.to_json_dict()))
    else:
        typer.echo(result.describe())
