"""What every command shares at the terminal: a stderr console and how known errors end it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from kafka.errors import KafkaError
from rich.console import Console

from cache_store.exceptions import StateError
from worker.exceptions import StreamsinkError

err = Console(stderr=True)


@contextmanager
def exit_on_known_errors() -> Iterator[None]:
    """Known errors end the command with a message and exit code 2, not a traceback."""
    try:
        yield
    except (StreamsinkError, StateError, KafkaError, ValueError) as error:
        err.print(f"[red]error:[/red] {error}")
        raise typer.Exit(2) from None
