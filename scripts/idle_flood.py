#!/usr/bin/env python3
"""Idle-connection flood against a running inferd: opens N connections to its
socket that send nothing, then measures what a real client sees (latency of
an image job), the daemon's open file descriptors, and how many of the idle
connections the daemon has closed after a while.

    scripts/idle_flood.py SOCKET PID [N] [WAIT_S]

N defaults to 2000, WAIT_S (how long to wait for the idle timeout) to 65.
Raise this shell's descriptor limit first (ulimit -n 8192).
"""
import os
import socket
import sys
import time

sock_path, pid = sys.argv[1], int(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
wait_s = float(sys.argv[4]) if len(sys.argv) > 4 else 65.0
image = open(os.path.join(os.path.dirname(__file__), "..", "examples", "red.jpg"), "rb").read()


def fds():
    return len(os.listdir(f"/proc/{pid}/fd"))


def job():
    t = time.perf_counter()
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(sock_path)
    s.sendall(
        b"POST /v1/models/color/infer HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
        + f"Content-Length: {len(image)}\r\nConnection: close\r\n\r\n".encode()
        + image
    )
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return (time.perf_counter() - t) * 1000, data.split(b"\r\n", 1)[0].decode()


def median_job(k=20):
    runs = sorted(job() for _ in range(k))
    return runs[k // 2]


print(f"before: {fds()} fds; a job: {median_job()[0]:.1f} ms (median of 20)")
idle = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.setblocking(False)
    try:
        s.connect(sock_path)
    except BlockingIOError:
        pass
    idle.append(s)
time.sleep(1)
ms, status = median_job()
print(f"{n} idle connections open: daemon {fds()} fds; a job: {ms:.1f} ms ({status})")
time.sleep(wait_s)
closed = 0
for s in idle:
    try:
        closed += s.recv(1) == b""
    except BlockingIOError:
        pass
    except OSError:
        closed += 1
ms, status = median_job()
print(f"after {wait_s:.0f} s: {closed} of {n} closed by the daemon; daemon {fds()} fds; a job: {ms:.1f} ms ({status})")
