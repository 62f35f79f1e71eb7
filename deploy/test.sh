#!/usr/bin/env bash
# Set up and run every check: lint, then the tests. The first run installs the Debian packages
# of the test services and fetches the default model; the tests start Kafka and Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/system_packages.sh
bin=$(bash deploy/setup.sh)
"$bin/ruff" check .
"$bin/streamsink" model fetch
exec "$bin/python" -m pytest -q "$@"
