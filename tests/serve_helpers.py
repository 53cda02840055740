"""Run a real ``lorakit serve`` in a subprocess for a test: ``with serving([...]) as url:``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(args: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "lorakit", "serve", *args, "--port", str(port)]


def _output(log: IO[bytes]) -> str:
    """The server's last output; pread leaves the offset the server writes at alone."""
    fd = log.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")[-8000:]


def _wait_healthy(proc: subprocess.Popen, url: str, log: IO[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"lorakit serve exited with code {proc.returncode} before it was healthy; "
                f"its output:\n{_output(log)}"
            )
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.2)
    raise TimeoutError(
        f"lorakit serve not healthy after {timeout:.0f} s; its output:\n{_output(log)}"
    )


@contextmanager
def serving(args: list[str], timeout: float = 120.0) -> Iterator[str]:
    """Start ``lorakit serve <args> --port <free port>``, yield its base URL, stop it on exit.

    The server's output goes to a file (a pipe nobody reads could fill and stall it); it is
    in the error when the server does not come up, and on stderr when the body raises.
    """
    port = free_port()
    # The log file lives as long as the server: closing it is the last step.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            server_command(args, port), stdin=subprocess.DEVNULL, stdout=log, stderr=log
        )
        try:
            url = f"http://127.0.0.1:{port}"
            _wait_healthy(proc, url, log, timeout)
            try:
                yield url
            except BaseException:
                sys.stderr.write(f"--- lorakit serve output ---\n{_output(log)}")
                raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
