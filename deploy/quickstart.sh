#!/usr/bin/env bash
# Set up and run the main job on the embedded default: comment on the sample log.
# Extra arguments go to `streamsink run` (for example --follow, --json, --every-records 4).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash deploy/setup.sh)
exec "$bin/streamsink" run --source file:worker/samples/app.log --state dir:.streamsink-state \
  --every-records 24 "$@"
