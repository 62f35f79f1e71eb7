"""Options declared once, in groups that build frozen settings; secrets never printed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import pytest
import typer
from typer.testing import CliRunner

from cache_store.redis.settings import RedisSettings
from worker.cli.app import app
from worker.cli.option_groups import option_group, uses_groups
from worker.io.kafka_connection import KafkaConnection
from worker.io.topics import TopicNames
from worker.stream.process_settings import ProcessSettings

CLI = Path(__file__).resolve().parents[2] / "worker" / "cli"


def test_every_environment_variable_is_declared_once() -> None:
    declared = [
        name
        for path in sorted(CLI.glob("*.py"))
        for name in re.findall(r'envvar="(STREAMSINK_\w+)"', path.read_text())
    ]
    assert len(declared) > 20
    assert sorted(name for name in set(declared) if declared.count(name) > 1) == []


def test_the_commands_share_one_declaration_of_the_kafka_and_redis_options() -> None:
    command = typer.main.get_command(app)

    def options_of(*path: str) -> set[str]:
        node = command
        for name in path:
            node = node.commands[name]
        return {flag for param in node.params for flag in param.opts}

    for path in [("run",), ("doctor",), ("topics", "create"), ("produce",), ("consume",)]:
        assert {"--bootstrap-servers", "--sasl-password"} <= options_of(*path), path
    redis = {"--redis-url", "--redis-password", "--key-prefix", "--redis-cluster"}
    for path in [("run",), ("doctor",), ("streams", "list"), ("bench", "restore")]:
        assert redis <= options_of(*path), path
    for path in [("run",), ("doctor",), ("bench", "decode"), ("bench", "restore")]:
        assert {"--model", "--threads"} <= options_of(*path), path


def test_secrets_are_hidden_when_printed() -> None:
    kafka = KafkaConnection("b:9092", "SASL_SSL", "PLAIN", "user", "kafka-secret")
    redis = RedisSettings("redis://admin:url-secret@cache:6379/0", password="auth-secret")
    printed = f"{kafka!r} {kafka} {redis!r} {redis} {redis.display_url}"
    for secret in ("kafka-secret", "url-secret", "auth-secret"):
        assert secret not in printed
    assert "redis://admin:***@cache:6379/0" in printed and "user" in printed
    assert RedisSettings("redis://cache:6379/0").display_url == "redis://cache:6379/0"


class _Window:
    def __init__(self, size: int) -> None:
        self.size = size


@option_group("Window")
def _window_options(
    window_size: Annotated[int, typer.Option(envvar="TEST_WINDOW_SIZE")] = 3,
) -> _Window:
    return _Window(window_size)


def test_a_group_becomes_options_and_its_settings_reach_the_command(monkeypatch) -> None:
    seen = []
    demo = typer.Typer()

    @demo.command()
    @uses_groups
    def show(window: _Window, topics: TopicNames, label: str = "x") -> None:
        seen.append((window.size, topics.input, topics.dead_letter, label))

    runner = CliRunner()
    monkeypatch.setenv("TEST_WINDOW_SIZE", "7")
    result = runner.invoke(demo, ["--input-topic", "in", "--dead-letter-topic", "", "--label", "y"])
    assert result.exit_code == 0, result.output
    assert seen == [(7, "in", None, "y")]


class _Other:
    pass


@option_group("Other")
def _other_options(window_size: Annotated[int, typer.Option()] = 1) -> _Other:
    return _Other()


def test_two_groups_declaring_one_option_are_refused() -> None:
    def clash(window: _Window, other: _Other) -> None: ...

    with pytest.raises(TypeError, match="same option"):
        uses_groups(clash)


def test_the_live_stream_budget_reaches_the_process_settings(monkeypatch) -> None:
    seen = []
    demo = typer.Typer()

    @demo.command()
    @uses_groups
    def show(process: ProcessSettings) -> None:
        seen.append(process.max_live_streams)

    runner = CliRunner()
    assert runner.invoke(demo, []).exit_code == 0
    assert runner.invoke(demo, ["--max-live-streams", "3"]).exit_code == 0
    monkeypatch.setenv("STREAMSINK_MAX_LIVE_STREAMS", "5")
    assert runner.invoke(demo, []).exit_code == 0
    assert runner.invoke(demo, ["--max-live-streams", "0"]).exit_code == 2
    assert seen == [None, 3, 5]
