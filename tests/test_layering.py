"""The import graph of llama/: the model is the math, and no module imports one above it.

Read from the source (every ``import``, at the top or inside a function), so a lazy import that
climbs a layer counts too. A new module must be placed in a layer here.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "llama"

# Lowest first; a module may import modules of lower layers only (never its own layer or above).
LAYERS = [
    # the math, the machine, the vocabularies, types, progress lines, OpenMP settings, NaN hunting, hooks
    {"model", "devices", "tokenizer", "datatypes", "sampling", "progress", "openmp", "diagnose", "fp8", "quantize", "hugepages",
     "gpu_matvec_kernel", "hooks"},
    # one command-line style for every entry point; params.json <-> ModelArgs; the Llama 2 tokenizer
    # int4 weights beside int8's (it imports llama.quantize's key rule and projection names)
    {"cli", "params", "sp_tokenizer", "quantize.int4"},
    # which tokenizer a file is, tool syntax, HF tokenizer files, C kernels
    {"family", "tool_calls", "hf_tokenizer", "native"},
    {"fused", "fused_projections", "gpu_matvec"},  # the decode step of a whole block in one C call; [wq; wk; wv] and [w1; w3] joined
    {"checkpoint"},  # files of weights
    # byte counts, dialogs, fast paths, ranks, format tools
    {"memory", "chat_format", "chat_format_llama2", "fast", "parallel", "convert", "reshard", "gguf_export",
     "quantize_folder", "mapped_embedding", "cuda_graph"},  # fmt: skip
    {"gguf"},  # GGUF import (writes through convert)
    {"demo", "generation"},  # the demo model; Llama: build and generate
    {"chat", "guard", "__init__", "quantize.__main__"},  # entry points; moderation on a built Llama
]
# Upward imports allowed by name: Meta's `from llama.tokenizer import ChatFormat` and `Dialog`,
# `Message`, `Role` (resolved lazily, on first use, by tokenizer's module __getattr__; chat_format
# imports tokenizer).
ALIASES = {("tokenizer", "chat_format"), ("tokenizer", "datatypes")}


def imports(path: Path) -> tuple[set[str], set[str]]:
    """(llama modules, other top-level modules) that the file imports."""
    ours, others = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                ours.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.module == "llama":
                ours.update(a.name for a in node.names)
            elif node.module.startswith("llama."):
                ours.add(node.module.split(".")[1])
            else:
                others.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("llama."):
                    ours.add(alias.name.split(".")[1])
                else:
                    others.add(alias.name.split(".")[0])
    return ours, others


def module_files() -> dict[str, Path]:
    """Module name -> file: ``x.py`` is ``x``; a subpackage ``x/`` is ``x`` (its ``__init__.py``) and
    ``x.y`` for its other files (``quantize.__main__``: what ``python -m llama.quantize`` runs)."""
    files = {p.stem: p for p in PACKAGE.glob("*.py")}
    for init in PACKAGE.glob("*/__init__.py"):
        files[init.parent.name] = init
        files.update({f"{init.parent.name}.{p.stem}": p for p in init.parent.glob("*.py") if p != init})
    return files


FILES = module_files()
MODULES = sorted(FILES)


def test_every_module_has_a_layer():
    placed = [name for layer in LAYERS for name in layer]
    assert sorted(placed) == MODULES, "place each module of llama/ in exactly one layer of LAYERS"


def test_model_imports_only_torch_and_the_standard_library():
    ours, others = imports(PACKAGE / "model.py")
    assert not ours, f"llama/model.py imports {sorted(ours)} from llama: the model is the math"
    foreign = sorted(m for m in others if m != "torch" and m not in sys.stdlib_module_names)
    assert not foreign, f"llama/model.py imports {foreign}: only torch and the standard library are allowed"


@pytest.mark.parametrize("module", MODULES)
def test_imports_go_down_only(module):
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    ours, _ = imports(FILES[module])
    upward = sorted(
        dep for dep in ours if level.get(dep, len(LAYERS)) >= level[module] and (module, dep) not in ALIASES
    )
    assert not upward, f"llama/{module}.py (layer {level[module]}) imports {upward} from its own layer or above"
