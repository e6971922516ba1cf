#!/usr/bin/env bash
# The GPU check in one run, for a lent GPU machine (the tool library's `device`): the CUDA tests, then
# benchmarks/gpu_bench.py. Logs go to $OUT (there) or ./gpu-out. Packages the machine lacks (fairscale,
# fire, termcolor, llama-models for Meta's tokenizer.model) travel as wheels in .whl/ (git-ignored):
#   pip download --no-deps --only-binary=:all: -d .whl llama-models==0.3.0 fire termcolor
#   pip wheel --no-deps -w .whl fairscale==0.4.13
# Usage: bash benchmarks/gpu_run.sh [gpu_bench.py arguments]   (TESTS=0 skips the tests)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    echo "cpus: $(nproc)"
} 2>&1 | tee "$OUT/machine.txt"
if [ "${TESTS:-1}" != 0 ]; then
    timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -rs -s -p no:cacheprovider tests/test_cuda.py tests/test_gpu_matvec.py \
        tests/test_fp8.py "tests/test_quantize_folder.py::test_load_on_gpu_equals_quantize_at_load" ${EXTRA_TESTS:-} \
        >"$OUT/tests.log" 2>&1
    echo "tests: exit $?"
    grep -E "rel err|graph vs|kernel on|passed|failed|FAILED|ERROR|SKIPPED" "$OUT/tests.log" | tail -40
fi
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/gpu_bench.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
