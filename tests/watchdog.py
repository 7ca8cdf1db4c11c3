"""Run a command, failing it only when it stops making progress: bounded by work, not by the wall clock.

A loaded machine may take twice as long as an idle one; a hung command prints nothing. So a command is killed only
when its output (stdout and stderr together: log lines, progress bars) has not grown for ``stall_seconds``.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time


def run_until_stalled(command: list[str], stall_seconds: float = 600.0, **popen) -> tuple[int, str]:
    """``(exit status, output)`` of ``command``; raises ``TimeoutError`` if it printed nothing for ``stall_seconds``."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)
    chunks: list[bytes] = []
    last = [time.monotonic()]

    def read() -> None:
        while chunk := os.read(process.stdout.fileno(), 65536):
            chunks.append(chunk)
            last[0] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while process.poll() is None:
        if time.monotonic() - last[0] > stall_seconds:
            process.kill()
            process.wait()
            tail = b"".join(chunks)[-3000:].decode(errors="replace")
            raise TimeoutError(f"{command[:4]}... printed nothing for {stall_seconds:.0f} s: hung. Output:\n{tail}")
        time.sleep(0.5)
    reader.join(timeout=10)
    return process.returncode, b"".join(chunks).decode(errors="replace")
