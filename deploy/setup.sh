#!/usr/bin/env bash
# Prepare a Python environment for streamsink and print its bin directory.
#
# The virtual environment lives outside the clone, keyed by a hash of the dependency list and
# the Python version, so every clone on a machine reuses it (torch is a few GB) while a change
# of dependencies, or a fresh machine, builds a new one from nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
"$python" - "$requirements" <<'PY'
import sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = sorted(project["dependencies"] + project["optional-dependencies"]["test"])
with open(sys.argv[1], "w") as out:
    out.write(f"# python {sys.version_info[0]}.{sys.version_info[1]}\n" + "\n".join(deps) + "\n")
PY
key=$(sha256sum "$requirements" | cut -c1-16)
root=${STREAMSINK_VENV_ROOT:-$HOME/.cache/streamsink/venvs}
venv="$root/$key"
if [ ! -f "$venv/.complete" ]; then
  echo "setting up $venv (first time on this machine: a few minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip setuptools >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" >&2
  touch "$venv/.complete"
fi
# The project itself changes with every commit: install it editable, without dependencies.
log=$(mktemp)
if ! "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    -e . >"$log" 2>&1; then
  cat "$log" >&2
  exit 1
fi
rm -f "$log"
# The CPU kernels (linear layers, decode attention), built once per machine (says so only
# when it builds them, or cannot).
"$venv/bin/python" -m worker.model.cpu_kernels
echo "$venv/bin"
