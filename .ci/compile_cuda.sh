#!/usr/bin/env bash
# Compile-only check of every CUDA source with nvcc, for sm_80 and sm_90, on a machine without a
# GPU: csrc/cuda/*.cu against the installed torch's headers (the CPU wheel ships c10/cuda and
# ATen/cuda), bench/*.cu against csrc/include alone. Warnings are errors (nvcc and the host
# compiler's -Wall -Wextra; torch's headers are -isystem). ptxas' resource report is checked too:
# a kernel that spills more than 128 bytes fails: that is what a 32-float register array pushed to
# local memory looks like, while a few spilled words at a deliberate register cap (split groups of
# 64 fp32 values per thread, 2 blocks per SM) are a trade for occupancy.
# Also builds the host emulator of the kernel bodies used by tests/test_cuda_emulated.py into
# build/cuda-emulation/ (skip with AQUAKV_SKIP_EMULATOR=1).
#
# Env: NVCC (default: $CUDA_HOME/bin/nvcc, /usr/local/cuda/bin/nvcc, then PATH), PYTHON (a Python
# with torch; default: python, then python3), JOBS (parallel compiles; default: nproc), ARCHS
# (default: "80 90"). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

find_nvcc() {
  local c
  for c in "${NVCC:-}" "${CUDA_HOME:+$CUDA_HOME/bin/nvcc}" /usr/local/cuda/bin/nvcc "$(command -v nvcc || true)"; do
    if [ -n "$c" ] && [ -x "$c" ]; then echo "$c"; return 0; fi
  done
  return 1
}
NVCC=$(find_nvcc) || { echo "compile_cuda.sh: nvcc not found (set NVCC or CUDA_HOME)" >&2; exit 1; }
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
JOBS=${JOBS:-$(nproc)}
ARCHS=${ARCHS:-80 90}

TORCH_INC=$("$PYTHON" -c "import torch.utils.cpp_extension as e; print(' '.join('-isystem ' + p for p in e.include_paths()))") ||
  { echo "compile_cuda.sh: $PYTHON cannot import torch" >&2; exit 1; }

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo "nvcc: $NVCC ($("$NVCC" --version | tail -1)); archs: $ARCHS; jobs: $JOBS"

COMMON="-std=c++17 -O3 --expt-relaxed-constexpr -lineinfo -Werror all-warnings -Xcompiler -Wall,-Wextra -Xptxas -v -Icsrc/include -Icsrc"
# What torch's extension builder defines for CUDA sources, so our headers must live with it; the
# CPU wheel lacks the generated c10/cuda/impl/cuda_cmake_macros.h, which this define skips.
TORCH_DEFS="-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
-D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__"

GENCODE=""
for arch in $ARCHS; do GENCODE="$GENCODE -gencode arch=compute_$arch,code=sm_$arch"; done

# One nvcc per file for all archs (the host side, torch's headers included, is parsed once).
jobs_file="$OUT/jobs"
: >"$jobs_file"
for f in csrc/cuda/*.cu; do
  if [ -e "$f" ]; then echo "$f|${ARCHS// /+}|$COMMON $TORCH_DEFS $TORCH_INC $GENCODE -c" >>"$jobs_file"; fi
done
for f in bench/*.cu; do
  if [ -e "$f" ]; then echo "$f|${ARCHS// /+}|$COMMON $GENCODE -c" >>"$jobs_file"; fi
done
if [ "${AQUAKV_SKIP_EMULATOR:-0}" != 1 ]; then
  mkdir -p build/cuda-emulation
  echo "tests/cuda_emulation/emulate_ops.cu|host|-std=c++17 -O2 -Werror all-warnings -Xcompiler -Wall,-Wextra,-fno-strict-aliasing -Icsrc/include -gencode arch=compute_90,code=sm_90 -o build/cuda-emulation/emulate_ops" >>"$jobs_file"
fi

compile_one() {
  local line=$1 out=$2 nvcc=$3
  local file=${line%%|*} rest=${line#*|}
  local arch=${rest%%|*} flags=${rest#*|}
  local tag
  tag=$(echo "$file.$arch" | tr '/' '_')
  local start=$SECONDS
  # shellcheck disable=SC2086
  if [ "$arch" = host ]; then
    "$nvcc" $flags "$file" >"$out/$tag.log" 2>&1
  else
    "$nvcc" $flags "$file" -o "$out/$tag.o" >"$out/$tag.log" 2>&1
  fi
  local rc=$?
  echo "$rc $((SECONDS - start))s $file ($arch)" >"$out/$tag.status"
}
export -f compile_one

t0=$SECONDS
tr '\n' '\0' <"$jobs_file" | xargs -0 -P "$JOBS" -I{} bash -c 'compile_one "$1" "$2" "$3"' _ {} "$OUT" "$NVCC"

fail=0
for s in "$OUT"/*.status; do
  read -r rc secs rest <"$s"
  log=${s%.status}.log
  if [ "$rc" != 0 ]; then
    echo "FAIL ($secs) $rest"
    grep -v "^ptxas info\|bytes stack frame" "$log" | head -40
    fail=1
    continue
  fi
  # ptxas -v: "Compiling entry function '<name>'" ... "<S> bytes stack frame, <N> bytes spill stores"
  spills=$(awk '/Compiling entry function/ { name = $0; sub(/.*function ./, "", name); sub(/. for .*/, "", name) }
                /bytes spill stores/ { n = $5 + 0; if (n > 128) print "  spills " n " bytes: " name }' "$log")
  if [ -n "$spills" ]; then
    echo "FAIL ($secs) $rest: kernels spill registers to local memory"
    echo "$spills"
    fail=1
  else
    kernels=$(grep -c "Compiling entry function" "$log" || true)
    echo "ok   ($secs) $rest: $kernels kernels"
  fi
done
echo "compile_cuda.sh: $((SECONDS - t0))s wall"
exit "$fail"
