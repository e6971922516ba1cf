"""End-to-end tests of download.sh: the real script against a local fake of Meta's signed links.

The fake (tests/download_server.py) serves one link layout at a time, laid out as the facts'
tables A (Llama 3), B (Llama 3.1) and C (llama CLI) say, on 127.0.0.1 only. Runs that must not
see a tool (md5sum, wget, curl, ...) get a PATH made of a temporary folder holding symlinks to
exactly the tools they may use. Tests that run a download are marked slow.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_env import free_port  # noqa: E402
from download_server import LAYOUT_A, LAYOUT_B, LAYOUT_C, FakeSignedURLServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "download.sh"
BASH = shutil.which("bash")

URL_PROMPT = "Enter the URL from email: "
MODELS_PROMPT = "Enter the list of models to download without spaces ("

# Everything download.sh calls besides the downloader and the hash tools.
BASE_TOOLS = [
    "bash", "awk", "cat", "cut", "dd", "df", "dirname", "grep", "head", "mkdir", "mv", "rm",
    "sed", "sleep", "stat", "tail", "tr", "wc",
]
HASH_TOOLS = ["md5sum", "sha256sum"]
HAVE = {tool: shutil.which(tool) for tool in ("wget", "curl", "md5sum", "sha256sum")}
ANY_DL = "curl" if HAVE["curl"] else "wget"

# One model of each generation: (layout, name typed, local folder, remote path).
ONE_PER_LAYOUT = {
    "A": ("8B", "Meta-Llama-3-8B", "8b_pre_trained"),
    "B": ("meta-llama-3.1-8b", "Meta-Llama-3.1-8B", "Meta-Llama-3.1-8B"),
    "C": ("Llama3.1-8B-Instruct", "Llama-3.1-8B-Instruct", "Llama-3.1-8B-Instruct"),
}
POLICY = {"A": "USE_POLICY", "B": "USE_POLICY.md", "C": None}
MiB = 1 << 20


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc = proc.returncode
        self.out = proc.stdout + proc.stderr

    def __repr__(self):
        return f"exit {self.rc}\n{self.out}"


@pytest.fixture
def servers():
    """servers(layout) -> a started FakeSignedURLServer serving that layout."""
    started = []

    def make(layout: str = "A") -> FakeSignedURLServer:
        srv = FakeSignedURLServer(layout).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def server(servers):
    return servers("A")


@pytest.fixture
def bindir(tmp_path):
    """make(tools) -> a folder with symlinks to just these tools (python3: this interpreter)."""
    made = []

    def make(tools) -> str:
        folder = tmp_path / f"bin{len(made)}"
        folder.mkdir()
        for tool in tools:
            target = os.path.realpath(sys.executable) if tool == "python3" else shutil.which(tool)
            assert target, f"{tool} is needed by this test"
            (folder / tool).symlink_to(target)
        made.append(folder)
        return str(folder)

    return make


@pytest.fixture
def run(tmp_path):
    """run(*args, stdin=, env=, path=, cwd=) runs download.sh in a clean environment."""

    def _run(*args, stdin="", env=None, path=None, cwd=None, timeout=120):
        full_env = {
            "PATH": path or os.environ["PATH"],
            "HOME": str(tmp_path),
            "LC_ALL": "C",
            "no_proxy": "127.0.0.1",
            "LLAMA_RETRIES": "0",
            "LLAMA_RETRY_WAIT": "0",
        }
        full_env.update(env or {})
        proc = subprocess.run(
            [BASH, str(SCRIPT), *args], input=stdin, env=full_env, cwd=cwd or tmp_path,
            capture_output=True, text=True, timeout=timeout,
        )
        return Result(proc)

    return _run


@pytest.fixture(params=["wget", "curl"])
def downloader(request, bindir):
    """(tool, PATH) with wget or curl as the downloader. For wget, curl stays on PATH (it
    fetches byte ranges); the wget-only case has its own test."""
    tool = request.param
    if not HAVE[tool]:
        pytest.skip(f"{tool} is not installed on this machine; only the other downloader is tested")
    tools = BASE_TOOLS + HASH_TOOLS + [tool] + (["curl"] if HAVE["curl"] else [])
    return tool, bindir(sorted(set(tools)))


def assert_model_complete(target: Path, server: FakeSignedURLServer, folder: str, remote: str):
    """Every file the link holds under REMOTE is in TARGET/FOLDER, byte for byte, and nothing else
    but the script's record of verified files."""
    paths = server.model_paths(remote)
    assert paths
    for path in paths:
        name = path.rpartition("/")[2]
        assert (target / folder / name).read_bytes() == server.files[path], path
    names = {p.name for p in (target / folder).iterdir()}
    assert names == {p.rpartition("/")[2] for p in paths} | {".download-verified"}


def args_for(srv, models, target):
    return ("--url", srv.signed_url, "--models", models, "--target", str(target))


# ---- one model of each generation ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("layout", ["A", "B", "C"])
def test_one_model_of_each_generation_downloads_and_verifies(servers, run, downloader, tmp_path,
                                                              layout):
    tool, path = downloader
    srv = servers(layout)
    name, folder, remote = ONE_PER_LAYOUT[layout]
    target = tmp_path / "ckpt"
    res = run(*args_for(srv, name, target), path=path)
    assert res.rc == 0, res
    assert f"with {tool}" in res.out
    assert_model_complete(target, srv, folder, remote)
    top = sorted(p.name for p in target.iterdir() if p.is_file())
    assert top == sorted(filter(None, ["LICENSE" if POLICY[layout] else None, POLICY[layout]]))
    for f in top:
        assert (target / f).read_bytes() == srv.files[f]
    assert "Signature" not in res.out and srv.signed_url not in res.out
    marker = (target / folder / ".download-verified").read_text()
    if layout == "B":  # no checklist: said so, and sha256 + size recorded for later runs
        assert "could not be verified" in res.out and "Not verified" in res.out
        shard = srv.files[f"{remote}/consolidated.00.pth"]
        assert f"recorded sha256 {hashlib.sha256(shard).hexdigest()} {len(shard)} " in marker
    else:
        algo = "md5" if layout == "A" else "sha256"
        assert f"consolidated.00.pth: OK ({algo})" in res.out
        assert f"checked {algo} " in marker and "could not be verified" not in res.out

    # Second run: nothing is fetched again (only the layout probe) and nothing is rewritten.
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    requests = len(srv.log)
    res = run(*args_for(srv, name, target), path=path)
    assert res.rc == 0, res
    assert [e["path"] for e in srv.log[requests:]] == [f"{remote}/params.json"]
    assert "already downloaded" in res.out
    assert ("unchanged since an earlier run" if layout == "B" else "verified by an earlier run") in res.out
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == before


@pytest.mark.slow
def test_llama_3_2_model_through_layout_c(servers, run, tmp_path):
    srv = servers("C")
    res = run(*args_for(srv, "llama3.2-1b-instruct", tmp_path / "t"))
    assert res.rc == 0, res
    assert "llama CLI links" in res.out
    assert_model_complete(tmp_path / "t", srv, "Llama-3.2-1B-Instruct", "Llama-3.2-1B-Instruct")
    assert not (tmp_path / "t" / "LICENSE").exists()


@pytest.mark.slow
def test_llama_3_name_on_a_llama_cli_link_finds_layout_c(servers, run, tmp_path):
    # "8B" is a Llama 3 (table A) name; on a llama CLI link the model lives under Llama-3-8B.
    srv = servers("C")
    res = run(*args_for(srv, "8B", tmp_path / "t"))
    assert res.rc == 0, res
    probes = [(e["path"], e["status"]) for e in srv.log[:2]]
    assert probes == [("8b_pre_trained/params.json", 404), ("Llama-3-8B/params.json", 200)]
    assert_model_complete(tmp_path / "t", srv, "Llama-3-8B", "Llama-3-8B")


@pytest.mark.slow
@pytest.mark.parametrize("layout, name, folder", [
    ("C", "Llama3.1-405B-Instruct", "Llama-3.1-405B-Instruct"),
    ("B", "meta-llama-3.1-405b-fp8", "Meta-Llama-3.1-405B"),
])
def test_fp8_model_comes_with_its_scales(servers, run, tmp_path, layout, name, folder):
    srv = servers(layout)
    res = run(*args_for(srv, name, tmp_path / "t"))
    assert res.rc == 0, res
    assert_model_complete(tmp_path / "t", srv, folder, folder)
    got = sorted(p.name for p in (tmp_path / "t" / folder).glob("fp8_scales_*.pt"))
    assert got == [f"fp8_scales_{i}.pt" for i in range(8)]
    if layout == "C":
        assert "fp8_scales_7.pt: OK (sha256)" in res.out


@pytest.mark.slow
def test_empty_answer_downloads_every_model_of_a_llama_3_link(server, run, tmp_path):
    res = run(stdin=f"{server.signed_url}\n\n", cwd=tmp_path)
    assert res.rc == 0, res
    for folder, remote, _ in LAYOUT_A.values():
        assert_model_complete(tmp_path, server, folder, remote)


# ---- layout detection ---------------------------------------------------------------------

@pytest.mark.slow
def test_no_candidate_answers_lists_paths_tried_without_signature(servers, run, tmp_path):
    srv = servers("B")  # a Llama 3.1 link does not hold Llama 3 (8B)
    res = run(*args_for(srv, "8B", tmp_path / "t"))
    assert res.rc == 3, res
    assert "8b_pre_trained/params.json: 404" in res.out
    assert "Llama-3-8B/params.json: 404" in res.out
    assert "Signature" not in res.out and "GOOD" not in res.out
    assert list((tmp_path / "t").iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("how", ["expired", "bad-signature"])
def test_403_explains_expired_link(server, run, tmp_path, how):
    url = server.signed_url
    if how == "expired":
        server.expired = True
    else:
        url = url.replace("Signature=GOOD", "Signature=GOOE")
    target = tmp_path / "t"
    res = run("--url", url, "--models", "8B", "--target", str(target))
    assert res.rc == 3, res
    for text in ("403", "expired", "24 hours", "Copy link", "line break",
                 "8b_pre_trained/params.json", "Llama-3-8B/params.json"):
        assert text in res.out, text
    assert "GOOE" not in res.out and "Policy=" not in res.out
    assert len(server.log) == 2  # the two candidate paths of 8B, then stop
    assert list(target.iterdir()) == []


# ---- verification -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("layout", ["A", "C"])
def test_corrupted_shard_caught_by_name_and_fetched_again(servers, run, tmp_path, layout):
    srv = servers(layout)
    name, folder, remote = ONE_PER_LAYOUT[layout]
    shard = f"{remote}/consolidated.00.pth"
    good = srv.files[shard]
    srv.overrides[shard] = bytes([good[0] ^ 1]) + good[1:]
    target = tmp_path / "t"
    res = run(*args_for(srv, name, target))
    assert res.rc == 4, res
    algo = "md5" if layout == "A" else "sha256"
    assert f"consolidated.00.pth: FAILED {algo} checksum" in res.out
    assert f"{folder}/consolidated.00.pth does not match" in res.out
    assert not (target / folder / "consolidated.00.pth").exists()
    assert (target / folder / "consolidated.00.pth.bad").exists()

    del srv.overrides[shard]
    res = run(*args_for(srv, name, target))
    assert res.rc == 0, res
    # Fetched whole twice (each after a one-byte size probe); the good files only once.
    assert [e["range"] for e in srv.requests_for(shard)] == ["bytes=0-0", None] * 2
    assert len(srv.requests_for(f"{remote}/tokenizer.model")) == 1
    assert_model_complete(target, srv, folder, remote)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["A", "B", "C"])
def test_file_changed_after_verification_is_detected(servers, run, tmp_path, layout):
    # A record of an earlier verification is trusted only while size and mtime are unchanged.
    srv = servers(layout)
    name, folder, remote = ONE_PER_LAYOUT[layout]
    target = tmp_path / "t"
    assert run(*args_for(srv, name, target)).rc == 0
    shard = target / folder / "consolidated.00.pth"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    res = run(*args_for(srv, name, target))
    assert res.rc == 4, res
    assert "consolidated.00.pth" in res.out
    assert ("CHANGED" if layout == "B" else "changed since an earlier run verified it") in res.out
    assert "consolidated.00.pth: OK (verified by an earlier run" not in res.out
    assert not shard.exists() and shard.with_name("consolidated.00.pth.bad").exists()


@pytest.mark.slow
def test_touched_but_unchanged_file_passes_and_reverify_hashes_all(server, run, tmp_path):
    target = tmp_path / "t"
    args = args_for(server, "8B", target)
    assert run(*args).rc == 0
    shard = target / "Meta-Llama-3-8B" / "consolidated.00.pth"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 5 * 10**9))
    res = run(*args)
    assert res.rc == 0, res
    assert "consolidated.00.pth: OK (md5)" in res.out  # hashed again, same content
    assert "params.json: OK (verified by an earlier run" in res.out
    res = run(*args, "--reverify")
    assert res.rc == 0, res
    assert "verified by an earlier run" not in res.out
    assert "params.json: OK (md5)" in res.out


@pytest.mark.slow
@pytest.mark.parametrize("line, shown", [
    ("{h}  ../x", "'{h}  ../x'"),
    ("{h}  ./sub/../../x", "'{h}  ./sub/../../x'"),
    ("{h}  /etc/passwd", "'{h}  /etc/passwd'"),
    ("{h}  consolidated\x1b.00.pth", "'{h}  consolidated^[.00.pth'"),
])
def test_checklist_naming_files_outside_the_folder_is_refused(servers, run, tmp_path, line, shown):
    srv = servers("C")
    h = "ab" * 32
    srv.overrides["Llama-3.2-1B/checklist.chk"] = (line.format(h=h) + "\n").encode()
    target = tmp_path / "t"
    res = run(*args_for(srv, "Llama3.2-1B", target))
    assert res.rc == 3, res
    assert "refused" in res.out and shown.format(h=h) in res.out
    assert srv.requests_for("Llama-3.2-1B/consolidated.00.pth") == []
    assert not (tmp_path / "x").exists()
    assert (target / "Llama-3.2-1B" / "checklist.chk.bad").exists()


@pytest.mark.slow
@pytest.mark.parametrize("body, message", [
    (b"<!DOCTYPE html>\n<html><head><title>Access Denied</title></head><body>no</body></html>",
     "HTML"),
    (b"this is not a checksum list\n", "'this is not a checksum list'"),
    (b"0123456789abcdef  params.json\n", "'0123456789abcdef  params.json'"),
])
def test_bad_checklist_reported(server, run, tmp_path, body, message):
    server.overrides["8b_pre_trained/checklist.chk"] = body
    target = tmp_path / "t"
    res = run(*args_for(server, "8B", target))
    assert res.rc == 3, res
    assert "checklist.chk" in res.out and message in res.out
    assert not (target / "Meta-Llama-3-8B" / "checklist.chk").exists()
    assert server.requests_for("8b_pre_trained/consolidated.00.pth") == []


FAKE_MD5 = """#!/bin/sh
# stand-in for macOS md5: only `md5 -r [--] [FILE]`
[ "$1" = -r ] || exit 64
shift
[ "$1" = -- ] && shift
exec {python} -S -c 'import hashlib, sys
f = open(sys.argv[1], "rb") if len(sys.argv) > 1 else sys.stdin.buffer
print(hashlib.md5(f.read()).hexdigest() + (" " + sys.argv[1] if len(sys.argv) > 1 else ""))' "$@"
"""
FAKE_SHASUM = """#!/bin/sh
# stand-in for macOS shasum: only `shasum -a 256 [--] [FILE]`
[ "$1" = -a ] && [ "$2" = 256 ] || exit 64
shift 2
[ "$1" = -- ] && shift
exec {python} -S -c 'import hashlib, sys
f = open(sys.argv[1], "rb") if len(sys.argv) > 1 else sys.stdin.buffer
print(hashlib.sha256(f.read()).hexdigest() + "  " + (sys.argv[1] if len(sys.argv) > 1 else "-"))' "$@"
"""


@pytest.fixture(params=["coreutils", "macos", "python3"])
def hashers(request, bindir):
    """(md5 tool, sha256 tool, PATH) offering only one way to compute each hash."""
    kind = request.param
    if kind == "coreutils":
        return "md5sum", "sha256sum", bindir(BASE_TOOLS + [ANY_DL] + HASH_TOOLS)
    if kind == "python3":
        return "python3", "python3", bindir(BASE_TOOLS + [ANY_DL, "python3"])
    folder = Path(bindir(BASE_TOOLS + [ANY_DL]))
    for name, text in (("md5", FAKE_MD5), ("shasum", FAKE_SHASUM)):
        (folder / name).write_text(text.format(python=os.path.realpath(sys.executable)))
        (folder / name).chmod(0o755)
    return "md5", "shasum", str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["A", "C"])
def test_verifies_with_each_hash_tool(servers, run, hashers, tmp_path, layout):
    md5_tool, sha_tool, path = hashers
    srv = servers(layout)
    name, folder, remote = ONE_PER_LAYOUT[layout]
    bad = f"{remote}/params.json"
    srv.overrides[bad] = b'{"dim": 4096, "corrupted": true}'
    res = run(*args_for(srv, name, tmp_path / "t"), path=path)
    assert res.rc == 4, res
    assert f"md5 with {md5_tool}, sha256 with {sha_tool}" in res.out
    assert "params.json: FAILED" in res.out and "consolidated.00.pth: OK" in res.out


def test_no_hash_tool_is_an_error_before_downloading(server, run, bindir, tmp_path):
    res = run(*args_for(server, "8B", tmp_path / "t"), path=bindir(BASE_TOOLS + [ANY_DL, "md5sum"]))
    assert res.rc == 4, res
    assert "sha256" in res.out and "python3" in res.out
    assert server.log == []


# ---- big files: byte ranges ---------------------------------------------------------------

BIG = int(2.5 * MiB)
LIMIT = {"LLAMA_RANGE_LIMIT": str(MiB)}


def big_shard(srv) -> str:
    shard = "Llama-3.2-1B/consolidated.00.pth"
    srv.replace_file(shard, os.urandom(BIG))  # its sha256 in checklist.chk follows
    return shard


@pytest.mark.slow
def test_file_over_the_range_limit_is_assembled_from_ranges(servers, run, downloader, tmp_path):
    tool, path = downloader
    if not HAVE["curl"]:
        pytest.skip("byte ranges are fetched with curl, which is not installed")
    srv = servers("C")
    shard = big_shard(srv)
    res = run(*args_for(srv, "Llama3.2-1B", tmp_path / "t"), path=path, env=LIMIT)
    assert res.rc == 0, res
    assert "as 3 byte ranges" in res.out and "wget cannot send a bounded Range header" in res.out
    assert [(e["range"], e["status"]) for e in srv.requests_for(shard)] == [
        ("bytes=0-0", 206),  # the size
        (f"bytes=0-{MiB - 1}", 206), (f"bytes={MiB}-{2 * MiB - 1}", 206),
        (f"bytes={2 * MiB}-{BIG - 1}", 206)]
    assert "consolidated.00.pth: OK (sha256)" in res.out
    assert_model_complete(tmp_path / "t", srv, "Llama-3.2-1B", "Llama-3.2-1B")


@pytest.mark.slow
def test_dropped_connection_mid_range_resumes_that_range(servers, run, tmp_path):
    if not HAVE["curl"]:
        pytest.skip("byte ranges are fetched with curl, which is not installed")
    srv = servers("C")
    shard = big_shard(srv)
    srv.truncate[shard] = (300_000, None)  # every response breaks off after 300,000 bytes
    target = tmp_path / "t"
    args = args_for(srv, "Llama3.2-1B", target)
    res = run(*args, env=LIMIT)
    assert res.rc == 3, res
    assert "network failure" in res.out and "run this script again" in res.out
    part = target / "Llama-3.2-1B" / "consolidated.00.pth.part"
    assert part.stat().st_size == 300_000
    assert not part.with_suffix("").exists()

    # Within one run: the second range drops once and is resumed, not restarted.
    srv.truncate[shard] = (500_000, 2)  # the size probe, then the rest of range 1
    res = run(*args, env={**LIMIT, "LLAMA_RETRIES": "2"})
    assert res.rc == 0, res
    ranges = [e["range"] for e in srv.requests_for(shard)]
    n = len(ranges)
    assert ranges[-5:] == [  # the probe is cut (1 byte is all it needs), then range 1 drops once
        "bytes=0-0", f"bytes=300000-{MiB - 1}", f"bytes=800000-{MiB - 1}",
        f"bytes={MiB}-{2 * MiB - 1}", f"bytes={2 * MiB}-{BIG - 1}"] and n == 7
    assert "(resuming)" in res.out
    assert_model_complete(target, srv, "Llama-3.2-1B", "Llama-3.2-1B")


@pytest.mark.slow
def test_server_ignoring_ranges_gets_one_plain_download(servers, run, tmp_path):
    if not HAVE["curl"]:
        pytest.skip("byte ranges are fetched with curl, which is not installed")
    srv = servers("C")
    big_shard(srv)
    srv.ignore_range = True
    res = run(*args_for(srv, "Llama3.2-1B", tmp_path / "t"), env={"LLAMA_RANGE_LIMIT": str(BIG // 2)})
    # The size probe gets the whole file (200, no Content-Range): no size, so one plain GET.
    assert res.rc == 0, res
    assert "as 2 byte ranges" not in res.out
    assert [e["status"] for e in srv.requests_for("Llama-3.2-1B/consolidated.00.pth")] == [200, 200]
    assert_model_complete(tmp_path / "t", srv, "Llama-3.2-1B", "Llama-3.2-1B")


@pytest.mark.slow
def test_405b_without_curl_refused_before_downloading(servers, run, bindir, tmp_path):
    if not HAVE["wget"]:
        pytest.skip("wget is not installed")
    srv = servers("C")
    res = run(*args_for(srv, "Llama3.1-405B:bf16-mp16", tmp_path / "t"),
              path=bindir(BASE_TOOLS + HASH_TOOLS + ["wget"]))
    assert res.rc == 3, res
    assert "51268302389" in res.out and "needs curl" in res.out
    assert [e["path"] for e in srv.log] == ["Llama-3.1-405B-MP16/params.json"]
    assert not (tmp_path / "t" / "Llama-3.1-405B-MP16").exists()


# ---- models the library cannot run; bad input ---------------------------------------------

@pytest.mark.parametrize("name, instead", [
    ("Llama3.2-11B-Vision-Instruct", "Llama3.2-3B-Instruct"),
    ("llama3.2-1b-instruct:int4-qlora-eo8", "Llama3.2-1B-Instruct"),
    ("Llama3.2-3B-Instruct:int4-spinquant-eo8", "Llama3.2-3B-Instruct"),
    ("Llama-Guard-3-8B-INT8-HF", "Llama-Guard-3-8B"),
    ("Llama3.2-1B:int4-qlora", "bf16 version"),  # not in the table, plainly INT4
])
def test_unsupported_model_refused_with_nothing_downloaded(servers, run, tmp_path, name, instead):
    srv = servers("C")
    target = tmp_path / "t"
    res = run(*args_for(srv, f"Llama3.2-1B,{name}", target))
    assert res.rc == 2, res
    assert name in res.out and "cannot run" in res.out and instead in res.out
    assert srv.log == []
    assert not target.exists()


def test_unknown_model_rejected_before_download(server, run, tmp_path):
    target = tmp_path / "t"
    res = run(*args_for(server, "8B,13B,405b", target))
    assert res.rc == 2, res
    assert "13B" in res.out and "405b" in res.out
    assert "8B, 8B-instruct, 70B, 70B-instruct" in res.out and "Llama3.2-1B" in res.out
    assert server.log == []
    assert not target.exists()


def test_help_documents_interface_names_and_exit_codes(run):
    res = run("--help")
    assert res.rc == 0
    for text in ("--url", "--models", "--target", "--reverify", "LLAMA_URL", "LLAMA_MODELS",
                 "LLAMA_TARGET", "LLAMA_RANGE_LIMIT", "27000000000", "Exit codes", "0  success",
                 "2  bad input", "3  download failure", "4  verification failure",
                 "size and modification time", "meta-llama-3.1-405b-instruct-mp16",
                 "Llama3.3-70B-Instruct", "Llama-Guard-3-1B", "USE_POLICY.md"):
        assert text in res.out, text


@pytest.mark.parametrize("bad, message", [
    ("http://127.0.0.1:{port}/LICENSE?Policy=x&Signature=GOOD&Key-Pair-Id=k", "no '*'"),
    ("http://127.0.0.1:{port}/*/*?Policy=x&Signature=GOOD&Key-Pair-Id=k", "exactly one"),
    ("http://127.0.0.1:{port}/%2A?Policy=x&Signature=GOOD&Key-Pair-Id=k", "%2A"),
    ("https://eur01.safelinks.protection.outlook.com/?url=https%3A%2F%2Fdl%2F*", "rewrote"),
    ("download6.llamameta.net/*?Policy=x", "https://"),
    ("", "no URL"),
])
def test_bad_url_rejected(server, run, tmp_path, bad, message):
    res = run("--url", bad.format(port=server.port), "--models", "8B",
              "--target", str(tmp_path / "t"))
    assert res.rc == 2, res
    assert message in res.out
    assert server.log == []


# ---- interface kept from the earlier script -----------------------------------------------

@pytest.mark.slow
def test_interactive_prompts_answered_on_stdin(server, run, tmp_path):
    res = run(stdin=f"{server.signed_url}\n8B\n", cwd=tmp_path)
    assert res.rc == 0, res
    assert URL_PROMPT in res.out and MODELS_PROMPT in res.out
    assert "Llama 3 links (April 2024):" in res.out and "llama CLI links" in res.out
    assert_model_complete(tmp_path, server, "Meta-Llama-3-8B", "8b_pre_trained")
    assert (tmp_path / "LICENSE").exists() and (tmp_path / "USE_POLICY").exists()


@pytest.mark.slow
def test_environment_variables(servers, run, tmp_path):
    srv = servers("C")
    target = tmp_path / "from-env"
    res = run(env={"LLAMA_URL": srv.signed_url, "LLAMA_MODELS": "LLAMA-GUARD-3-1B",
                   "LLAMA_TARGET": str(target)})
    assert res.rc == 0, res
    assert URL_PROMPT not in res.out and MODELS_PROMPT not in res.out
    assert_model_complete(target, srv, "Llama-Guard-3-1B", "Llama-Guard-3-1B")


@pytest.mark.slow
def test_url_pasted_over_two_lines_and_messy_url(server, run, tmp_path):
    url = server.signed_url
    cut = url.index("&Key-Pair-Id")
    res = run(stdin=f"{url[:cut]}\n{url[cut:]}\n8B\n", cwd=tmp_path)
    assert res.rc == 0, res
    assert "joined" in res.out
    messy = f"  '{url[:50]}\n{url[50:100]}\r\n{url[100:]}'  \n"
    res = run("--url", messy, "--models", "8B", "--target", str(tmp_path / "t"))
    assert res.rc == 0, res
    assert "cleaned up the URL" in res.out
    assert_model_complete(tmp_path / "t", server, "Meta-Llama-3-8B", "8b_pre_trained")


@pytest.mark.slow
def test_dropped_connection_then_rerun_resumes(server, run, downloader, tmp_path):
    _, path = downloader
    shard = "8b_pre_trained/consolidated.00.pth"
    server.truncate[shard] = (1500, None)  # every response breaks off after 1500 bytes
    target = tmp_path / "t"
    res = run(*args_for(server, "8B", target), path=path)
    assert res.rc == 3, res
    assert "network failure" in res.out and "run this script again" in res.out
    part = target / "Meta-Llama-3-8B" / "consolidated.00.pth.part"
    assert part.stat().st_size == 1500 and not part.with_suffix("").exists()

    del server.truncate[shard]
    res = run(*args_for(server, "8B", target), path=path)
    assert res.rc == 0, res
    assert "Resuming" in res.out
    last = server.requests_for(shard)[-1]
    assert last["range"] == "bytes=1500-" and last["status"] == 206
    assert_model_complete(target, server, "Meta-Llama-3-8B", "8b_pre_trained")


@pytest.mark.slow
def test_retry_within_one_run_resumes(server, run, tmp_path):
    shard = "8b_pre_trained/consolidated.00.pth"
    server.replace_file(shard, os.urandom(8000))
    server.truncate[shard] = (2000, 3)  # the size probe, then the first two downloads break off
    res = run(*args_for(server, "8B", tmp_path / "t"), env={"LLAMA_RETRIES": "3"})
    assert res.rc == 0, res
    ranges = [entry["range"] for entry in server.requests_for(shard)]
    assert ranges == ["bytes=0-0", None, "bytes=2000-", "bytes=4000-"]
    assert_model_complete(tmp_path / "t", server, "Meta-Llama-3-8B", "8b_pre_trained")


@pytest.mark.slow
def test_complete_part_file_is_finished_not_refetched(server, run, downloader, tmp_path):
    # Killed between the last byte and the rename: resuming gets 416, the .part is complete.
    _, path = downloader
    name = "8b_pre_trained/params.json"
    part = tmp_path / "t" / "Meta-Llama-3-8B" / "params.json.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(server.files[name])
    res = run(*args_for(server, "8B", tmp_path / "t"), path=path)
    assert res.rc == 0, res
    # The first request is the layout probe; then only a resume that gets 416.
    assert [(e["range"], e["status"]) for e in server.requests_for(name)][1:] == [
        (f"bytes={len(server.files[name])}-", 416)]
    assert_model_complete(tmp_path / "t", server, "Meta-Llama-3-8B", "8b_pre_trained")


@pytest.mark.slow
def test_killed_download_resumes(server, tmp_path):
    shard = "8b_pre_trained/consolidated.00.pth"
    server.replace_file(shard, os.urandom(64 * 1024))
    server.throttle[shard] = 0.02  # 1 KiB every 20 ms
    target = tmp_path / "t"
    part = target / "Meta-Llama-3-8B" / "consolidated.00.pth.part"
    env = dict(PATH=os.environ["PATH"], HOME=str(tmp_path), no_proxy="127.0.0.1")
    cmd = [BASH, str(SCRIPT), *args_for(server, "8B", target)]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 20
    while time.time() < deadline and not (part.exists() and part.stat().st_size >= 8192):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert part.exists() and 8192 <= part.stat().st_size < 64 * 1024
    have = part.stat().st_size

    del server.throttle[shard]
    res = subprocess.run(cmd, env=env, input="", capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert server.requests_for(shard)[-1]["range"] == f"bytes={have}-"
    assert_model_complete(target, server, "Meta-Llama-3-8B", "8b_pre_trained")


@pytest.mark.slow
def test_html_page_instead_of_data_reported(server, run, tmp_path):
    shard = "8b_pre_trained/consolidated.00.pth"
    server.overrides[shard] = b"<html><head><title>Request blocked</title></head></html>"
    target = tmp_path / "t"
    res = run(*args_for(server, "8B", target))
    assert res.rc == 3, res
    assert "consolidated.00.pth" in res.out and "HTML" in res.out and "Request blocked" in res.out
    assert not (target / "Meta-Llama-3-8B" / "consolidated.00.pth").exists()


@pytest.mark.slow
def test_404_names_the_missing_file_and_other_models_still_complete(server, run, tmp_path):
    server.missing.add("70b_pre_trained/")
    target = tmp_path / "t"
    res = run(*args_for(server, "8B,70B", target))
    assert res.rc == 3, res
    assert "404" in res.out and "70b_pre_trained/checklist.chk" in res.out
    assert "model name" in res.out
    assert "Downloaded: Meta-Llama-3-8B" in res.out
    assert_model_complete(target, server, "Meta-Llama-3-8B", "8b_pre_trained")


def test_network_failure_says_what_to_retry(run, tmp_path):
    port = free_port()  # a port nobody listens on
    url = f"http://127.0.0.1:{port}/*?Policy=x&Signature=GOOD&Key-Pair-Id=k"
    res = run("--url", url, "--models", "8B", "--target", str(tmp_path / "t"))
    assert res.rc == 3, res
    assert "network failure" in res.out and "run this script again" in res.out


@pytest.mark.slow
def test_disk_full_write_failure_reported(server, run, downloader, tmp_path):
    _, path = downloader
    folder = tmp_path / "t" / "Meta-Llama-3-8B"
    folder.mkdir(parents=True)
    (folder / "params.json.part").symlink_to("/dev/full")  # every write fails with ENOSPC
    res = run(*args_for(server, "8B", tmp_path / "t"), path=path)
    assert res.rc == 3, res
    assert "could not write" in res.out and "params.json" in res.out
    assert "Free space" in res.out


@pytest.mark.slow
def test_low_free_space_warns(server, run, bindir, tmp_path):
    folder = Path(bindir([t for t in BASE_TOOLS if t != "df"] + HASH_TOOLS + [ANY_DL]))
    fake_df = folder / "df"
    fake_df.write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted'\n"
                       "echo '/dev/x 1000 900 100 90% /'\n")
    fake_df.chmod(0o755)
    res = run(*args_for(server, "70B", tmp_path / "t"), path=str(folder))
    assert res.rc == 0, res
    assert "WARNING" in res.out and "141 GB" in res.out


def test_no_downloader_is_reported(server, run, bindir, tmp_path):
    res = run(*args_for(server, "8B", tmp_path / "t"), path=bindir(BASE_TOOLS + HASH_TOOLS))
    assert res.rc == 3, res
    assert "neither wget nor curl" in res.out
    assert server.log == []


# ---- the script and the fake themselves ---------------------------------------------------

def test_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True)


def test_main_and_every_step_under_40_lines():
    # usage() is only the help text; every function with code stays under 40 lines.
    lines = SCRIPT.read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.endswith("() {") and not line[0].isspace()]
    long = []
    for i in starts:
        end = next(j for j in range(i, len(lines)) if lines[j] == "}")
        if end - i - 1 >= 40 and lines[i] != "usage() {":
            long.append(f"{lines[i]} {end - i - 1} lines")
    assert long == []
    for step in ("parse_args", "ask_url_and_models", "choose_models", "check_space",
                 "download_model", "report"):
        assert f"{step}() {{" in lines


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed")
def test_shellcheck_clean():
    res = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def script_table() -> list[dict]:
    """The rows of MODEL_TABLE at the top of download.sh."""
    text = SCRIPT.read_text()
    body = text[text.index("MODEL_TABLE='") + len("MODEL_TABLE='"):]
    body = body[:body.index("'\n")]
    keys = "model layout remote folder shards extra policy gb shard_bytes names".split()
    return [dict(zip(keys, line.split())) for line in body.splitlines()
            if line.strip() and not line.startswith("#")]


def test_script_table_is_the_facts_tables():
    rows = script_table()
    by_layout = {layout: [r for r in rows if r["layout"] == layout] for layout in "ABC"}
    assert {r["names"]: (r["folder"], r["remote"], int(r["shards"])) for r in by_layout["A"]} == LAYOUT_A
    for layout, facts in (("B", LAYOUT_B), ("C", LAYOUT_C)):
        got = {r["folder"]: (int(r["shards"]), r["extra"] == "fp8") for r in by_layout[layout]}
        assert got == facts, layout
        assert all(r["remote"] == r["folder"] for r in by_layout[layout])
    assert {r["layout"]: r["policy"] for r in rows} == {"A": "USE_POLICY", "B": "USE_POLICY.md", "C": "-"}
    names = [n.lower() for r in rows for n in r["names"].split(",")]
    assert len(names) == len(set(names))  # a name typed means one model
    # The candidate layouts of one model are the same checkpoint: same shards and extras.
    for model in {r["model"] for r in rows}:
        assert len({(r["shards"], r["extra"]) for r in rows if r["model"] == model}) == 1, model


def test_llama_cli_names_match_metas_model_list():
    # Oracle: the model list of llama-models (what the `llama` CLI downloads), read as data.
    sku_list = pytest.importorskip("llama_models.sku_list", reason="llama-models is not installed")
    for row in (r for r in script_table() if r["layout"] == "C"):
        model = sku_list.resolve_model(row["names"])
        assert model is not None, row["names"]
        info = sku_list.llama_meta_net_info(model)
        assert info.folder == row["folder"], row["names"]
        assert model.pth_file_count == int(row["shards"]), row["names"]
        assert ("fp8_scales_0.pt" in info.files) == (row["extra"] == "fp8"), row["names"]
        assert info.pth_size == int(row["shard_bytes"]), row["names"]
    text = SCRIPT.read_text()
    unsupported = text[text.index("UNSUPPORTED_TABLE='"):].split("'")[1]
    for line in filter(str.strip, unsupported.splitlines()):
        descriptor = line.split("|")[0].split(",")[0].strip()
        assert sku_list.resolve_model(descriptor) is not None, descriptor


@pytest.mark.slow
def test_model_not_on_the_layout_found_is_refused_before_downloading(server, run, tmp_path):
    res = run(*args_for(server, "8B,Llama3.2-1B", tmp_path / "t"))
    assert res.rc == 2, res
    assert "Llama3.2-1B is not served by Llama 3 links" in res.out
    assert [e["path"] for e in server.log] == ["8b_pre_trained/params.json"]
    assert list((tmp_path / "t").iterdir()) == []


def test_fake_checklists_hold_the_hash_kind_the_facts_say():
    # Guards the fake itself: A md5 lines "<32 hex>  name", C sha256 lines "<64 hex>  ./name".
    for layout, algo, prefix in (("A", hashlib.md5, ""), ("C", hashlib.sha256, "./")):
        srv = FakeSignedURLServer(layout)
        try:
            chk = [p for p in srv.files if p.endswith("/checklist.chk")]
            assert len(chk) == len(srv.remotes)
            for path in chk:
                remote = path.rpartition("/")[0]
                for line in srv.files[path].decode().splitlines():
                    digest, name = line.split("  ")
                    assert name.startswith(prefix)
                    data = srv.files[f"{remote}/{name[len(prefix):]}"]
                    assert algo(data).hexdigest() == digest
        finally:
            srv.server_close()
    srv = FakeSignedURLServer("B")
    try:
        assert not any(p.endswith("checklist.chk") for p in srv.files)
        assert "USE_POLICY.md" in srv.files and "USE_POLICY" not in srv.files
    finally:
        srv.server_close()
