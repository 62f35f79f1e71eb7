#!/usr/bin/env bash
# Debian packages the tests' services need (redis-server, redis-cli, and openssl for the TLS
# test's certificate), and what builds the CPU kernels (g++ and ninja, see
# worker/model/cpu_kernels.py); a no-op when present.
# Java 17 and Maven, for the Kafka broker, come with the machine.
set -euo pipefail
if command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
    && command -v openssl >/dev/null && command -v g++ >/dev/null && command -v ninja >/dev/null; then
  exit 0
fi
sudo=""
[ "$(id -u)" -ne 0 ] && sudo=sudo
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >&2
$sudo apt-get install -y -q --no-install-recommends redis-server redis-tools openssl g++ \
  ninja-build >&2
