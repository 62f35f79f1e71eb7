"""`python -m worker` runs the streamsink command."""

from worker.cli import app

app()
