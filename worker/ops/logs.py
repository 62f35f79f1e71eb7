"""structlog: readable on a terminal, JSON lines otherwise; logs go to stderr, output to stdout.

Libraries (kafka-python, redis) log through the standard library; their records go through
the same renderer, so a JSON log stays all JSON.
"""

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
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso"),
    ]
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        # Looked up per logger, so a replaced sys.stderr (tests, CliRunner) is followed.
        logger_factory=lambda *args: structlog.PrintLogger(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer, foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared]
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    # kafka-python warns whenever its IO thread waited for the GIL, i.e. during every model
    # step; heartbeats still leave well within the session timeout, so that is noise here.
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
