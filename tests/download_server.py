"""A local stand-in for Meta's signed download links, used by tests/test_download.py.

It listens on 127.0.0.1 only (ephemeral port) and serves ONE link layout, laid out as the
facts say (/work/shared/docs/download-layouts.md, tables A, B and C), independent of the table
in download.sh:

* A (Llama 3 links, April 2024): top level ``LICENSE``, ``USE_POLICY``; per model a remote path
  that differs from the local folder (``8b_pre_trained`` ...), holding ``consolidated.NN.pth``,
  ``params.json``, ``tokenizer.model`` and an md5 ``checklist.chk`` (``<32 hex>  <file>``);
* B (Llama 3.1 links, July 2024): top level ``LICENSE``, ``USE_POLICY.md``; remote path = local
  folder; ``tokenizer.model``, ``consolidated.NN.pth``, ``params.json``, ``fp8_scales_N.pt`` for
  the FP8 405B models; no checklist;
* C (links for the ``llama`` CLI): remote path = folder = Hugging Face repo name without owner;
  a sha256 ``checklist.chk`` (``<64 hex>  ./<file>``), ``tokenizer.model``, ``params.json``,
  ``consolidated.NN.pth`` and ``fp8_scales_N.pt`` for FP8; no top-level files.

The link looks like ``http://127.0.0.1:PORT/*?Policy=...&Signature=GOOD&Key-Pair-Id=...``; a
missing or wrong signature, or ``server.expired = True``, answers 403 with an XML body; paths
the link does not hold answer 404; ``Range: bytes=N-`` / ``bytes=N-M`` answers 206 (416 past
the end). File contents are a few KB of random bytes.

Knobs for fault injection (on the server object, safe to change between runs):

* ``overrides[path] = bytes``: serve these bytes instead (corrupt data, an HTML page, ...);
* ``truncate[path] = (nbytes, times)``: drop the connection mid-response: the next ``times``
  responses for ``path`` (a whole file or a byte range) announce their full length but the
  connection is closed after ``nbytes`` body bytes (``times=None``: always);
* ``throttle[path] = seconds``: sleep that long between 1 KiB chunks;
* ``missing``: a set of path prefixes that answer 404;
* ``ignore_range``: answer every request with the whole file (200), like a server without ranges;
* ``log``: every request as a dict(path=, range=, status=, signature_ok=).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

GOOD_SIGNATURE = "GOOD"

# Table A of the facts: name typed -> (local folder, remote path, shards).
LAYOUT_A = {
    "8B": ("Meta-Llama-3-8B", "8b_pre_trained", 1),
    "8B-instruct": ("Meta-Llama-3-8B-Instruct", "8b_instruction_tuned", 1),
    "70B": ("Meta-Llama-3-70B", "70b_pre_trained", 8),
    "70B-instruct": ("Meta-Llama-3-70B-Instruct", "70b_instruction_tuned", 8),
}
# Table B: folder (= remote path) -> (shards, fp8 scales?).
LAYOUT_B = {
    "Meta-Llama-3.1-8B": (1, False),
    "Meta-Llama-3.1-8B-Instruct": (1, False),
    "Meta-Llama-3.1-70B": (8, False),
    "Meta-Llama-3.1-70B-Instruct": (8, False),
    "Meta-Llama-3.1-405B-MP16": (16, False),
    "Meta-Llama-3.1-405B-Instruct-MP16": (16, False),
    "Meta-Llama-3.1-405B-MP8": (8, False),
    "Meta-Llama-3.1-405B-Instruct-MP8": (8, False),
    "Meta-Llama-3.1-405B": (8, True),
    "Meta-Llama-3.1-405B-Instruct": (8, True),
    "Meta-Llama-Guard-3-8B": (1, False),
}
# Table C: folder (= remote path) -> (shards, fp8 scales?).
LAYOUT_C = {
    "Llama-3-8B": (1, False), "Llama-3-8B-Instruct": (1, False),
    "Llama-3-70B": (8, False), "Llama-3-70B-Instruct": (8, False),
    "Llama-3.1-8B": (1, False), "Llama-3.1-8B-Instruct": (1, False),
    "Llama-3.1-70B": (8, False), "Llama-3.1-70B-Instruct": (8, False),
    "Llama-3.1-405B-MP8": (8, False), "Llama-3.1-405B-Instruct-MP8": (8, False),
    "Llama-3.1-405B-MP16": (16, False), "Llama-3.1-405B-Instruct-MP16": (16, False),
    "Llama-3.1-405B": (8, True), "Llama-3.1-405B-Instruct": (8, True),
    "Llama-3.2-1B": (1, False), "Llama-3.2-1B-Instruct": (1, False),
    "Llama-3.2-3B": (1, False), "Llama-3.2-3B-Instruct": (1, False),
    "Llama-3.3-70B-Instruct": (8, False),
    "Llama-Guard-3-8B": (1, False), "Llama-Guard-3-1B": (1, False),
}

FORBIDDEN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access denied</Message></Error>"
)
NOT_FOUND_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code>'
    b"<Message>The specified key does not exist.</Message></Error>"
)


def model_files(remote: str, shards: int, fp8: bool, rng) -> dict[str, bytes]:
    """The data files of one model folder (no checklist), keyed by remote path."""
    files = {f"{remote}/consolidated.{i:02d}.pth": rng(3000 + 256 * i) for i in range(shards)}
    if fp8:
        files.update({f"{remote}/fp8_scales_{i}.pt": rng(700 + i) for i in range(shards)})
    files[f"{remote}/params.json"] = (
        b'{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, '
        b'"multiple_of": 16, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, '
        b'"rope_theta": 500000.0}'
    )
    files[f"{remote}/tokenizer.model"] = b"".join(
        b"%s %d\n" % (rng(6).hex().encode(), r) for r in range(100))
    return files


def checklist(layout: str, remote: str, files: dict[str, bytes]) -> bytes:
    """Layout A: md5sum lines; C: sha256 lines with a leading ./ (as `llama` reads them)."""
    lines = []
    for path, data in files.items():
        folder, _, name = path.rpartition("/")
        if folder != remote or name == "checklist.chk":
            continue
        if layout == "A":
            lines.append(f"{hashlib.md5(data).hexdigest()}  {name}\n")
        else:
            lines.append(f"{hashlib.sha256(data).hexdigest()}  ./{name}\n")
    return "".join(lines).encode()


class FakeSignedURLServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, layout: str = "A"):
        super().__init__(("127.0.0.1", 0), _Handler)
        assert layout in ("A", "B", "C"), layout
        self.layout = layout
        self.files: dict[str, bytes] = {}
        if layout == "A":
            self.files["LICENSE"] = b"META LLAMA 3 COMMUNITY LICENSE AGREEMENT (test copy)\n"
            self.files["USE_POLICY"] = b"Meta Llama 3 Acceptable Use Policy (test copy)\n"
            self.remotes = {remote: shards for _, remote, shards in LAYOUT_A.values()}
            fp8 = dict.fromkeys(self.remotes, False)
        else:
            table = LAYOUT_B if layout == "B" else LAYOUT_C
            self.remotes = {folder: shards for folder, (shards, _) in table.items()}
            fp8 = {folder: scales for folder, (_, scales) in table.items()}
            if layout == "B":
                self.files["LICENSE"] = b"LLAMA 3.1 COMMUNITY LICENSE AGREEMENT (test copy)\n"
                self.files["USE_POLICY.md"] = b"# Llama 3.1 Acceptable Use Policy (test copy)\n"
        for remote, shards in self.remotes.items():
            self.files.update(model_files(remote, shards, fp8[remote], os.urandom))
            if layout != "B":
                self.files[f"{remote}/checklist.chk"] = checklist(layout, remote, self.files)
        self.overrides: dict[str, bytes] = {}
        self.truncate: dict[str, tuple[int, int | None]] = {}
        self.throttle: dict[str, float] = {}
        self.missing: set[str] = set()
        self.expired = False
        self.ignore_range = False
        self.log: list[dict] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # -- helpers for tests ---------------------------------------------------------------
    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def signed_url(self) -> str:
        return (
            f"http://127.0.0.1:{self.port}/*?Policy=eyJTdGF0ZW1lbnQiOlt7InVuaXF1ZV9oYXNoIjoiYWJj"
            f"In1dfQ__&Signature={GOOD_SIGNATURE}&Key-Pair-Id=K15QRJLYKIFSLZ"
            f"&Download-Request-ID=1234567890"
        )

    def replace_file(self, path: str, data: bytes) -> None:
        """Serve ``data`` as the real content of ``path`` (its folder's checklist is updated)."""
        self.files[path] = data
        remote = path.rpartition("/")[0]
        if remote and self.layout != "B":
            self.files[f"{remote}/checklist.chk"] = checklist(self.layout, remote, self.files)

    def model_paths(self, remote: str) -> list[str]:
        """Every path the link holds under one remote path."""
        return sorted(p for p in self.files if p.startswith(remote + "/"))

    def requests_for(self, path: str) -> list[dict]:
        with self._lock:
            return [entry for entry in self.log if entry["path"] == path]

    def start(self) -> "FakeSignedURLServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: FakeSignedURLServer
    protocol_version = "HTTP/1.0"  # one request per connection, like a simple CDN edge

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    def _record(self, path, status, signature_ok):
        with self.server._lock:
            self.server.log.append(
                dict(path=path, range=self.headers.get("Range"), status=status,
                     signature_ok=signature_ok)
            )

    def _plain(self, status: int, body: bytes, ctype="application/xml", extra=()):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in extra:
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        server = self.server
        parts = urlsplit(self.path)
        path = parts.path.lstrip("/")
        query = parse_qs(parts.query)
        signature_ok = (
            query.get("Signature") == [GOOD_SIGNATURE]
            and "Policy" in query
            and "Key-Pair-Id" in query
            and not server.expired
        )
        if not signature_ok:
            self._record(path, 403, False)
            return self._plain(403, FORBIDDEN_BODY)
        if path not in server.files or any(path.startswith(p) for p in server.missing):
            self._record(path, 404, True)
            return self._plain(404, NOT_FOUND_BODY)

        data = server.overrides.get(path, server.files[path])
        size = len(data)
        start, end, status = 0, size - 1, 200
        range_header = self.headers.get("Range")
        if range_header and range_header.startswith("bytes=") and not server.ignore_range:
            first, _, last = range_header[len("bytes="):].split(",")[0].partition("-")
            start = int(first) if first else 0
            end = min(int(last), size - 1) if last else size - 1
            if start >= size:
                self._record(path, 416, True)
                return self._plain(416, b"", extra=[("Content-Range", f"bytes */{size}")])
            status = 206
        body = data[start:end + 1]

        cut = None
        with server._lock:
            if path in server.truncate:
                nbytes, times = server.truncate[path]
                cut = nbytes
                if times is not None:
                    times -= 1
                    if times <= 0:
                        del server.truncate[path]
                    else:
                        server.truncate[path] = (nbytes, times)
        self._record(path, status, True)

        self.send_response(status)
        self.send_header("Content-Type", "binary/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        if cut is not None:
            body = body[:cut]
        delay = server.throttle.get(path)
        try:
            if delay:
                for i in range(0, len(body), 1024):
                    self.wfile.write(body[i:i + 1024])
                    self.wfile.flush()
                    time.sleep(delay)
            else:
                self.wfile.write(body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return
        if cut is not None:
            # Announced the full length, sent less: the client sees the connection drop.
            self.close_connection = True
            self.connection.shutdown(2)


if __name__ == "__main__":  # manual use: python tests/download_server.py
    import sys

    srv = FakeSignedURLServer(sys.argv[1] if len(sys.argv) > 1 else "A").start()
    print(srv.signed_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
