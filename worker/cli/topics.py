"""`streamsink topics`: create and describe the input, output and dead-letter topics."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient

from worker.cli.console import exit_on_known_errors
from worker.cli.option_groups import uses_groups
from worker.cli.options import JsonOption, admin_client
from worker.io.kafka_connection import KafkaConnection
from worker.io.topics import TopicNames

app = typer.Typer(no_args_is_help=True, help="The worker's Kafka topics: create, describe.")

DAY_MS = 24 * 3600 * 1000
TOPIC_ALREADY_EXISTS = 36  # Kafka's error code: creating is idempotent here


@app.command()
@uses_groups
def create(
    kafka: KafkaConnection | None,
    topics: TopicNames,
    partitions: Annotated[
        int, typer.Option(help="input partitions: the most workers that can share the load")
    ] = 12,
    replication_factor: Annotated[int, typer.Option(help="copies of each partition")] = 1,
    input_retention_days: Annotated[float, typer.Option(help="how long input is kept")] = 7,
    output_retention_days: Annotated[
        float, typer.Option(help="how long commentary and dead letters are kept")
    ] = 30,
) -> None:
    """Create the topics; ones that exist already are left as they are."""
    wanted = {
        topics.input: (partitions, input_retention_days),
        topics.output: (partitions, output_retention_days),
    }
    if topics.dead_letter:
        wanted[topics.dead_letter] = (1, output_retention_days)
    with exit_on_known_errors():
        admin = admin_client(kafka)
        result = admin.create_topics(
            {
                name: {
                    "num_partitions": count,
                    "replication_factor": replication_factor,
                    "configs": {"retention.ms": str(int(days * DAY_MS))},
                }
                for name, (count, days) in wanted.items()
            },
            raise_errors=False,
        )
        admin.close()
    failed = False
    for topic in result["topics"]:
        code = topic["error_code"]
        if code == 0:
            typer.echo(f"created {topic['name']}: {topic['num_partitions']} partitions")
        elif code == TOPIC_ALREADY_EXISTS:
            typer.echo(f"exists  {topic['name']}: left as it is")
        else:
            failed = True
            typer.echo(f"failed  {topic['name']}: {topic['error_message']}", err=True)
    if failed:
        raise typer.Exit(1)


@app.command()
@uses_groups
def describe(
    kafka: KafkaConnection | None, topics: TopicNames, json_output: JsonOption = False
) -> None:
    """Partitions, replicas and retention of the topics; exit code 1 if one is missing."""
    with exit_on_known_errors():
        admin = admin_client(kafka)
        existing = set(admin.list_topics())
        rows = [
            _describe(admin, name) if name in existing else {"topic": name} for name in topics.all()
        ]
        admin.close()
    if json_output:
        typer.echo(json.dumps(rows))
    else:
        _print_table(rows)
    if any("partitions" not in row for row in rows):
        raise typer.Exit(1)


def _print_table(rows: list[dict[str, Any]]) -> None:
    typer.echo(f"{'topic':<32} {'partitions':>10} {'replicas':>8} {'retention':>10}")
    for row in rows:
        if "partitions" not in row:
            typer.echo(f"{row['topic']:<32} missing (create it with `streamsink topics create`)")
            continue
        days = f"{row['retention_ms'] / DAY_MS:g}d" if row["retention_ms"] >= 0 else "forever"
        typer.echo(f"{row['topic']:<32} {row['partitions']:>10} {row['replicas']:>8} {days:>10}")


def _describe(admin: KafkaAdminClient, name: str) -> dict[str, Any]:
    partitions = admin.describe_topics([name])[0]["partitions"]
    configs = admin.describe_configs(
        [ConfigResource(ConfigResourceType.TOPIC, name, None)], config_filter="all"
    )["topic"][name]
    return {
        "topic": name,
        "partitions": len(partitions),
        "replicas": len(partitions[0]["replica_nodes"]) if partitions else 0,
        "retention_ms": int(configs["retention.ms"]["value"]),
    }
