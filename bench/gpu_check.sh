#!/usr/bin/env bash
# One-shot check of the CUDA half on a machine with an NVIDIA GPU (no network needed):
#
#   bench/gpu_check.sh OUTDIR
#
# 1. reports what the machine has (nvidia-smi, nvcc, torch and its CUDA, pybind11, cmake);
# 2. builds a2ats_core with CUDA for this GPU's architecture into build/gpu-check (plain CMake,
#    so nothing is installed; falls back to `pip install --no-build-isolation --no-deps .`);
# 3. runs the CUDA tests (everything selected by `-k cuda` in the kernel, KV-store, error and
#    CUDA test files), JUnit XML into OUTDIR;
# 4. runs `bench/bench_kernels.py --device cuda`, the decode benchmark (bench/bench_decode.py: the
#    Llama-3.1-8B shape, random bf16 weights, 32k and 128k) and bench/bench_gather_cuda.py;
# 5. if time is left, runs compute-sanitizer (memcheck, then racecheck) over one small call of
#    every kernel.
# Writes OUTDIR/gpu_check.log (everything), summary.txt (one line per step), tests.xml,
# kernels_cuda.csv, decode_cuda_*.csv, gather_cuda.csv. Every step has a time limit and the whole
# run stays under 9.5 minutes (A2ATS_GPU_CHECK_BUDGET seconds, default 560); a failing step does
# not stop the rest.
set -u

if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
OUT="$1"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"
: >"$SUMMARY"
exec > >(tee -a "$LOG") 2>&1

BUDGET="${A2ATS_GPU_CHECK_BUDGET:-560}"
START=$(date +%s)
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c "import torch" >/dev/null 2>&1; then
      PY="$candidate"
      break
    fi
  done
fi
PY="${PY:-python3}"
export PYTHONUNBUFFERED=1
export A2ATS_SKIP_EMULATED_CUDA=1

remaining() { echo $((BUDGET - ($(date +%s) - START))); }

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND with min(LIMIT, time left), logs rc and duration.
step() {
  local name="$1" limit="$2"
  shift 2
  local left
  left=$(remaining)
  if [ "$left" -lt 10 ]; then
    echo "=== $name: skipped, no time left"
    echo "$name skipped (no time left)" >>"$SUMMARY"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo
  echo "=== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
  local cmd="$*"
  echo "+ ${cmd:0:240}"
  local t0 rc
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "=== $name: rc=$rc in $(($(date +%s) - t0)) s"
  echo "$name rc=$rc $(($(date +%s) - t0))s" >>"$SUMMARY"
  return $rc
}

echo "a2ats GPU check, $(date -u), in $ROOT, python: $PY, budget ${BUDGET} s"

# ---- 1. environment ---------------------------------------------------------------------
env_report() {
  nvidia-smi || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max --format=csv || true
  command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc: not on PATH"
  "$PY" - <<'EOF'
import platform, os
print("python", platform.python_version(), "cpus", os.cpu_count())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("device", p.name, "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
              "memory GiB", round(p.total_memory / 2**30, 1))
except Exception as e:
    print("torch: not importable:", e)
for name in ("pybind11", "numpy", "pytest", "scikit_build_core", "transformers"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(name, "missing:", e)
EOF
  cmake --version | head -1 || echo "cmake: missing"
  command -v ninja >/dev/null && echo "ninja $(ninja --version)" || echo "ninja: missing"
  free -g | head -2 || true
}
step environment 60 bash -c "$(declare -f env_report); PY='$PY'; env_report"

# ---- 2. build -----------------------------------------------------------------------------
ARCH="$("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.major}{p.minor}")' 2>/dev/null || echo 90)"
BUILD="$ROOT/build/gpu-check"
build_cmake() {
  local pb gen=()
  pb="$("$PY" -m pybind11 --cmakedir 2>/dev/null || true)"
  command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S "$ROOT" -B "$BUILD" "${gen[@]}" -DA2ATS_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
    -DPython_EXECUTABLE="$(command -v "$PY")" ${pb:+-Dpybind11_DIR="$pb"} -DCMAKE_BUILD_TYPE=Release &&
    cmake --build "$BUILD" -j "$(nproc)"
}
MODULE_PATH=""
if step build_cmake 240 bash -c "$(declare -f build_cmake); PY='$PY'; ROOT='$ROOT'; BUILD='$BUILD'; ARCH='$ARCH'; build_cmake"; then
  MODULE_PATH="$BUILD"
else
  echo "CMake build failed; trying pip (no build isolation, no dependencies)"
  if step build_pip 240 "$PY" -m pip install --no-build-isolation --no-deps -v \
      -Ccmake.define.A2ATS_ENABLE_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" "$ROOT"; then
    MODULE_PATH=""  # installed into site-packages
  fi
fi
export PYTHONPATH="${MODULE_PATH:+$MODULE_PATH:}$ROOT/python${PYTHONPATH:+:$PYTHONPATH}"
step import 60 "$PY" -c "import a2ats_core as c; print(c.__file__, 'built_with_cuda', c.built_with_cuda(), 'devices', c.cuda_device_count())"

# ---- 3. tests -------------------------------------------------------------------------------
TEST_FILES=()
for f in tests/test_cuda.py tests/test_rotary.py tests/test_vq_encode.py tests/test_lut_scores.py tests/test_select_topk.py tests/test_kv_store.py tests/test_errors.py tests/test_pipeline.py tests/test_paged_pipeline.py; do
  [ -f "$f" ] && TEST_FILES+=("$f")
done
step tests 200 "$PY" -m pytest "${TEST_FILES[@]}" -k cuda -q -rs -p no:cacheprovider --junitxml="$OUT/tests.xml"

# ---- 4. benchmarks ------------------------------------------------------------------------
if [ -f bench/bench_kernels.py ]; then
  step bench_kernels 120 "$PY" bench/bench_kernels.py --device cuda --csv "$OUT/kernels_cuda.csv"
else
  echo "bench/bench_kernels.py not found; skipped" | tee -a "$SUMMARY"
fi
# The decode step end to end: the Llama-3.1-8B shape with random weights in bf16, dense and A²ATS on
# the same rows; 32k at batch 1 and 4, 128k at batch 1 (the dense cache must fit beside the model).
if [ -f bench/bench_decode.py ]; then
  step bench_decode_32k 150 "$PY" bench/bench_decode.py --models random --contexts 32768 --batches 1 4 --steps 4 \
    --device cuda --csv "$OUT/decode_cuda_32k.csv"
  step bench_decode_128k 120 "$PY" bench/bench_decode.py --models random --contexts 131072 --batches 1 --steps 4 \
    --device cuda --csv "$OUT/decode_cuda_128k.csv"
fi
step bench_gather 120 "$PY" bench/bench_gather_cuda.py --csv "$OUT/gather_cuda.csv"
rc=$?
if [ $rc -ne 0 ] && [ $rc -ne 2 ]; then  # 2: no usable GPU, nothing to retry
  echo "full-size gather benchmark failed (rc=$rc); retrying with 8 layers"
  step bench_gather_small 60 "$PY" bench/bench_gather_cuda.py --layers 8 --csv "$OUT/gather_cuda.csv"
fi

# ---- 5. sanitizer ---------------------------------------------------------------------------
SANITIZE=$(cat <<'EOF'
import torch, a2ats_core as c
d = "cuda"
x = torch.randn(2, 3, 40, 64, device=d, dtype=torch.float16)
c.rotary(x, torch.arange(40, device=d)[None].expand(2, 40).contiguous() * 1000 - 7,
         1 / 10000 ** (torch.arange(0, 48, 2, device=d).float() / 48), out=x)
cent = torch.randn(2, 2, 300, 32, device=d)
codes = c.vq_encode(torch.randn(1, 2, 70, 64, device=d), cent)
lengths = torch.tensor([5000], dtype=torch.int32, device=d)
codes = torch.randint(0, 300, (1, 2, 5000, 2), dtype=torch.int16, device=d)
codes[0, 1, 7, 1] = 300
s = c.lut_scores(torch.randn(1, 6, 3, 64, device=d), cent, codes, lengths,
                 bin_edges=torch.tensor([64, 512], dtype=torch.int32, device=d))
s = c.lut_scores(torch.randn(1, 6, 64, device=d), torch.randn(2, 1, 30000, 64, device=d),
                 torch.randint(0, 30000, (1, 2, 5000, 1), dtype=torch.int16, device=d), lengths)
s = (s * 4).round()  # heavy ties
idx, cnt = c.select_topk(s, 300, lengths, group_size=3, sink=8, window=64)
store = c.KVStore(1, 1, 2, 64, 5000, torch.float16)
store.append(0, torch.randn(1, 2, 5000, 64, device=d, dtype=torch.float16),
             torch.randn(1, 2, 5000, 64, device=d, dtype=torch.float16))
out = torch.empty(1, 2, idx.shape[-1], 64, device=d, dtype=torch.float16)
store.gather(0, idx, cnt, out, out.clone())
# The CUDA pipeline: prefill, then a few decode steps (attend, merge, resident rows, codes).
L, B, Hkv, G, D = 2, 2, 2, 3, 64
pstore = c.KVStore(L, B, Hkv, D, 600, torch.float16)
chol = torch.eye(D).expand(L, Hkv, D, D).contiguous()
pipe = c.Pipeline(pstore, num_q_heads=Hkv * G, inv_freq=1 / 10000 ** (torch.arange(0, D, 2).float() / D), chol=chol,
                  chol_inv=chol, centroids=torch.randn(L, Hkv, 1, 256, D), sink=4, window=16,
                  wrope_distances=[32, 256], bin_edges=[64], device=d)
for layer in range(L):
    kv = torch.randn(B, Hkv, 500, D, device=d, dtype=torch.float16)
    pipe.prefill(layer, kv, kv.clone(), torch.arange(500, device=d).expand(B, 500).contiguous(),
                 num_tokens=torch.tensor([500, 300], dtype=torch.int32))
for step in range(3):
    pipe.plan(20)
    for layer in range(L):
        new = torch.randn(B, Hkv, 1, D, device=d, dtype=torch.float16)
        pipe.decode(layer, torch.randn(B, Hkv * G, D, device=d, dtype=torch.float16), new, new.clone(),
                    torch.tensor([500 + step, 300 + step], device=d), scale=0.125)
torch.cuda.synchronize()
print("sanitizer script done")
EOF
)
if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -c "$SANITIZE"
  step racecheck 90 compute-sanitizer --tool racecheck --error-exitcode 9 "$PY" -c "$SANITIZE"
else
  echo "compute-sanitizer not found; skipped" | tee -a "$SUMMARY"
fi

echo
echo "=== summary ($(($(date +%s) - START)) s)"
cat "$SUMMARY"
ls -la "$OUT"
exit 0
