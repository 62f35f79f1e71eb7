#!/usr/bin/env bash
# Set up and run every check: lint, then the tests (the default model is fetched first, once).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash deploy/setup.sh)
"$bin/ruff" check .
"$bin/streamsink" model fetch
exec "$bin/python" -m pytest -q "$@"
