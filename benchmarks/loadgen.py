"""Load for benchmarks/serve_load.py: a server in a subprocess, closed-loop HTTP clients.

Closed loop: each of C clients sends a request, waits for the answer, sends the next, until
the time is up; so C requests are in flight at every moment and requests/s is what the
server sustains at that concurrency. All clients run on one asyncio loop with one aiohttp
session, on the same machine as the server, so the client's CPU time comes out of the
server's. aiohttp rather than httpx for that reason: with 64 connections httpx's async pool
spent ~10 ms of CPU per request here (0.7 of the 2 cores at 70 requests/s), aiohttp ~0.3 ms.
The tests drive the server with httpx and huggingface_hub's client; this is only the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import httpx
import numpy as np

HOST = "127.0.0.1"


@dataclass
class Process:
    url: str
    pid: int


@dataclass
class Load:
    """What one closed-loop run saw; times in seconds since its start."""

    records: list[tuple[float, float, bool]] = field(default_factory=list)  # end, latency, ok
    errors: Counter[str] = field(default_factory=Counter)
    samples: list[tuple[float, int, float]] = field(default_factory=list)  # t, done, RSS MB
    # t, CPU seconds used so far by this (client) process and by the server
    cpu: list[tuple[float, float, float]] = field(default_factory=list)

    def cores(self, since: float, until: float) -> tuple[float, float]:
        """Cores used on average by the client and by the server between the samples nearest
        ``since`` and ``until``."""
        if len(self.cpu) < 2:
            return float("nan"), float("nan")
        a = min(self.cpu, key=lambda c: abs(c[0] - since))
        b = min(self.cpu, key=lambda c: abs(c[0] - until))
        dt = b[0] - a[0]
        if dt <= 0:
            return float("nan"), float("nan")
        return (b[1] - a[1]) / dt, (b[2] - a[2]) / dt

    def stats(self, since: float, until: float) -> dict[str, Any]:
        """Requests/s and latency percentiles of the requests that ended in [since, until]."""
        window = [(lat, ok) for end, lat, ok in self.records if since <= end <= until]
        ms = 1e3 * np.asarray([lat for lat, ok in window if ok] or [np.nan])
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        client, server = self.cores(since, until)
        return {
            "requests": len(window),
            "requests_per_sec": round(len(window) / (until - since), 2),
            "p50_ms": round(float(p50), 2),
            "p95_ms": round(float(p95), 2),
            "p99_ms": round(float(p99), 2),
            "failed": sum(not ok for _, _, ok in self.records),  # warm-up included
            "errors": dict(self.errors),
            "client_cores": round(client, 2),
            "server_cores": round(server, 2),
        }


def memory_mb(pid: int) -> dict[str, float]:
    """Resident memory now (VmRSS) and at its peak (VmHWM) of process ``pid``, in MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _tail(log: IO[bytes]) -> str:
    fd = log.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode(errors="replace")[-4000:]


def _wait_healthy(proc: subprocess.Popen, url: str, log: IO[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.25)
    raise TimeoutError(f"server not healthy after {timeout:.0f} s:\n{_tail(log)}")


@contextmanager
def running(
    command: list[str], env: dict[str, str] | None = None, timeout: float = 300.0
) -> Iterator[Process]:
    """Start ``command --port P`` on 127.0.0.1, wait for /health, stop it on the way out."""
    port = _free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
        )
        try:
            url = f"http://{HOST}:{port}"
            _wait_healthy(proc, url, log, timeout)
            try:
                yield Process(url, proc.pid)
            except BaseException:
                sys.stderr.write(f"--- server output ---\n{_tail(log)}\n")
                raise
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)


async def _send(session: aiohttp.ClientSession, body: dict, errors: Counter[str]) -> bool:
    try:
        async with session.post("/predict", json=body) as response:
            await response.read()
            status = response.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        errors[type(e).__name__] += 1
        return False
    if status != 200:
        errors[f"HTTP {status}"] += 1
        return False
    return True


async def closed_loop(
    url: str,
    body: Callable[[int], dict],
    clients: int,
    seconds: float,
    timeout: float,
    rss_of: int | None = None,
) -> Load:
    """``clients`` workers send ``body(i)`` (i counts requests) back to back for ``seconds``.

    With ``rss_of`` (the server's pid), its RSS is sampled every 0.5 s with the number of
    requests answered so far, and its CPU time and this process's.
    """
    load, counter = Load(), itertools.count()
    connector = aiohttp.TCPConnector(limit=clients)
    timeouts = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeouts) as session:
        t0 = time.perf_counter()

        async def worker() -> None:
            while time.perf_counter() - t0 < seconds:
                start = time.perf_counter()
                ok = await _send(session, body(next(counter)), load.errors)
                end = time.perf_counter()
                load.records.append((end - t0, end - start, ok))

        def sample() -> None:
            if rss_of is not None:
                t = time.perf_counter() - t0
                load.samples.append((t, len(load.records), memory_mb(rss_of)["VmRSS"]))
                load.cpu.append((t, time.process_time(), cpu_seconds(rss_of)))

        async def sampler() -> None:
            while True:
                sample()
                await asyncio.sleep(0.5)

        sampling = asyncio.create_task(sampler())
        try:
            workers = asyncio.gather(*(worker() for _ in range(clients)))
            await asyncio.wait_for(workers, seconds + timeout + 10)
        finally:
            sampling.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampling
        sample()
    return load
