#!/usr/bin/env bash
# Set up and run every check: lint, then the tests. The first run installs the Debian packages
# of the test services and fetches the default model; the tests start Kafka and Redis.
# The whole suite runs on the newest transformers pyproject.toml allows; without arguments,
# the model tests then run once more on the oldest it allows.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/system_packages.sh
bin=$(bash deploy/setup.sh)
"$bin/ruff" check .
"$bin/streamsink" model fetch
"$bin/python" -m pytest -q "$@"
if [ $# -eq 0 ]; then
  oldest=$(bash deploy/oldest_transformers.sh "$bin")
  echo "the model tests again, on $(basename "$oldest")" >&2
  PYTHONPATH="$oldest" "$bin/python" -m pytest -q -p no:cacheprovider tests/models tests/real_model
fi
