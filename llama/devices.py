"""The one place that knows the machine: devices, dtypes, CPU features, the cache folder.

Everything here is policy, not math: which device and dtype a run gets when the caller does not
say, whether 16-bit weights are multiplied in float32 (``llama.fast``), how ``torch.compile`` is
told to build the decode step, and where files the library makes (the native kernels, the demo
model) are kept. Imports only torch and the standard library, so every other module may use it.
"""

import functools
import os
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch

T = TypeVar("T")
# Every dtype name the library accepts, from the command line or the API (one table for all tools).
DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}  # fmt: skip


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``torch.bfloat16`` from "bf16" / "bfloat16" (and so on for fp16 and fp32); a torch dtype is
    returned as is when it is one of those three (the model computes in no other)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"dtype {name} is not one the model computes in: use torch.bfloat16, torch.float16 or torch.float32")
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def devices_here() -> list[str]:
    """The device names this machine can run on, for error messages: ``['cpu', 'cuda:0', ...]``."""
    names = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0)]
    if torch.backends.mps.is_available():
        names.append("mps")
    return names


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device, or a ValueError saying which devices exist here."""
    here = f"devices here: {', '.join(devices_here())}"
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        hint = " (for a GPU use cuda)" if str(device).lower() in ("gpu", "nvidia", "rocm") else ""
        raise ValueError(f"device {str(device)!r} is not a device name{hint}; {here}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {str(device)!r}: {why}; {here}")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: there are {torch.cuda.device_count()} CUDA GPUs; {here}")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {str(device)!r}: Apple's MPS is not available here; {here}")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {str(device)!r} is not supported (cpu, cuda or mps); {here}")
    return d


@functools.cache
def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``); empty elsewhere.

    The one reader of CPU features: ``cpu_has_native_bf16`` and ``llama.native`` both ask it.
    """
    try:
        with open(cpuinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm)."""
    return bool({"avx512_bf16", "amx_bf16", "bf16"} & cpu_flags())


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 (the checkpoints' own dtype) on CPUs and on GPUs with bf16; fp16 on other GPUs.

    On CPUs without native bf16 the weights stay bf16 and are multiplied in float32
    (``llama.fast.prompt_compute_dtype`` measures it): against fp32 weights that is half the memory and faster
    (benchmarks/README.md has the numbers).
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16
    return torch.float16


def default_compute_dtype(device: torch.device, dtype: torch.dtype) -> Optional[torch.dtype]:
    """The compute dtype where nothing is measured: float32 for 16-bit weights on a CPU without
    native bf16, whose 16-bit matmuls are several times slower; None (multiply in the weights'
    dtype) everywhere else.

    ``llama.fast.speed_up`` uses it for float16 weights, GPUs and several ranks only: for bf16
    weights on one CPU process it measures which path is faster (``llama.fast.prompt_compute_dtype``)
    instead of reading this flag. The weights stay 16-bit in memory; each product is computed in
    float32 and rounded back (see ``llama.fast``).
    """
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not cpu_has_native_bf16():
        return torch.float32
    return None


def resolve_dtype(dtype: Optional[str | torch.dtype], device: torch.device) -> torch.dtype:
    """A torch dtype from None (default for the device), a torch.dtype, or a name like "bf16"."""
    return default_dtype(device) if dtype is None else parse_dtype(dtype)


def compile_decode_step(model: torch.nn.Module, device: torch.device) -> Callable[..., torch.Tensor]:
    """``torch.compile`` of ``model`` for the static-shape one-token step (``start_pos`` a tensor).

    On CUDA: CUDA graphs (no per-kernel launch cost) and Inductor's coordinate-descent tuning of
    the reductions it generates for one-row matrix products, which beat ``mode="reduce-overhead"``
    alone (benchmarks/RESULTS-cuda.md).
    """
    if device.type == "cuda":
        options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True}
        return torch.compile(model, fullgraph=True, dynamic=False, options=options)
    return torch.compile(model, fullgraph=True, dynamic=False)


def record_cuda_graph(fn: Callable[[], T]) -> tuple["torch.cuda.CUDAGraph", T]:
    """``fn``'s CUDA kernels recorded in a ``torch.cuda.CUDAGraph``: (graph, what the recorded call returned).

    ``fn`` runs once first on a side stream, as graphs require: lazily made state (cuBLAS handles and
    workspaces, Triton's compiled kernels, the allocator's blocks) must exist before the capture,
    during which nothing may be allocated outside the graph's pool or synchronised with the host.
    The capture itself runs nothing; ``graph.replay()`` does.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/llama``, or ``~/.cache/llama`` (the XDG base-directory convention)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llama"


def runnable_elsewhere() -> Optional[int]:
    """Tasks of other processes runnable on this machine right now (Linux: /proc/loadavg's
    running/total field, less this process's own running threads, e.g. OpenMP threads still
    spinning after a parallel region); None where that is unknown."""
    try:
        # Our own threads first: one that stops spinning in between is then not counted as another's.
        own = 0
        for task in os.scandir("/proc/self/task"):
            with open(f"{task.path}/stat") as f:
                own += f.read().rpartition(")")[2].split()[0] == "R"  # the state follows the name
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(running - max(own, 1), 0)


def busy_ticks(pid: Optional[int] = None) -> Optional[int]:
    """CPU time in clock ticks: of every core (``/proc/stat``: user, nice, system, irq, softirq and
    steal, the time a VM's host ran something else), or of one process (utime + stime); None where
    /proc cannot tell (not Linux)."""
    try:
        if pid is None:
            with open("/proc/stat") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
            return user + nice + system + irq + softirq + steal
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, ValueError, IndexError):
        return None


def cores_used_elsewhere(fn: Callable[[], T]) -> tuple[T, Optional[float]]:
    """``fn()``, and how many cores other processes (and the VM's host) used meanwhile, on average;
    None where /proc cannot tell. A measurement taken beside another busy process says little
    about this machine: its caller can then decline to keep it."""
    before = (time.perf_counter(), busy_ticks(), busy_ticks(os.getpid()))
    result = fn()
    after = (time.perf_counter(), busy_ticks(), busy_ticks(os.getpid()))
    if None in before or None in after or after[0] <= before[0]:
        return result, None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return result, max(others, 0) / os.sysconf("SC_CLK_TCK") / (after[0] - before[0])


SAMPLES = 3  # readings of runnable_elsewhere per check (~0.1 ms each)
FIRST_STEP_SPACING_S = 0.002  # between the first step's readings


class CpuThreads:
    """torch's thread count for CPU decoding, lowered while other processes keep cores busy.

    A decode step is a few hundred short parallel regions, each ending at a barrier. When another
    process holds one of the cores, the thread sharing that core is descheduled for whole time
    slices while its partners wait at every barrier: two threads beside one busy process decoded
    slower than one thread alone (benchmarks/README.md, ``python benchmarks/load.py``). So every
    ``every`` steps ``adjust`` counts the tasks runnable elsewhere and uses the cores they leave
    free, never more than the threads it started with and never fewer than one; when the others
    finish, the threads come back. Our kernels (llama/native.py) follow torch's count. Not used
    with ``compile=True``: a compiled graph is specialized for its thread count.
    """

    def __init__(self, every: int = 8):
        self.full = torch.get_num_threads()
        self.cores = os.cpu_count() or 1
        self.every = every
        self.steps = 0
        # After lowering the count, check again at the very next step: a task runnable for a
        # moment (khugepaged or a kernel worker after a prompt's large allocations) then costs one
        # step at fewer threads, not ``every`` (measured, Llama 3.2 1B shape after a 512-token
        # prompt: 8-16 of 128 steps on one thread, decode 13-14 tok/s against 19 after a short one).
        self.confirm = False

    def adjust(self) -> int:
        """Called once per decode step; returns the thread count in use."""
        self.steps += 1
        if self.steps % self.every == 1 or self.every == 1 or self.confirm:
            # The least of a few quick readings: a task that is runnable for a moment (a kernel
            # thread, one of ours caught between reads) must not halve a long prefill step.
            # The first step (a prompt, seconds long) reads over a few milliseconds: the process
            # that just handed us the prompt (a server, a benchmark's parent) is still runnable for
            # a moment, and one back-to-back reading halved a 512-token prefill's threads for
            # nothing (TTFT 0.50 s or 0.97 s at random, demo model).
            readings = []
            for i in range(SAMPLES):
                if self.steps == 1 and i:
                    time.sleep(FIRST_STEP_SPACING_S)
                readings.append(runnable_elsewhere())
            others = None if None in readings else min(readings)
            self.confirm = False
            if others is not None:
                want = max(1, min(self.full, self.cores - others))
                self.confirm = want < torch.get_num_threads()
                if want != torch.get_num_threads():
                    torch.set_num_threads(want)
        return torch.get_num_threads()

    def restore(self) -> None:
        """The thread count it started with."""
        if torch.get_num_threads() != self.full:
            torch.set_num_threads(self.full)

