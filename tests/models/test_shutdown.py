"""SIGTERM on a following run: finish the step, save the state, exit cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cache_store.local import LocalDirStore
from tests.models.tiny_models import run_arguments, save_tiny_model


def test_sigterm_saves_the_state_and_exits_zero(tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "model")
    log = tmp_path / "live.log"
    log.write_text("".join(f"12:00:{i:02d} INFO request {i}\n" for i in range(6)))
    arguments = run_arguments(log, tmp_path / "state", model_dir, every_records=3)
    command = [sys.executable, "-m", "worker", *arguments, "--follow", "--checkpoint-every", "1000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    worker = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        assert '"seq": 0' in worker.stdout.readline()
        assert '"seq": 1' in worker.stdout.readline()
        time.sleep(0.5)
        worker.send_signal(signal.SIGTERM)
        _, stderr = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert worker.returncode == 0, stderr
    state = LocalDirStore(tmp_path / "state").load("live")
    assert state is not None
    assert state.meta["counters"]["next_offset"] == 6
    assert state.meta["counters"]["next_seq"] == 2
