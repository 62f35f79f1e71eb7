"""The `streamsink` command: one sub-app per noun, each option declared once (options.py)."""

from __future__ import annotations

import typer

from worker.cli import bench, evaluate, model, streams, topics
from worker.cli.doctor import doctor
from worker.cli.run import run
from worker.cli.traffic import consume, produce

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
    help="Running commentary on unbounded text streams with a StreamingLLM cache.",
)
app.command()(run)
app.command()(produce)
app.command()(consume)
app.command()(doctor)
app.add_typer(model.app, name="model")
app.add_typer(evaluate.app, name="eval")
app.add_typer(bench.app, name="bench")
app.add_typer(streams.app, name="streams")
app.add_typer(topics.app, name="topics")
