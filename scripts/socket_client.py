"""The benchmarks' client side of the daemon's Unix socket: an HTTP
connection over it, and the events of a server-sent-event answer."""
import http.client
import json
import socket
import time


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("inferd", timeout=600)
        self.path_ = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(self.path_)


def events(response):
    """Each `data:` event of a streamed answer as it arrives: (arrival time, the JSON), `[DONE]` left out."""
    buf = b""
    while True:
        chunk = response.read1(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            data = event.removeprefix(b"data: ")
            if data != b"[DONE]":
                yield time.perf_counter(), json.loads(data)
