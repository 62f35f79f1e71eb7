"""GET a worker's /metrics, /healthz or /readyz: the status and the body, whatever they are."""

from __future__ import annotations

import urllib.error
import urllib.request


def scrape(port: int, path: str) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers (the worker is gone)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError) as error:
        return 0, str(error)
