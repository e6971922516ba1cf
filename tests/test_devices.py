"""Device and dtype policy (llama/devices.py): CPU features from /proc/cpuinfo, and what they decide."""

import time

import pytest
import torch

from llama import devices

# Abridged from real /proc/cpuinfo files: an AVX2 x86 core without bf16, a Sapphire Rapids core, an Arm Neoverse V1.
X86_AVX2 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx fma avx2 avx512f\nbugs\t\t: spectre_v1\n"
X86_AMX = "processor\t: 0\nflags\t\t: fpu avx2 fma avx512f avx512_bf16 amx_bf16 amx_tile\n"
ARM_BF16 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm sha512 svebf16 i8mm bf16\nCPU part\t: 0xd40\n"


@pytest.mark.parametrize(
    "text,flags,native_bf16",
    [(X86_AVX2, {"avx2", "fma"}, False), (X86_AMX, {"avx512_bf16", "amx_bf16"}, True), (ARM_BF16, {"bf16", "asimd"}, True)],
)
def test_cpu_flags_and_native_bf16(tmp_path, monkeypatch, text, flags, native_bf16):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    found = devices.cpu_flags(str(path))
    assert flags <= found and "spectre_v1" not in found and "GenuineIntel" not in found
    monkeypatch.setattr(devices, "cpu_flags", lambda: found)
    assert devices.cpu_has_native_bf16() is native_bf16
    expected = None if native_bf16 else torch.float32
    assert devices.default_compute_dtype(torch.device("cpu"), torch.bfloat16) == expected


def test_no_cpuinfo_means_no_flags(tmp_path):
    assert devices.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_cpu_threads_use_the_cores_others_leave_free(monkeypatch):
    """llama.devices.CpuThreads: with one other task runnable on a 2-core machine, one thread;
    when it is gone, the threads come back; restore() gives the starting count."""
    import torch

    from llama import devices

    start = torch.get_num_threads()
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 2)
    torch.set_num_threads(2)
    try:
        others = [1]
        monkeypatch.setattr(devices, "runnable_elsewhere", lambda: others[0])
        threads = devices.CpuThreads(every=1)
        assert threads.adjust() == 1
        others[0] = 0
        assert threads.adjust() == 2
        others[0] = 5  # never fewer than one
        assert threads.adjust() == 1
        threads.restore()
        assert torch.get_num_threads() == 2
        monkeypatch.setattr(devices, "runnable_elsewhere", lambda: None)  # unknown (not Linux): unchanged
        assert devices.CpuThreads(every=1).adjust() == 2
    finally:
        torch.set_num_threads(start)


def test_cpu_threads_check_a_drop_again_at_the_next_step(monkeypatch):
    """Every ``every`` steps the count is checked; a drop is checked again at the next step, so a
    task runnable for a moment costs one step on fewer threads, and a real one is confirmed once."""
    import torch

    from llama import devices

    start = torch.get_num_threads()
    monkeypatch.setattr(devices.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(devices, "SAMPLES", 1)
    torch.set_num_threads(2)
    try:
        others, reads = [1], []
        monkeypatch.setattr(devices, "runnable_elsewhere", lambda: reads.append(1) or others[0])
        threads = devices.CpuThreads(every=8)
        assert threads.adjust() == 1 and len(reads) == 1  # step 1: checked, lowered
        others[0] = 0
        assert threads.adjust() == 2 and len(reads) == 2  # step 2: checked again, back
        others[0] = 1
        assert [threads.adjust() for _ in range(6)] == [2] * 6 and len(reads) == 2  # steps 3-8: not checked
        assert threads.adjust() == 1 and len(reads) == 3  # step 9: lowered
        assert threads.adjust() == 1 and len(reads) == 4  # step 10: confirmed
        assert threads.adjust() == 1 and len(reads) == 4  # then every 8 again
    finally:
        torch.set_num_threads(start)


def test_runnable_elsewhere_reads_proc_loadavg(tmp_path, monkeypatch):
    from llama import devices

    fake = tmp_path / "loadavg"
    fake.write_text("1.50 0.98 0.60 3/412 12345\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(fake if path == "/proc/loadavg" else path, *a, **k))
    # 3 running, the caller among them (its own running threads are not counted as others)
    assert devices.runnable_elsewhere() == 2


def test_cores_used_elsewhere_counts_another_process_not_ours():
    """A busy child process during the measurement shows as about one core used elsewhere; our own
    busy loop does not count."""
    import os
    import subprocess
    import sys

    from llama.devices import cores_used_elsewhere

    def spin(seconds: float) -> int:
        end, n = time.perf_counter() + seconds, 0
        while time.perf_counter() < end:
            n += 1
        return n

    _, before = cores_used_elsewhere(lambda: time.sleep(0.3))  # what the rest of this machine does now
    if before is None:
        pytest.skip("no /proc here")
    if before > 0.5 * ((os.cpu_count() or 1) - 1):
        pytest.skip(f"this machine is busy ({before:.1f} cores used by other processes): the test could not tell")
    result, ours = cores_used_elsewhere(lambda: spin(0.3))
    assert result > 0 and ours < before + 0.5
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.2)
        _, theirs = cores_used_elsewhere(lambda: time.sleep(0.5))
    finally:
        child.kill()
        child.wait()
    assert theirs > before + 0.5
