"""End-to-end tests of download.sh: the real script against a local fake of Meta's signed links.

Every test talks to 127.0.0.1 only (tests/download_server.py). Runs that must not see a tool
(md5sum, wget, curl, ...) get a PATH made of a temporary folder holding symlinks to exactly the
tools they may use.
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
from download_server import FakeSignedURLServer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # download.sh end to end: many bash runs against a local server
SCRIPT = REPO / "download.sh"
BASH = shutil.which("bash")

URL_PROMPT = "Enter the URL from email: "
MODELS_PROMPT = (
    "Enter the list of models to download without spaces (8B,8B-instruct,70B,70B-instruct), "
    "or press Enter for all: "
)
FOLDERS = {
    "8B": "Meta-Llama-3-8B",
    "8B-instruct": "Meta-Llama-3-8B-Instruct",
    "70B": "Meta-Llama-3-70B",
    "70B-instruct": "Meta-Llama-3-70B-Instruct",
}
SHARDS = {"8B": 1, "8B-instruct": 1, "70B": 8, "70B-instruct": 8}

# Everything download.sh calls besides the downloader and the md5 tool.
BASE_TOOLS = [
    "bash", "awk", "cat", "cut", "df", "dirname", "grep", "head", "mkdir", "mv", "rm", "sed",
    "sleep", "tail", "tr", "wc",
]
HAVE = {tool: shutil.which(tool) for tool in ("wget", "curl", "md5sum")}


def model_paths(model: str) -> list[str]:
    folder = FOLDERS[model]
    names = [f"consolidated.{i:02d}.pth" for i in range(SHARDS[model])]
    names += ["params.json", "tokenizer.model", "checklist.chk"]
    return [f"{folder}/{name}" for name in names]


class Result:
    def __init__(self, proc: subprocess.CompletedProcess):
        self.rc = proc.returncode
        self.out = proc.stdout + proc.stderr

    def __repr__(self):
        return f"exit {self.rc}\n{self.out}"


@pytest.fixture
def server():
    srv = FakeSignedURLServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def bindir(tmp_path):
    """make(tools) -> a folder with symlinks to just these tools (python3: this interpreter)."""
    made = []

    def make(tools) -> str:
        folder = tmp_path / f"bin{len(made)}"
        folder.mkdir()
        for tool in tools:
            if tool == "python3":
                target = os.path.realpath(sys.executable)
            else:
                target = shutil.which(tool)
                assert target, f"{tool} is needed by this test"
            (folder / tool).symlink_to(target)
        made.append(folder)
        return str(folder)

    return make


@pytest.fixture
def run(tmp_path):
    """run(*args, stdin=, env=, path=, cwd=) runs download.sh in a clean environment."""

    def _run(*args, stdin="", env=None, path=None, cwd=None, timeout=60):
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
    """PATH with exactly one of wget / curl (plus md5sum): the other is absent."""
    tool = request.param
    if not HAVE[tool]:
        pytest.skip(f"{tool} is not installed on this machine; only the other downloader is tested")
    return tool, bindir(BASE_TOOLS + ["md5sum", tool])


def assert_model_complete(target: Path, server: FakeSignedURLServer, model: str):
    for path in model_paths(model):
        assert (target / path).read_bytes() == server.files[path], path
    leftovers = [p.name for p in (target / FOLDERS[model]).iterdir()
                 if p.suffix in (".part", ".bad", ".log")]
    assert leftovers == []


# ---- success, re-runs, interface ---------------------------------------------------------

def test_full_download_verifies_and_rerun_fetches_nothing(server, run, downloader, tmp_path):
    tool, path = downloader
    target = tmp_path / "ckpt"
    res = run("--url", server.signed_url, "--models", "8B,70B", "--target", str(target), path=path)
    assert res.rc == 0, res
    assert f"with {tool}" in res.out
    assert (target / "LICENSE").read_bytes() == server.files["LICENSE"]
    assert (target / "USE_POLICY").read_bytes() == server.files["USE_POLICY"]
    assert_model_complete(target, server, "8B")
    assert_model_complete(target, server, "70B")
    assert len(list((target / "Meta-Llama-3-70B").glob("consolidated.*.pth"))) == 8
    assert not (target / "Meta-Llama-3-8B-Instruct").exists()
    assert "Downloaded and verified: 8B 70B" in res.out
    assert all(entry["signature_ok"] and entry["range"] is None for entry in server.log)
    assert len(server.log) == 2 + 4 + 11

    # Second run: everything is there and verified, nothing is requested or rewritten.
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    requests = len(server.log)
    res = run("--url", server.signed_url, "--models", "8B,70B", "--target", str(target), path=path)
    assert res.rc == 0, res
    assert len(server.log) == requests
    assert "verified by an earlier run" in res.out
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == before


def test_interactive_prompts_answered_on_stdin(server, run, tmp_path):
    # No arguments: the two questions of Meta's script; target is the current directory.
    res = run(stdin=f"{server.signed_url}\n8B\n", cwd=tmp_path)
    assert res.rc == 0, res
    assert URL_PROMPT in res.out
    assert MODELS_PROMPT in res.out
    assert_model_complete(tmp_path, server, "8B")
    assert (tmp_path / "LICENSE").exists()


def test_interactive_empty_answer_downloads_all_models(server, run, tmp_path):
    res = run(stdin=f"{server.signed_url}\n\n", cwd=tmp_path)
    assert res.rc == 0, res
    for model in FOLDERS:
        assert_model_complete(tmp_path, server, model)


def test_environment_variables(server, run, tmp_path):
    target = tmp_path / "from-env"
    res = run(env={"LLAMA_URL": server.signed_url, "LLAMA_MODELS": "8b-INSTRUCT",
                   "LLAMA_TARGET": str(target)})
    assert res.rc == 0, res
    assert URL_PROMPT not in res.out and MODELS_PROMPT not in res.out
    assert_model_complete(target, server, "8B-instruct")


def test_help_documents_interface_and_exit_codes(run, server):
    res = run("--help")
    assert res.rc == 0
    for text in ("--url", "--models", "--target", "LLAMA_URL", "LLAMA_MODELS", "LLAMA_TARGET",
                 "Exit codes", "0  success", "2  bad input", "3  download failure",
                 "4  verification failure", "8B,8B-instruct,70B,70B-instruct"):
        assert text in res.out, text
    assert server.log == []


# ---- bad input: rejected before any download --------------------------------------------

def test_unknown_model_rejected_before_download(server, run, tmp_path):
    target = tmp_path / "t"
    res = run("--url", server.signed_url, "--models", "8B,13B,405b", "--target", str(target))
    assert res.rc == 2, res
    assert "13B" in res.out and "405b" in res.out
    assert "8B,8B-instruct,70B,70B-instruct" in res.out
    assert server.log == []
    assert not target.exists()


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


def test_url_quotes_whitespace_and_line_breaks_are_removed(server, run, tmp_path):
    url = server.signed_url
    messy = f"  '{url[:50]}\n{url[50:100]}\r\n{url[100:]}'  \n"
    res = run("--url", messy, "--models", "8B", "--target", str(tmp_path / "t"))
    assert res.rc == 0, res
    assert "cleaned up the URL" in res.out
    assert_model_complete(tmp_path / "t", server, "8B")


def test_url_pasted_over_two_lines_at_the_prompt(server, run, tmp_path):
    url = server.signed_url
    cut = url.index("&Key-Pair-Id")
    res = run(stdin=f"{url[:cut]}\n{url[cut:]}\n8B\n", cwd=tmp_path)
    assert res.rc == 0, res
    assert "joined" in res.out
    assert_model_complete(tmp_path, server, "8B")


# ---- resuming -----------------------------------------------------------------------------

def test_dropped_connection_then_rerun_resumes(server, run, downloader, tmp_path):
    _, path = downloader
    shard = "Meta-Llama-3-8B/consolidated.00.pth"
    server.truncate[shard] = (1500, None)  # every response breaks off after 1500 bytes
    target = tmp_path / "t"
    args = ("--url", server.signed_url, "--models", "8B", "--target", str(target))
    res = run(*args, path=path)
    assert res.rc == 3, res
    assert "network failure" in res.out and "run this script again" in res.out
    assert not (target / shard).exists()  # a half file never looks finished
    assert (target / (shard + ".part")).stat().st_size == 1500

    del server.truncate[shard]
    res = run(*args, path=path)
    assert res.rc == 0, res
    assert "Resuming" in res.out
    last = server.requests_for(shard)[-1]
    assert last["range"] == "bytes=1500-" and last["status"] == 206
    assert_model_complete(target, server, "8B")


def test_complete_part_file_is_finished_not_refetched(server, run, downloader, tmp_path):
    # Killed between the last byte and the rename: resuming gets 416, the .part is complete.
    _, path = downloader
    name = "Meta-Llama-3-8B/params.json"
    part = tmp_path / "t" / (name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(server.files[name])
    res = run("--url", server.signed_url, "--models", "8B", "--target", str(tmp_path / "t"),
              path=path)
    assert res.rc == 0, res
    assert [(e["range"], e["status"]) for e in server.requests_for(name)] == [
        (f"bytes={len(server.files[name])}-", 416)]
    assert_model_complete(tmp_path / "t", server, "8B")


def test_retry_within_one_run_resumes(server, run, tmp_path):
    shard = "Meta-Llama-3-8B/consolidated.00.pth"
    server.truncate[shard] = (2000, 2)  # the first two responses break off
    res = run("--url", server.signed_url, "--models", "8B", "--target", str(tmp_path / "t"),
              env={"LLAMA_RETRIES": "3"})
    assert res.rc == 0, res
    ranges = [entry["range"] for entry in server.requests_for(shard)]
    assert ranges == [None, "bytes=2000-", "bytes=4000-"]
    assert_model_complete(tmp_path / "t", server, "8B")


def test_killed_download_resumes(server, tmp_path):
    shard = "Meta-Llama-3-8B/consolidated.00.pth"
    server.replace_file(shard, os.urandom(64 * 1024))
    server.throttle[shard] = 0.02  # 1 KiB every 20 ms
    target = tmp_path / "t"
    part = target / (shard + ".part")
    env = dict(PATH=os.environ["PATH"], HOME=str(tmp_path), no_proxy="127.0.0.1")
    cmd = [BASH, str(SCRIPT), "--url", server.signed_url, "--models", "8B",
           "--target", str(target)]
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 20
    while time.time() < deadline and not (part.exists() and part.stat().st_size >= 8192):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert part.exists() and 8192 <= part.stat().st_size < 64 * 1024
    assert not (target / shard).exists()
    have = part.stat().st_size

    del server.throttle[shard]
    res = subprocess.run(cmd, env=env, input="", capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert server.requests_for(shard)[-1]["range"] == f"bytes={have}-"
    assert_model_complete(target, server, "8B")


# ---- verification -------------------------------------------------------------------------

FAKE_MD5 = """#!/bin/sh
# stand-in for macOS md5: only `md5 -r [--] [FILE]`
[ "$1" = -r ] || exit 64
shift
[ "$1" = -- ] && shift
exec {python} -S -c 'import hashlib, sys
f = open(sys.argv[1], "rb") if len(sys.argv) > 1 else sys.stdin.buffer
print(hashlib.md5(f.read()).hexdigest() + (" " + sys.argv[1] if len(sys.argv) > 1 else ""))' "$@"
"""


@pytest.fixture(params=["md5sum", "md5", "python3"])
def hasher(request, bindir, tmp_path):
    """PATH offering only one way to compute md5 (md5: a fake of macOS's `md5 -r`)."""
    tool = request.param
    if tool == "md5sum":
        return tool, bindir(BASE_TOOLS + ["curl" if HAVE["curl"] else "wget", "md5sum"])
    if tool == "python3":
        return tool, bindir(BASE_TOOLS + ["curl" if HAVE["curl"] else "wget", "python3"])
    folder = Path(bindir(BASE_TOOLS + ["curl" if HAVE["curl"] else "wget"]))
    fake = folder / "md5"
    fake.write_text(FAKE_MD5.format(python=os.path.realpath(sys.executable)))
    fake.chmod(0o755)
    return tool, str(folder)


def test_verifies_with_each_md5_tool(server, run, hasher, tmp_path):
    tool, path = hasher
    res = run("--url", server.signed_url, "--models", "8B", "--target", str(tmp_path / "t"),
              path=path)
    assert res.rc == 0, res
    assert f"using {tool}" in res.out
    assert_model_complete(tmp_path / "t", server, "8B")


def test_corrupted_file_reported_and_fetched_again(server, run, hasher, tmp_path):
    tool, path = hasher
    bad = "Meta-Llama-3-8B/params.json"
    server.overrides[bad] = b'{"dim": 4096, "n_layers": 32, "corrupted": true}'
    target = tmp_path / "t"
    args = ("--url", server.signed_url, "--models", "8B", "--target", str(target))
    res = run(*args, path=path)
    assert res.rc == 4, res
    assert "params.json" in res.out and "FAILED" in res.out and "params.json.bad" in res.out
    assert not (target / bad).exists()  # not treated as done
    assert (target / (bad + ".bad")).exists()
    marker = (target / "Meta-Llama-3-8B" / ".download-verified").read_text()
    assert "consolidated.00.pth" in marker and "params.json" not in marker

    del server.overrides[bad]
    shard_requests = len(server.requests_for("Meta-Llama-3-8B/consolidated.00.pth"))
    res = run(*args, path=path)
    assert res.rc == 0, res
    assert len(server.requests_for(bad)) == 2
    assert len(server.requests_for("Meta-Llama-3-8B/consolidated.00.pth")) == shard_requests
    assert_model_complete(target, server, "8B")


def test_reverify_catches_a_file_changed_on_disk(server, run, tmp_path):
    target = tmp_path / "t"
    args = ("--url", server.signed_url, "--models", "8B", "--target", str(target))
    assert run(*args).rc == 0
    shard = target / "Meta-Llama-3-8B" / "consolidated.00.pth"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes
    shard.write_bytes(bytes(data))
    res = run(*args, "--reverify")
    assert res.rc == 4, res
    assert "consolidated.00.pth" in res.out
    assert not shard.exists() and shard.with_name("consolidated.00.pth.bad").exists()


@pytest.mark.parametrize("body, message", [
    (b"<!DOCTYPE html>\n<html><head><title>Access Denied</title></head><body>no</body></html>",
     "HTML"),
    (b"this is not a checksum list\n", "not a checksum list"),
])
def test_bad_checklist_reported(server, run, tmp_path, body, message):
    server.overrides["Meta-Llama-3-8B/checklist.chk"] = body
    target = tmp_path / "t"
    res = run("--url", server.signed_url, "--models", "8B", "--target", str(target))
    assert res.rc == 3, res
    assert "checklist.chk" in res.out and message in res.out
    assert not (target / "Meta-Llama-3-8B" / "checklist.chk").exists()
    assert server.requests_for("Meta-Llama-3-8B/consolidated.00.pth") == []


def test_html_page_instead_of_data_reported(server, run, tmp_path):
    shard = "Meta-Llama-3-8B/consolidated.00.pth"
    server.overrides[shard] = b"<html><head><title>Request blocked</title></head></html>"
    target = tmp_path / "t"
    res = run("--url", server.signed_url, "--models", "8B", "--target", str(target))
    assert res.rc == 3, res
    assert "consolidated.00.pth" in res.out and "HTML" in res.out
    assert "Request blocked" in res.out
    assert not (target / shard).exists()


def test_no_md5_tool_is_an_error_before_downloading(server, run, bindir, tmp_path):
    path = bindir(BASE_TOOLS + ["curl" if HAVE["curl"] else "wget"])
    res = run("--url", server.signed_url, "--models", "8B", "--target", str(tmp_path / "t"),
              path=path)
    assert res.rc == 4, res
    assert "md5sum" in res.out and "python3" in res.out
    assert server.log == []


# ---- download errors ----------------------------------------------------------------------

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
    for text in ("403", "expired", "24 hours", "new", "Copy link", "line break"):
        assert text in res.out, text
    assert len(server.log) == 1  # stops at the first 403
    assert list(target.iterdir()) == []


def test_404_names_the_missing_file_and_other_models_still_complete(server, run, tmp_path):
    server.missing.add("Meta-Llama-3-70B/")
    target = tmp_path / "t"
    res = run("--url", server.signed_url, "--models", "8B,70B", "--target", str(target))
    assert res.rc == 3, res
    assert "404" in res.out and "Meta-Llama-3-70B/checklist.chk" in res.out
    assert "model name" in res.out
    assert "Downloaded and verified: 8B" in res.out
    assert_model_complete(target, server, "8B")


def test_network_failure_says_what_to_retry(run, tmp_path):
    port = free_port()  # a port nobody listens on
    url = f"http://127.0.0.1:{port}/*?Policy=x&Signature=GOOD&Key-Pair-Id=k"
    res = run("--url", url, "--models", "8B", "--target", str(tmp_path / "t"),
              env={"LLAMA_RETRIES": "1"})
    assert res.rc == 3, res
    assert "network failure" in res.out and "run this script again" in res.out
    assert "attempt 2 of 2" in res.out


def test_disk_full_write_failure_reported(server, run, downloader, tmp_path):
    _, path = downloader
    folder = tmp_path / "t" / "Meta-Llama-3-8B"
    folder.mkdir(parents=True)
    (folder / "params.json.part").symlink_to("/dev/full")  # every write fails with ENOSPC
    res = run("--url", server.signed_url, "--models", "8B", "--target", str(tmp_path / "t"),
              path=path)
    assert res.rc == 3, res
    assert "could not write" in res.out and "params.json" in res.out
    assert "Free space" in res.out


def test_low_free_space_warns(server, run, bindir, tmp_path):
    folder = Path(bindir([t for t in BASE_TOOLS if t != "df"] + ["md5sum", "curl" if HAVE["curl"] else "wget"]))
    fake_df = folder / "df"
    fake_df.write_text("#!/bin/sh\necho 'Filesystem 1024-blocks Used Available Capacity Mounted'\n"
                       "echo '/dev/x 1000 900 100 90% /'\n")
    fake_df.chmod(0o755)
    res = run("--url", server.signed_url, "--models", "70B", "--target", str(tmp_path / "t"),
              path=str(folder))
    assert res.rc == 0, res
    assert "WARNING" in res.out and "142 GB" in res.out


def test_no_downloader_is_reported(server, run, bindir, tmp_path):
    res = run("--url", server.signed_url, "--models", "8B", "--target", str(tmp_path / "t"),
              path=bindir(BASE_TOOLS + ["md5sum"]))
    assert res.rc == 3, res
    assert "neither wget nor curl" in res.out
    assert server.log == []


# ---- the script itself --------------------------------------------------------------------

def test_script_is_executable_and_parses():
    assert os.access(SCRIPT, os.X_OK)
    subprocess.run([BASH, "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(not shutil.which("shellcheck"), reason="shellcheck is not installed")
def test_shellcheck_clean():
    res = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_checklist_md5s_match_server_files(server):
    # Guards the fake server itself: its checklist.chk is what md5sum -c expects.
    for model, folder in FOLDERS.items():
        for line in server.files[f"{folder}/checklist.chk"].decode().splitlines():
            digest, name = line.split("  ")
            assert hashlib.md5(server.files[f"{folder}/{name}"]).hexdigest() == digest
