"""structlog: readable on a terminal, JSON lines otherwise; logs go to stderr, output to stdout."""

from __future__ import annotations

import logging
import sys

import structlog


def configure_logging(level: str = "info") -> None:
    renderer = (
        structlog.dev.ConsoleRenderer()
        if sys.stderr.isatty()
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # Looked up per logger, so a replaced sys.stderr (tests, CliRunner) is followed.
        logger_factory=lambda *args: structlog.PrintLogger(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (kafka-python, redis) log through the standard library: their warnings show.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    # kafka-python warns whenever its IO thread waited for the GIL, i.e. during every model
    # step; heartbeats still leave well within the session timeout, so that is noise here.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
