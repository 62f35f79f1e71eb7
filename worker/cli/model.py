"""`streamsink model`: fetch and convert the model once."""

from __future__ import annotations

import typer

from worker.cli.console import exit_on_known_errors
from worker.cli.option_groups import uses_groups
from worker.cli.options import ModelChoice

app = typer.Typer(no_args_is_help=True, help="The model: fetch the embedded default.")


@app.command("fetch")
@uses_groups
def fetch(model: ModelChoice) -> None:
    """Fetch and convert the model once, so later runs load it in about a second."""
    with exit_on_known_errors():
        loaded = ModelChoice(model.spec, "cpu").load()
    parameters = sum(p.numel() for p in loaded.model.parameters()) / 1e6
    typer.echo(
        f"{loaded.name}: {loaded.model.config.model_type}, {parameters:.1f}M parameters, "
        f"fingerprint {loaded.fingerprint}"
    )
