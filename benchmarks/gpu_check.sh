#!/usr/bin/env bash
# GPU check of rmpad / varlen attention, one short script (~3-4 minutes on one GPU):
#   1. environment: GPU, torch, which varlen backends exist (env.txt)
#   2. the GPU tests: pytest -m gpu tests/gpu (flash_attn / torch_varlen == sdpa_varlen, bf16 + fp16, causal and
#      not, MLA head dims, segment isolation, no host sync, the tiny model's packed call) (gpu_tests.log)
#   3. the CPU parity tests on this machine's torch (tests/ops, tests/patches: catches torch-version drift)
#   4. benchmarks/throughput.py in bf16 on CUDA: tiny-model training padded vs packing + rmpad (auto -> torch_varlen
#      without flash-attn, and sdpa_varlen), and torch_varlen vs sdpa_varlen vs sdpa_masked at N = 8192
#      (throughput_gpu.log, throughput_gpu.json)
# Results go to $OUT when set (the device tool collects it), else ./out/gpu_check. Exit status 1 if a step failed.
#
#   bash benchmarks/gpu_check.sh
#
# Needs, all present in the GPU machine's image (no network, nothing installed): python3 with a CUDA torch,
# pytest, numpy, pillow, tiktoken, transformers, safetensors, peft (tests/patches), pyyaml. flash-attn is optional:
# its tests skip without it. vlmtune and data_tools are used from this checkout through PYTHONPATH (no pip install;
# `pip install -e . --no-deps` would do the same).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-out/gpu_check}
mkdir -p "$RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
status=0
step() { echo; echo "=== $* ($(date +%T))"; }

step "environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$PY" - <<'EOF'
import importlib, inspect, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE")
for name in ("pytest", "numpy", "PIL", "tiktoken", "transformers", "safetensors", "peft", "flash_attn"):
    try:
        mod = importlib.import_module(name)
        print(f"  {name:13s}", getattr(mod, "__version__", "present"))
    except ImportError as exc:
        print(f"  {name:13s} MISSING ({exc})")
from vlmtune.ops.attention import flash_attn_available, resolve_backend, torch_varlen_available
print("flash_attn available:", flash_attn_available(), "| torch_varlen available:", torch_varlen_available())
if torch_varlen_available():
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
if torch.cuda.is_available():
    print("auto backend on cuda ->", resolve_backend("auto", "cuda"))
EOF
} 2>&1 | tee "$RESULTS/env.txt" || status=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device: stop"; exit 1; }

step "GPU tests"
timeout 200 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/gpu -rs --junitxml="$RESULTS/gpu_tests.xml" 2>&1 \
  | tee "$RESULTS/gpu_tests.log" || status=1

step "CPU parity tests on this torch"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/ops tests/patches 2>&1 | tail -n 40 \
  | tee "$RESULTS/cpu_parity_tests.log" || status=1

step "throughput, bf16 on CUDA"
timeout 240 "$PY" benchmarks/throughput.py --device cuda --dtype bf16 --samples 192 \
  --json "$RESULTS/throughput_gpu.json" 2>&1 | tee "$RESULTS/throughput_gpu.log" || status=1

step "done: exit status $status, results in $RESULTS"
ls -l "$RESULTS"
exit $status
