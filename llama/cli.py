"""One command-line style for every entry point: checked flags, real help, one-line errors.

The examples, ``llama.chat`` and ``llama.memory`` keep ``fire`` as their dispatcher (the design
asks for it), but ``fire`` reports a misspelt flag only after the function has run, and passes
``--temperature abc`` through as a string. So ``run_fire`` first checks the command line against
the function's signature with an argparse parser built from it: unknown flags, values of the
wrong type, NaN, out-of-range numbers, unknown dtypes and devices that do not exist here are
refused before anything is loaded. The same parser prints ``--help``.

``python -m llama.convert / reshard / gguf / quantize`` use argparse directly with the same conventions:
underscore flag names (``--max_seq_len``; the dashed spelling is accepted too), ``--dtype
bf16|fp16|fp32``, ``--device``, and ``prog: error: ...`` messages.

A user's mistake (``ValueError``, a missing file, an existing destination, a full disk, not enough
memory) prints one line and a hint and exits 1; Ctrl-C prints one line and exits 130. Anything
else is a bug and keeps its traceback; ``LLAMA_DEBUG=1`` shows the traceback of every error.
"""

import argparse
import contextlib
import difflib
import hashlib
import inspect
import math
import os
import sys
import tempfile
import time
import typing
from typing import Any, Callable, Iterator, Optional, Sequence

# The dtype names every CLI accepts: the short ones the tools print, and torch's own.
DTYPE_CHOICES = ("bf16", "fp16", "fp32", "bfloat16", "float16", "float32")
# Errors a user can fix (a path, a value, the disk, the memory, and any exception whose class says
# ``user_error = True``, such as llama.diagnose's corrupt-checkpoint error); anything else is a bug.
USER_ERRORS = (ValueError, OSError, MemoryError, ImportError)
DEBUG_ENV = "LLAMA_DEBUG"

# The help of the flags the examples and tools share.
COMMON_HELP = {
    "ckpt_dir": "Meta-format checkpoint folder (params.json + consolidated.NN.pth); "
    "leave it out to use the demo model (SmolLM2-135M-Instruct, converted once into ~/.cache/llama)",
    "tokenizer_path": "tokenizer.model to use (default: CKPT_DIR/tokenizer.model)",
    "temperature": "sampling temperature, finite and >= 0; 0 is greedy (default 0.6, Meta's; 0 with the demo model)",
    "top_p": "nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1] "
    "(default 0.9, Meta's; 1.0 with the demo model)",
    "max_seq_len": "KV-cache length in tokens: prompt plus answer, 2 ... the model's context",
    "max_batch_size": "prompts generated together, >= 1",
    "max_gen_len": "tokens to generate per answer, >= 1 (default: Meta's for this script; 128 with the demo model)",
    "device": "cpu, cuda or cuda:N, mps (default: cuda when available, else cpu)",
    "dtype": "weight dtype: bf16, fp16 or fp32 (default: bf16, or fp16 on GPUs without bf16)",
    "quantize": "int8: every projection stored as int8 with per-row scales (half the bytes of bf16; "
    "docs/models.md); int4: 4-bit codes with a bf16 scale and zero per group of 128 (one rank; torch's int4 "
    "kernels on CUDA and CPU); fp8: Meta's FP8 feed-forward, on GPUs of compute capability >= 8.9 (default: none)",
}
COMMON_CHOICES: dict[str, Sequence[str]] = {"dtype": DTYPE_CHOICES, "quantize": ("int8", "int4", "fp8")}
# The folder tools (quantize, reshard, convert meta-to-hf, gguf export) check SRC as Llama.build does.
NO_VERIFY_HELP = ("skip checking SRC against its checklist.chk (done by default when it has one, as Llama.build "
                  "does; files verified before are not hashed again): a corrupt file is then written out unnoticed")  # fmt: skip


def fail(message: str) -> argparse.ArgumentTypeError:
    """The error an argparse ``type`` raises; argparse prints ``argument --x: message``."""
    return argparse.ArgumentTypeError(message)


def integer(low: int = 1) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise fail(f"{text!r} is not a whole number") from None
        if value < low:
            raise fail(f"{value} must be at least {low}")
        return value

    parse.__name__ = "int"
    return parse


def number(low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in [low, high] (or (low, high] with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise fail(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise fail(f"{text} is not a finite number")
        if value < low or (low_open and value == low) or value > high:
            bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
            raise fail(f"{value:g} is outside {bounds}" if high < math.inf else f"{value:g} must be {'>' if low_open else '>='} {low:g}")
        return value

    parse.__name__ = "float"
    return parse


def device_name(text: str) -> str:
    """An argparse type: a device that exists on this machine (see ``llama.devices.check_device``)."""
    from llama.devices import check_device

    try:
        check_device(text)
    except ValueError as e:
        raise fail(str(e)) from None
    return text


# Value checks of the shared flags (the library checks them again; this only runs first).
COMMON_TYPES: dict[str, Callable[[str], Any]] = {
    "temperature": number(0.0),
    "top_p": number(0.0, 1.0, low_open=True),
    "max_seq_len": integer(2),
    "max_batch_size": integer(1),
    "max_gen_len": integer(1),
    "device": device_name,
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: ...`` and a hint, exit 2 (argparse's code)."""

    def error(self, message: str) -> typing.NoReturn:
        if is_main_rank():  # under torchrun every rank parses the same flags: one message is enough
            print(f"{self.prog}: error: {message}\nhint: {self.prog} --help lists the flags", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> argparse.Namespace:
        """As argparse's, but an unknown flag is named alone, with the closest known flag."""
        ns, extra = self.parse_known_args(args, namespace)
        flags = [a.split("=", 1)[0] for a in extra if a.startswith("-") and a != "-"]
        if flags:
            known = [o for action in self._actions for o in action.option_strings if o.startswith("--")]
            close = difflib.get_close_matches(flags[0], known, n=1)
            self.error(f"unknown flag {flags[0]}" + (f" (did you mean {close[0]}?)" if close else ""))
        if extra:
            self.error(f"unexpected argument(s): {' '.join(extra)}")
        return ns


def _plain_type(annotation: Any) -> Any:
    """``Optional[int]`` -> int; anything else unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation


def parser_for(
    fn: Callable[..., Any],
    prog: str,
    help: dict[str, str],
    types: Optional[dict[str, Callable[[str], Any]]] = None,
    choices: Optional[dict[str, Sequence[str]]] = None,
    description: Optional[str] = None,
) -> argparse.ArgumentParser:
    """An argparse parser mirroring ``fn``'s signature the way ``fire`` reads it.

    Parameters without a default are positional; the others are ``--name VALUE`` (also
    ``--name=VALUE`` and ``--name-with-dashes``). Every flag needs a ``help`` entry.
    """
    types, choices = {**COMMON_TYPES, **(types or {})}, {**COMMON_CHOICES, **(choices or {})}
    parser = Parser(
        prog=prog,
        description=description or inspect.getdoc(fn),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog=f"A mistake prints one line; {DEBUG_ENV}=1 prints the traceback instead.",
    )
    for name, param in inspect.signature(fn).parameters.items():
        kind = _plain_type(param.annotation)
        parse = types.get(name) or {int: integer(-sys.maxsize), float: number()}.get(kind, str)
        text = help[name]
        if param.default is inspect.Parameter.empty:
            parser.add_argument(name, type=parse, help=text)
            continue
        if param.default is not None:
            text += f" (default {param.default})"
        names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        parser.add_argument(*names, dest=name, type=parse, choices=choices.get(name), default=param.default,
                            metavar=name.upper(), help=text)  # fmt: skip
    return parser


def is_main_rank() -> bool:
    """False on torchrun ranks other than 0: they fail with rank 0 but stay quiet."""
    return os.environ.get("RANK", "0") == "0"


def _message(e: BaseException) -> str:
    """The text of an error, without Python's ``[Errno 28]`` prefix."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    return str(e)


@contextlib.contextmanager
def user_errors(prog: str, hint: str = "") -> Iterator[None]:
    """Turn a user's mistake into ``prog: error: MESSAGE`` plus a hint, exit 1; Ctrl-C exits 130."""
    if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
        yield
        return
    try:
        yield
    except KeyboardInterrupt:
        if is_main_rank():
            print(f"\n{prog}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    except Exception as e:
        if not isinstance(e, USER_ERRORS) and not getattr(e, "user_error", False):
            raise  # a bug: the traceback is what a report needs
        message = _message(e)
        if first_to_report(message):
            rank = "" if is_main_rank() else f"rank {os.environ['RANK']}: "
            print(f"{prog}: error: {rank}{message}", file=sys.stderr)
            print(f"hint: {hint or f'{prog} --help lists the flags'}; {DEBUG_ENV}=1 shows the traceback", file=sys.stderr)
        sys.exit(1)


def first_to_report(message: str, wait: float = 0.5) -> bool:
    """Whether this process should print ``message``: always in one process; under torchrun, the
    first of this machine's ranks to report that very message (a file made exclusively in the temp
    folder, keyed by the launcher's pid and the message). So an error every rank hits (a bad flag,
    a rank count that cannot split the model) prints once, and one that only rank 3 hits (its
    truncated shard) is printed by rank 3, where before only rank 0 spoke and it said nothing.
    Ranks other than 0 wait ``wait`` seconds first, so a shared error comes from rank 0."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return True
    if not is_main_rank():
        time.sleep(wait)
    key = hashlib.sha256(f"{os.getppid()}\0{message}".encode()).hexdigest()[:20]
    path = os.path.join(tempfile.gettempdir(), f"llama-error-{key}")
    for _ in range(2):
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:  # another rank said it; or a launcher long gone whose pid came back
            try:
                if time.time() - os.stat(path).st_mtime < 60:
                    return False
                os.unlink(path)
            except OSError:
                return False
        except OSError:  # no writable temp folder: rank 0 speaks, as it always did
            return is_main_rank()
    return False


def check_fit(what: str, lengths: Sequence[int], max_seq_len: int) -> None:
    """Raise, naming the first of ``lengths`` (prompt tokens, one per ``what``) that leaves no room
    for an answer in ``max_seq_len``, and the --max_seq_len that fits them all."""
    for i, n in enumerate(lengths):
        if n >= max_seq_len:
            raise ValueError(
                f"{what} {i} has {n} tokens, which leaves no room for an answer in --max_seq_len {max_seq_len}: "
                f"use --max_seq_len {max(lengths) + 1} or more (more tokens for longer answers)"
            )


def check_flags(
    fn: Callable[..., Any],
    help: dict[str, str],
    prog: Optional[str] = None,
    types: Optional[dict[str, Callable[[str], Any]]] = None,
    choices: Optional[dict[str, Sequence[str]]] = None,
    description: Optional[str] = None,
    argv: Optional[list[str]] = None,
) -> None:
    """Check ``argv`` (default ``sys.argv[1:]``) against ``fn`` before ``fire`` runs it.

    A bad flag prints one line and exits 2 before anything is loaded; ``--help`` prints the
    flags with their descriptions and defaults and exits 0.
    """
    prog = prog or os.path.basename(sys.argv[0])
    argv = sys.argv[1:] if argv is None else argv
    parser_for(fn, prog, help, types, choices, description).parse_args(argv)


def run_fire(
    fn: Callable[..., Any],
    prog: str,
    help: dict[str, str],
    types: Optional[dict[str, Callable[[str], Any]]] = None,
    choices: Optional[dict[str, Sequence[str]]] = None,
    description: Optional[str] = None,
    argv: Optional[list[str]] = None,
) -> None:
    """``check_flags``, then ``fire.Fire(fn)`` with a user's mistakes turned into one line."""
    import fire

    argv = sys.argv[1:] if argv is None else argv
    check_flags(fn, help, prog, types, choices, description, argv)
    with user_errors(prog):
        fire.Fire(fn, command=argv, name=prog)
