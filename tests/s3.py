"""A real S3 emulator for the test session: moto's server on 127.0.0.1.

Started once (a free port, a bucket) and stopped at the end of the session;
each test gets a prefix of its own (`s3_prefix`). Before anything uses it,
the emulator must honour a conditional put (`If-None-Match: *` answered 412
the second time): LanceDB's commits on S3 rely on it, and an emulator that
ignores it would let concurrent commits overwrite each other unnoticed.

`CountingProxy` sits between a client and the emulator and counts requests,
for tests that check what a cached search costs in object-store requests.
"""

from __future__ import annotations

import http.client
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

BUCKET = "memory-gateway-test"
KEY_ID = "testing"
SECRET = "testing"
REGION = "us-east-1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def storage_options(endpoint: str) -> dict[str, str]:
    """LanceDB's `storage_options` for the emulator at `endpoint`."""
    return {
        "endpoint": endpoint,
        "allow_http": "true",
        "aws_access_key_id": KEY_ID,
        "aws_secret_access_key": SECRET,
        "region": REGION,
        "virtual_hosted_style_request": "false",
    }


@dataclass
class S3Server:
    endpoint: str
    client: Any  # boto3's S3 client
    version: str


@dataclass
class S3Prefix:
    """A fresh `s3://bucket/prefix` of the session's emulator."""

    server: S3Server
    prefix: str
    options: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"s3://{BUCKET}/{self.prefix}"

    def object_keys(self) -> list[str]:
        """Every object key under the prefix, relative to it."""
        keys: list[str] = []
        pages = self.server.client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=BUCKET, Prefix=f"{self.prefix}/"):
            keys += [o["Key"][len(self.prefix) + 1 :] for o in page.get("Contents", [])]
        return keys


def _wait_until_up(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto.server exited: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/moto-api/")
            conn.getresponse().read()
            conn.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto.server did not answer on port {port}: {log.read_text()[-2000:]}")


def _check_conditional_put(client: Any, version: str) -> None:
    """Skip unless a second put-if-absent to one key is refused with 412."""
    from botocore.exceptions import ClientError

    key = f"_probe/{uuid.uuid4().hex}"
    client.put_object(Bucket=BUCKET, Key=key, Body=b"first", IfNoneMatch="*")
    try:
        client.put_object(Bucket=BUCKET, Key=key, Body=b"second", IfNoneMatch="*")
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 412:
            return
        pytest.skip(
            f"moto {version} answered a second conditional put with {status}, not 412:"
            " it would not honour LanceDB's commit protocol (moto[server]>=5.2.6 does)"
        )
    pytest.skip(
        f"moto {version} accepted a second put with If-None-Match: *: it would not"
        " honour LanceDB's commit protocol (moto[server]>=5.2.6 does)"
    )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    try:
        import boto3
        import moto
    except ImportError:
        pytest.skip("needs moto[server] and boto3: pip install -e '.[test]'")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_up(port, process, log)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=KEY_ID,
            aws_secret_access_key=SECRET,
            region_name=REGION,
        )
        client.create_bucket(Bucket=BUCKET)
        version = getattr(moto, "__version__", "?")
        _check_conditional_put(client, version)
        yield S3Server(endpoint, client, version)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def s3_prefix(s3_server: S3Server) -> S3Prefix:
    return S3Prefix(s3_server, f"t-{uuid.uuid4().hex[:12]}", storage_options(s3_server.endpoint))


class CountingProxy:
    """An HTTP/1.1 proxy in front of the emulator that records each request
    (method, path), or refuses them all while `down`: point a client's
    `endpoint` at `self.endpoint`."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").split(":")
        self.requests: list[tuple[str, str]] = []
        # While set, every request is answered 503 (an object store outage).
        self.down = False
        lock = threading.Lock()
        seen = self.requests
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with lock:
                    seen.append((self.command, self.path))
                if proxy.down:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream = http.client.HTTPConnection(host, int(port), timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=dict(self.headers))
                    answer = upstream.getresponse()
                    data = answer.read()
                finally:
                    upstream.close()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
