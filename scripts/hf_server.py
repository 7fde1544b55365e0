"""A local server of the Hugging Face Hub's file layout, for tests and offline boxes.

    python scripts/hf_server.py ROOT PORT [LFS_OVER_BYTES]

serves ROOT/ORG/REPO/FILE at /ORG/REPO/resolve/REVISION/FILE (any revision name,
answered with one commit id) the way huggingface.co does: HEAD and GET with
X-Repo-Commit and an ETag; large files ("LFS": over 10 KiB, or the bytes given) answer with a
302 to /cdn/SHA256 and X-Linked-Etag / X-Linked-Size, as the Hub redirects to
its CDN (another host: localhost for 127.0.0.1); Range requests get 206. huggingface_hub's own hf_hub_download reads
from it (tests/pull.rs checks that, which proves the layout), and so does
`inferd pull hf://ORG/REPO@REVISION` with `pull.hf_endpoint` pointing here.
"""

import hashlib
import http.server
import os
import re
import sys

ROOT = sys.argv[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_OVER = int(sys.argv[3]) if len(sys.argv) > 3 else 10 << 10


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_sha1(path):
    data = open(path, "rb").read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, status, headers, body=b""):
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def file(self):
        m = re.fullmatch(r"/([^/]+)/([^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
        if m:
            path = os.path.join(ROOT, m.group(1), m.group(2), m.group(4))
            return ("resolve", path) if os.path.isfile(path) and ".." not in m.group(4) else (None, None)
        m = re.fullmatch(r"/cdn/([0-9a-f]{64})", self.path)
        if m and m.group(1) in BY_SHA256:
            return ("cdn", BY_SHA256[m.group(1)])
        return (None, None)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        kind, path = self.file()
        if kind is None:
            body = b'{"error": "Entry not found"}'
            return self.send(404, {"Content-Length": str(len(body)), "X-Error-Code": "EntryNotFound"}, body)
        size = os.path.getsize(path)
        if kind == "resolve" and size > LFS_OVER:
            digest = sha256(path)
            # Another host, as the Hub's CDN is (huggingface_hub follows only redirects that stay on the Hub
            # for its metadata; a client must not send the Hub's token there): 127.0.0.1 <-> localhost.
            host, _, port = self.headers.get("Host", "127.0.0.1").rpartition(":")
            cdn = f"http://{'localhost' if host != 'localhost' else '127.0.0.1'}:{port}/cdn/{digest}"
            return self.send(302, {"Location": cdn, "X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{digest}"',
                                   "X-Linked-Size": str(size), "ETag": f'"{git_sha1(path)}"', "Content-Length": "0"})
        data = open(path, "rb").read()
        headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if kind == "resolve":
            headers.update({"X-Repo-Commit": COMMIT, "ETag": f'"{git_sha1(path)}"'})
        else:
            headers["ETag"] = f'"{sha256(path)}"'
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if m and int(m.group(1)) < size:
            start = int(m.group(1))
            headers.update({"Content-Range": f"bytes {start}-{size - 1}/{size}", "Content-Length": str(size - start)})
            return self.send(206, headers, data[start:])
        headers["Content-Length"] = str(size)
        self.send(200, headers, data)


# The files served, by sha256 (the CDN's addresses).
BY_SHA256 = {sha256(os.path.join(d, f)): os.path.join(d, f) for d, _, files in os.walk(ROOT) for f in files}

if __name__ == "__main__":
    http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler).serve_forever()
