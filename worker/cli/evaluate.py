"""`streamsink eval`: score texts the way the paper does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from worker.cli.console import err, exit_on_known_errors
from worker.cli.option_groups import uses_groups
from worker.cli.options import JsonOption, ModelChoice
from worker.io.file_source import FileSource, LineKeys
from worker.model.cache_settings import CacheSettings
from worker.stream.chat_format import Prompt
from worker.stream.policy import CommentaryPolicy

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


@app.command("commentary")
@uses_groups
def commentary(
    model: ModelChoice,
    cache: CacheSettings,
    policy: CommentaryPolicy,
    prompt: Prompt,
    keys: LineKeys,
    file: Annotated[
        Path, typer.Argument(exists=True, dir_okay=False, help="text or log to comment on")
    ],
    dump: Annotated[
        Path | None,
        typer.Option(
            "--commentary",
            exists=True,
            dir_okay=False,
            help="score this `run --json` / `consume --json` dump of FILE instead of writing",
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Repeats, loops, grounding, invention and time of the commentary on FILE.

    Writes it the way `streamsink run` does on a file (no saved state), or scores a dump.
    """
    from worker.stream.commentator import Commentator
    from worker.tools.commentary_eval import (
        read_dump,
        score_commentary,
        stream_lines,
        write_commentary,
    )

    source = FileSource(str(file), keys)
    with exit_on_known_errors():
        if dump is None:
            commentator = Commentator(model.load(), cache, policy, prompt)
            with err.status("writing commentary"):
                written, records, seconds = write_commentary(commentator, source.batches())
            report = score_commentary(written, stream_lines(records), seconds)
        else:
            records = [record for batch in source.batches() for record in batch]
            report = score_commentary(read_dump(dump), stream_lines(records))
    if json_output:
        typer.echo(json.dumps(report.to_json_dict()))
    else:
        typer.echo(report.describe())
