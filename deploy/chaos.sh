#!/usr/bin/env bash
# Random faults under three real workers, checked against one uninterrupted run
# (tests/integration/chaos.py; CI runs the `chaos` test, a few faults):
#
#   bash deploy/chaos.sh --faults 50 [--seed S] [--streams 12] [--lines 16] [--dir DIR]
#
# Starts its own Kafka broker and Redis (append-only file) in DIR (default: a temp dir),
# prints each fault as it injects it, then one summary line; exits 1 if any check failed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/system_packages.sh
bin=$(bash deploy/setup.sh)
"$bin/streamsink" model fetch >&2
exec "$bin/python" -m tests.integration.chaos "$@"
