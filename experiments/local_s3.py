"""A local S3: moto's server on 127.0.0.1, started by the test session (tests/conftest.py `local_s3`) or a benchmark
(experiments/benchmark/scale.py) and stopped with it.

Clients reach it the way AWS's own tools reach a custom endpoint (MinIO, an on-premise store): AWS_ENDPOINT_URL
with any AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY. Nothing beyond 127.0.0.1 is contacted.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass


@dataclass
class LocalS3:
    endpoint: str
    env: dict  # the variables a client (or a launched child process) needs to reach it

    def new_bucket(self, name: str | None = None) -> str:
        """A fresh, empty bucket (a random name unless given); its URL `s3://<name>`."""
        import boto3

        name = name or f"test-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket=name)
        return f"s3://{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local_s3() -> tuple[LocalS3, subprocess.Popen]:
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError(f"moto's S3 server did not start on {endpoint}") from None
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    return LocalS3(endpoint, env), server


def stop_local_s3(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
