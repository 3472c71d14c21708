#!/usr/bin/env bash
# Run THERE (the GPU machine: Python 3.12 and torch, no network), from the repo root, with the kit that
# jobs/device/build-kit.sh made carried along in .kit/:
#   1. unpack .kit/kit.tar.xz into /tmp/d3hr-kit and put it on PYTHONPATH after the working tree;
#   2. the GPU-marked tests (pytest -m gpu), at most TEST_S seconds (0: skip them);
#   3. python -m benchmarks gpu, with what is left of BUDGET_S as its own budget.
# Everything lands in $OUT (env.txt, pytest.log, bench.log, bench-gpu.json), written as it goes.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/d3hr-device-out}
KIT=${KIT:-.kit}
BUDGET_S=${BUDGET_S:-400}   # this whole script; leave the caller's timeout some room above it
TEST_S=${TEST_S:-120}
PY=${PY:-python3}
t0=$(date +%s)
mkdir -p "$OUT" /tmp/d3hr-kit
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$PWD:/tmp/d3hr-kit/site${PYTHONPATH:+:$PYTHONPATH}"
export RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TORCHINDUCTOR_CACHE_DIR=/tmp/d3hr-inductor

tar -xJf "$KIT/kit.tar.xz" -C /tmp/d3hr-kit || { echo "cannot unpack $KIT/kit.tar.xz" | tee "$OUT/env.txt"; exit 2; }
{
    echo "date: $(date -u +%FT%TZ)  unpacked in $(( $(date +%s) - t0 )) s"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
    $PY - <<'PY' 2>&1
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for p in ("ray", "diffusers", "numpy", "pyarrow", "pandas", "safetensors", "pillow", "scipy", "pytest", "huggingface-hub", "protobuf"):
    try:
        print(f"  {p} {md.version(p)}")
    except md.PackageNotFoundError:
        print(f"  {p} MISSING")
import diffusers, ray, d3hr_ray  # what the bench needs importable
print("imports ok:", ray.__file__)
PY
} 2>&1 | tee "$OUT/env.txt"

if (( TEST_S > 0 )); then  # TEST_S=0 skips the tests (a rerun of the bench alone)
    mapfile -t gpu_tests < <(grep -rl "pytest.mark.gpu" tests --include='test_*.py')
    timeout "$TEST_S" $PY -m pytest -q -m gpu -p no:cacheprovider "${gpu_tests[@]}" 2>&1 | tee "$OUT/pytest.log"
    echo "pytest exit ${PIPESTATUS[0]}" | tee -a "$OUT/pytest.log"
fi

left=$(( BUDGET_S - ($(date +%s) - t0) - 10 ))
echo "bench gpu: $left s left" | tee "$OUT/bench.log"
$PY -m benchmarks gpu --budget-s "$left" --out "$OUT/bench-gpu.json" "$@" 2>&1 | tee -a "$OUT/bench.log"
echo "bench exit ${PIPESTATUS[0]}, script $(( $(date +%s) - t0 )) s" | tee -a "$OUT/bench.log"
