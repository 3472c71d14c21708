"""A local S3 endpoint for tests and benchmarks: moto's standalone server in a child process.

moto is a test extra (`pip install -e '.[test]'`); it is needed when the server starts, not when this module is
imported (the server runs as `python -m moto.server`).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

__all__ = ["local_s3_server"]


@contextlib.contextmanager
def local_s3_server(timeout_s: float = 30.0) -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 at a free port, in its own process; yields its endpoint URL (for
    AWS_ENDPOINT_URL or boto3's endpoint_url) and stops the server when the block ends.

    Raises:
        RuntimeError: the server exited (moto not installed?) or did not accept connections within timeout_s.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"moto's S3 server exited with code {proc.returncode}: is moto installed "
                        "(pip install 'moto[server]', in the test extra)?"
                    ) from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start in {timeout_s:g} s") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
