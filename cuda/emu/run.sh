#!/usr/bin/env bash
# Builds the CUDA sources against the CPU emulation in cuda/emu/include and checks them against
# the CPU kernels (cuda/emu/test_emu.cpp). Needs g++ >= 11 and python3; no GPU or nvcc.
#   cuda/emu/run.sh [BUILD_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${1:-$ROOT/build/cuda-emu}"
CXX="${CXX:-g++}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT/src"
# CPU kernels exactly as CMake builds them (gnu++17 -O3: FMA contraction in the AVX2/AVX-512 clones).
CPU_FLAGS="-std=gnu++17 -O3 -fno-math-errno -fPIC -DA2ATS_WITH_CUDA -I$ROOT/cpp/include -pthread"
EMU_FLAGS="-std=gnu++20 -O1 -ffp-contract=off -DA2ATS_WITH_CUDA -I$ROOT/cuda/emu/include -I$ROOT/cuda -I$ROOT/cpp/include -pthread -Wno-unused-variable"
objs=()
for f in "$ROOT"/cpp/src/*.cpp; do
  o="$OUT/$(basename "$f" .cpp).cpu.o"
  $CXX $CPU_FLAGS -c "$f" -o "$o" &
  objs+=("$o")
done
for f in "$ROOT"/cuda/*.cu; do
  name="$(basename "$f" .cu)"
  [ "$name" = scratch ] && continue  # stream-ordered pools: replaced by malloc in test_emu.cpp
  "$PY" "$ROOT/cuda/emu/preprocess.py" "$f" "$OUT/src/$name.cpp"
  $CXX $EMU_FLAGS -x c++ -c "$OUT/src/$name.cpp" -o "$OUT/$name.emu.o" &
  objs+=("$OUT/$name.emu.o")
done
$CXX $EMU_FLAGS -c "$ROOT/cuda/emu/test_emu.cpp" -o "$OUT/test_emu.o" &
objs+=("$OUT/test_emu.o")
wait
$CXX -pthread "${objs[@]}" -o "$OUT/test_emu"
"$OUT/test_emu"
