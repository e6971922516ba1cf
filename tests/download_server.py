"""A local stand-in for Meta's signed download links, used by tests/test_download.py.

It listens on 127.0.0.1 only (ephemeral port) and behaves like the CDN behind the links that
Meta's access e-mail contains:

* the link looks like ``http://127.0.0.1:PORT/*?Policy=...&Signature=GOOD&Key-Pair-Id=...``;
  ``download.sh`` replaces the ``*`` with each file's path;
* a missing or wrong signature, or ``server.expired = True``, answers 403 with an XML error body;
* unknown paths answer 404;
* ``Range: bytes=N-`` / ``bytes=N-M`` answers 206 (416 when N is past the end);
* the files are a few KB of random bytes with a correct ``checklist.chk`` per model folder.

Knobs for fault injection (all on the server object, safe to change between runs):

* ``overrides[path] = bytes``: serve these bytes instead (corrupt data, an HTML page, ...);
* ``truncate[path] = (nbytes, times)``: the next ``times`` responses for ``path`` announce the
  full length but the connection is closed after ``nbytes`` body bytes (``times=None``: always);
* ``throttle[path] = seconds``: sleep that long between 1 KiB chunks (lets a test kill the
  client half-way);
* ``missing``: a set of path prefixes that answer 404 (a model the link does not cover);
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

# The same folders and shard counts as the table at the top of download.sh.
MODELS = {
    "8B": ("Meta-Llama-3-8B", 1),
    "8B-instruct": ("Meta-Llama-3-8B-Instruct", 1),
    "70B": ("Meta-Llama-3-70B", 8),
    "70B-instruct": ("Meta-Llama-3-70B-Instruct", 8),
}

FORBIDDEN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access denied</Message></Error>"
)
NOT_FOUND_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>NoSuchKey</Code>'
    b"<Message>The specified key does not exist.</Message></Error>"
)


def model_files(folder: str, shards: int, rng) -> dict[str, bytes]:
    files = {}
    for i in range(shards):
        files[f"{folder}/consolidated.{i:02d}.pth"] = rng(6000 + 512 * i)
    files[f"{folder}/params.json"] = (
        b'{"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, '
        b'"multiple_of": 16, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, '
        b'"rope_theta": 500000.0}'
    )
    files[f"{folder}/tokenizer.model"] = b"".join(
        b"%s %d\n" % (rng(6).hex().encode(), r) for r in range(200)
    )
    lines = []
    for path, data in files.items():
        name = path.split("/", 1)[1]
        lines.append(f"{hashlib.md5(data).hexdigest()}  {name}\n")
    files[f"{folder}/checklist.chk"] = "".join(lines).encode()
    return files


class FakeSignedURLServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, bytes] = {
            "LICENSE": b"META LLAMA 3 COMMUNITY LICENSE AGREEMENT (test copy)\n",
            "USE_POLICY": b"Meta Llama 3 Acceptable Use Policy (test copy)\n",
        }
        for folder, shards in MODELS.values():
            self.files.update(model_files(folder, shards, os.urandom))
        self.overrides: dict[str, bytes] = {}
        self.truncate: dict[str, tuple[int, int | None]] = {}
        self.throttle: dict[str, float] = {}
        self.missing: set[str] = set()
        self.expired = False
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
        """Serve ``data`` as the real content of ``path`` (its checklist.chk is updated)."""
        self.files[path] = data
        folder = path.rpartition("/")[0]
        if folder:
            lines = [
                f"{hashlib.md5(body).hexdigest()}  {name.split('/', 1)[1]}\n"
                for name, body in self.files.items()
                if name.startswith(folder + "/") and not name.endswith("/checklist.chk")
            ]
            self.files[f"{folder}/checklist.chk"] = "".join(lines).encode()

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
        if range_header and range_header.startswith("bytes="):
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
    srv = FakeSignedURLServer().start()
    print(srv.signed_url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
