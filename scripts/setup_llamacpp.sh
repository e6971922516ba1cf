#!/usr/bin/env bash
# Builds llama-cpp-python (llama.cpp's Python binding) from source into its own virtual environment,
# .venv-llamacpp, for the benchmark's llamacpp-bf16 / llamacpp-q8 engines (benchmarks/bench.py).
# Nothing in the library or the tests needs it. It compiles llama.cpp for THIS CPU (-march=native,
# GGML_NATIVE=ON), which takes 10-30 minutes on 2 cores; the CPU's model and flags are recorded in
# .venv-llamacpp/cpu.txt and the build is redone when they change (a build for an AVX-512 CPU would
# die with "Illegal instruction" on an AVX2-only one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSION=0.3.36
VENV=.venv-llamacpp
cpu=$(lscpu | grep -E '^(Model name|Flags):' || true)
if [ -x "$VENV/bin/python" ] && [ -f "$VENV/cpu.txt" ] && [ "$(cat "$VENV/cpu.txt")" = "$cpu" ] \
  && "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "llama-cpp-python $VERSION is already built for this CPU in $VENV"
  exit 0
fi
echo "==> building llama-cpp-python $VERSION for this CPU into $VENV (10-30 minutes on 2 cores)"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --progress-bar on --upgrade pip >/dev/null
# -v shows the compiler's progress; CMAKE_BUILD_PARALLEL_LEVEL uses every core.
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
  "$VENV/bin/pip" install -v --no-binary llama-cpp-python "llama-cpp-python==$VERSION"
printf '%s\n' "$cpu" > "$VENV/cpu.txt"   # last: marks the build complete
echo "==> done: $VENV/bin/python -c 'import llama_cpp' works; run: python benchmarks/bench.py --engines llamacpp-bf16,llamacpp-q8"
