"""`python -m worker` runs the streamsink command."""

from worker.cli.app import app

app()
