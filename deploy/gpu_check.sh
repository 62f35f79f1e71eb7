#!/usr/bin/env bash
# The GPU's checks and figures in one run, on a machine with an NVIDIA GPU and the project's
# packages importable (CI has no GPU; these tests skip their GPU cases there):
#   - the fixed-shape decode step's tests on the GPU, its CUDA graphs included;
#   - `bench throughput` on SmolLM2's config with random weights (1 to 32 streams, cache 1024);
#   - `bench decode`, sink against recompute, on SmolLM2 (cache 1024) and on the 1.7B Llama
#     config (cache 4096).
# Models are built from config files with random weights: no model download, and speed does
# not depend on the weights. Logs go to $OUT (default /tmp/gpu-check).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 STREAMSINK_CPU_KERNELS=0 # the CPU's kernels are not needed here
configs=worker/tools/bench_configs
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
python3 -m pytest -q -p no:cacheprovider tests/models/test_graph_step.py -k cuda 2>&1 |
	tee "$out/tests.log" || status=1
python3 -m worker bench throughput --device cuda --random-config "$configs/smollm2-135m.json" \
	--streams 1,4,8,16,32 --size 1024 --steps 32 2>&1 | tee "$out/throughput.log" || status=1
python3 -m worker bench decode --device cuda --random-config "$configs/smollm2-135m.json" \
	--sizes 1024 --tokens 64 --stream-lengths 1000 2>&1 | tee "$out/decode-smollm2.log" || status=1
python3 -m worker bench decode --device cuda --random-config "$configs/llama-1.7b.json" \
	--sizes 4096 --tokens 64 --stream-lengths 1000 2>&1 | tee "$out/decode-1.7b.log" || status=1
exit "$status"
