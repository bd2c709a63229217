"""Run `cbir serve` as a child process on a free loopback port (for tests and benchmarks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def running_server(index_dir: str | Path, *extra: str, timeout: float = 180, env: dict | None = None) -> Iterator[str]:
    """Start ``cbir serve --index DIR --port 0 EXTRA...``; yield its base URL once it answers; stop it."""
    env = {"OMP_NUM_THREADS": "1", **os.environ, **(env or {})}
    cmd = [sys.executable, "-m", "cbir.cli", "serve", "--index", str(index_dir), "--host", "127.0.0.1",
           "--port", "0", "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline, lines, url = time.monotonic() + timeout, [], None
        for line in iter(proc.stderr.readline, ""):  # until the URL, the deadline, or the end of stderr
            lines.append(line)
            if m := re.search(r"at (http://127\.0\.0\.1:\d+/)", line):
                url = m.group(1)
            if url or time.monotonic() > deadline:
                break
        if url is None:
            proc.kill()
            proc.wait(5)
            raise RuntimeError("cbir serve did not start:\n" + "".join(lines) + (proc.stderr.read() or ""))
        _wait_ready(url, deadline)
        yield url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        proc.stderr.close()


def _wait_ready(url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url + "api/health", timeout=5):  # a status over 399 raises
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
