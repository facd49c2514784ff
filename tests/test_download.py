"""weights.download against a local HTTP server on 127.0.0.1: resume, corruption, 404. No internet."""

from __future__ import annotations

import hashlib
import http.server
import threading

import pytest

from weights.download import DownloadError, fetch, local_path, manifest

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    cut_first = False  # serve half of the body on the first request, then drop the connection
    corrupt = False
    ranges: list[str | None] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        if self.path != "/model.bin":
            self.send_error(404, "Not Found")
            return
        cls = type(self)
        rng = self.headers.get("Range")
        cls.ranges.append(rng)
        body = bytearray(PAYLOAD)
        if cls.corrupt:
            body[1000] ^= 0xFF
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if cls.cut_first:
            cls.cut_first = False
            self.wfile.write(body[start : start + len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    Handler.cut_first, Handler.corrupt, Handler.ranges = False, False, []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    Handler.cut_first = True
    dest = tmp_path / "model.bin"
    with pytest.raises(DownloadError, match="transfer broke off"):
        fetch(f"{server}/model.bin", dest, SHA, progress=False, timeout=5)
    part = tmp_path / "model.bin.part"
    assert part.stat().st_size == len(PAYLOAD) // 2  # what arrived is kept
    fetch(f"{server}/model.bin", dest, SHA, progress=False, timeout=5)
    assert Handler.ranges == [None, f"bytes={len(PAYLOAD) // 2}-"]
    assert dest.read_bytes() == PAYLOAD
    assert not part.exists()


def test_corrupted_file_is_rejected_and_removed(server, tmp_path):
    Handler.corrupt = True
    dest = tmp_path / "model.bin"
    with pytest.raises(DownloadError, match="does not match"):
        fetch(f"{server}/model.bin", dest, SHA, progress=False, timeout=5)
    assert not dest.exists() and not (tmp_path / "model.bin.part").exists()


def test_404_is_reported(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server}/missing.bin", tmp_path / "x.bin", SHA, progress=False, timeout=5)


def test_existing_verified_file_is_kept(server, tmp_path):
    dest = tmp_path / "model.bin"
    dest.write_bytes(PAYLOAD)
    assert fetch(f"{server}/model.bin", dest, SHA, progress=False) == dest
    assert Handler.ranges == []  # nothing was downloaded


def test_manifest_lists_verified_public_checkpoints():
    entries = manifest()
    assert {"sd15", "sd21", "sd21-v"} <= set(entries)
    for entry in entries.values():
        assert entry["url"].startswith("https://")
        assert entry["sha256"] is None or (len(entry["sha256"]) == 64 and int(entry["sha256"], 16) >= 0)
    assert all(entries[m]["sha256"] for m in ("sd15", "sd21", "sd21-v"))
    assert local_path("sd15").name == "v1-5-pruned-emaonly.safetensors"
    with pytest.raises(DownloadError, match="unknown model"):
        local_path("sd99")


def test_entries_without_a_published_sha256_need_unverified(tmp_path):
    from weights.download import download

    with pytest.raises(DownloadError, match="--unverified"):
        download("bert-vocab", tmp_path, progress=False)
