"""Benchmark servers in a child process, so client threads and server do not share a GIL.

The child binds :func:`listening_socket` ports, prints one JSON line naming them once it listens
(:func:`announce`) and serves until terminated; :class:`ChildServer` starts it with
``python -m <module> --serve <args>``, reads that line and stops it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys


def listening_socket() -> socket.socket:
    """A loopback TCP socket bound to a free port, Nagle off (small request/response pairs)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def announce(ports: dict[str, int]) -> None:
    """Child side: tell the parent which ports to use (one JSON line on stdout)."""
    print(json.dumps(ports), flush=True)


class ChildServer:
    """Parent side: ``python -m module --serve *args`` with ``ports`` read from its first line."""

    def __init__(self, module: str, *args: object) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--serve", *map(str, args)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        line = self.process.stdout.readline() if self.process.stdout else ""
        if not line:
            self.close()
            raise RuntimeError(f"the benchmark server process ({module}) did not start")
        self.ports: dict[str, int] = json.loads(line)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
