#!/usr/bin/env bash
# Put the oldest transformers that pyproject.toml allows in front of the environment's own
# (the newest) and print the directory to add to PYTHONPATH. deploy/test.sh runs the model
# tests once more with it, so both ends of the allowed range are tested on every run.
#
# Only transformers and the versions it pins go in this overlay (torch stays the
# environment's), with the `kernels` of its own hub-kernels extra: it imports `kernels` where
# it finds it, and the environment's, pinned by the newest transformers, no longer fits the
# oldest. The overlay is kept in the cache, keyed by that version, across runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$1
version=$("$bin/python" - <<'PY'
import re, tomllib
dependencies = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
spec = next(d for d in dependencies if re.match(r"transformers\b", d))
floor = re.search(r">=\s*([0-9][0-9.]*)", spec).group(1)
print(floor + ".0" * (2 - floor.count(".")))
PY
)
overlay=${STREAMSINK_VENV_ROOT:-$HOME/.cache/streamsink/venvs}/transformers-$version
if [ ! -f "$overlay/.complete" ]; then
  echo "installing transformers $version for the oldest-release tests" >&2
  rm -rf "$overlay"
  for attempt in 1 2 3; do
    if "$bin/pip" install --quiet --disable-pip-version-check --target "$overlay" \
        "transformers[hub-kernels]==$version" >&2; then
      touch "$overlay/.complete"
      break
    fi
    echo "pip failed (attempt $attempt of 3)" >&2
    sleep 5
  done
  [ -f "$overlay/.complete" ] || exit 1
fi
echo "$overlay"
