"""`streamsink streams`: what the state store holds, stream by stream, and moving it around."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cache_store.redis.settings import RedisSettings
from worker.cli.console import err, exit_on_known_errors
from worker.cli.option_groups import uses_groups
from worker.cli.options import JsonOption, connect

if TYPE_CHECKING:
    from cache_store.redis.admin import StreamInfo

app = typer.Typer(no_args_is_help=True, help="Stream states in Redis: list, show, evict, move.")

StreamArgument = Annotated[str, typer.Argument(help="stream id (the input record key)")]
NOT_FOUND = 1  # exit code when the stream has no state


def describe(info: StreamInfo) -> dict[str, Any]:
    """What an operator wants to know about a stream, from its info and saved meta."""
    layout = info.meta.get("layout", {})
    counters = info.meta.get("counters", {})
    topic, _, partition = info.scope.rpartition("/")
    return {
        "stream_id": info.stream_id,
        "topic": topic or None,
        "partition": int(partition) if partition.isdigit() else None,
        "epoch": info.epoch,
        "partition_next_offset": info.partition_next_offset,
        "tokens_seen": layout.get("tokens_seen"),
        "cache_fill": f"{layout.get('length', 0)}/{layout.get('capacity', 0)}",
        "bytes": info.manifest_bytes + info.block_bytes,
        "last_offset": counters.get("next_offset", 0) - 1,
        "next_seq": counters.get("next_seq"),
        "last_commentary_time": counters.get("last_commentary_time"),
        "fingerprint": info.fingerprint,
        "ttl_seconds": info.ttl_seconds,
    }


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp)) + "Z"


@app.command("list")
@uses_groups
def list_streams(
    redis: RedisSettings,
    json_output: JsonOption = False,
) -> None:
    """Every stream with a saved state: owner partition, tokens, size, last offset."""
    with exit_on_known_errors():
        store = connect(redis)
        rows = [describe(info) for sid in store.list_streams() if (info := store.info(sid))]
    if json_output:
        typer.echo(json.dumps(rows))
        return
    typer.echo(
        f"{'stream':<24} {'partition':>9} {'epoch':>5} {'tokens':>9} {'cache':>9} "
        f"{'MB':>7} {'last offset':>11}  last commentary"
    )
    for row in rows:
        typer.echo(
            f"{row['stream_id']:<24} {str(row['partition']):>9} {str(row['epoch']):>5} "
            f"{row['tokens_seen']:>9} {row['cache_fill']:>9} {row['bytes'] / 2**20:>7.1f} "
            f"{row['last_offset']:>11}  {_when(row['last_commentary_time'])}"
        )


@app.command()
@uses_groups
def show(
    stream: StreamArgument,
    redis: RedisSettings,
    json_output: JsonOption = False,
) -> None:
    """One stream's state in detail; exit code 1 if it has none."""
    with exit_on_known_errors():
        info = connect(redis).info(stream)
    if info is None:
        err.print(f"no saved state for stream {stream!r}")
        raise typer.Exit(NOT_FOUND)
    row = describe(info)
    if json_output:
        typer.echo(json.dumps(row))
        return
    row["last_commentary_time"] = _when(row["last_commentary_time"])
    for key, value in row.items():
        typer.echo(f"{key:<22} {value}")


@app.command()
@uses_groups
def evict(
    stream: StreamArgument,
    redis: RedisSettings,
) -> None:
    """Forget a stream's state: its next record starts it afresh (seq from 0 again)."""
    with exit_on_known_errors():
        removed = connect(redis).delete(stream)
    if not removed:
        err.print(f"no saved state for stream {stream!r}")
        raise typer.Exit(NOT_FOUND)
    typer.echo(f"evicted {stream}")


@app.command("export")
@uses_groups
def export_stream(
    stream: StreamArgument,
    file: Annotated[Path, typer.Argument(help="file to write", dir_okay=False)],
    redis: RedisSettings,
) -> None:
    """Write a stream's state to one file (verified, exact), e.g. to move it to another Redis."""
    from cache_store.export import export_state
    from cache_store.redis.store import LOCAL_SCOPE

    with exit_on_known_errors():
        store = connect(redis)
        state = store.load(stream)
        if state is None:
            err.print(f"no saved state for stream {stream!r}")
            raise typer.Exit(NOT_FOUND)
        file.write_bytes(export_state(state, store.scope_of(stream) or LOCAL_SCOPE))
    typer.echo(f"exported {stream} to {file} ({file.stat().st_size} bytes)")


@app.command("import")
@uses_groups
def import_stream(
    file: Annotated[Path, typer.Argument(help="a file written by `streams export`", exists=True)],
    redis: RedisSettings,
) -> None:
    """Store an exported state under its stream id and partition, replacing what is there."""
    from cache_store.export import import_state

    with exit_on_known_errors():
        state, scope = import_state(file.read_bytes())
        store = connect(redis)
        store.commit_unfenced(scope, [state])
    typer.echo(f"imported {state.stream_id} into {scope}")
