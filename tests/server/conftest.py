"""Starts the real `adakv serve` on a free loopback port for the server tests.

The binary comes from $ADAKV_BINARY (ctest sets it), else build/adakv; the model from
$ADAKV_MODEL_DIR, else models/adakv-tiny-v1; $ADAKV_SERVER_ARGS adds arguments to every server. Every server listens on 127.0.0.1 only, and every
test bounds its own requests in count and time.
"""
import json
import os
import re
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = os.environ.get("ADAKV_BINARY", str(ROOT / "build" / "adakv"))
MODEL_DIR = os.environ.get("ADAKV_MODEL_DIR", str(ROOT / "models" / "adakv-tiny-v1"))
MODEL_NAME = "adakv-tiny-v1"
# Sanitizer builds run several times slower.
SLOW = float(os.environ.get("ADAKV_TEST_SLOWDOWN", "1"))
# Arguments every server of the suite gets first, e.g. "--device cuda" to run the suite against
# the GPU engine on the GPU machine.
SERVER_ARGS = os.environ.get("ADAKV_SERVER_ARGS", "").split()


class Server:
    """One `adakv serve` process; stderr goes to a temporary file that the tests may read."""

    def __init__(self, *extra_args, load_timeout=120.0):
        self.final_log = None
        self.log = tempfile.NamedTemporaryFile(prefix="adakv-serve-", suffix=".log", delete=False)
        self.args = [BINARY, "serve", "--model", MODEL_DIR, "--host", "127.0.0.1", "--port", "0", *SERVER_ARGS,
                     *extra_args]
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=self.log, stdin=subprocess.DEVNULL)
        self.port = None
        deadline = time.monotonic() + load_timeout * SLOW
        while self.port is None:
            m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.stderr())
            if m:
                self.port = int(m.group(1))
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"adakv serve did not start:\n{self.stderr()}")
            time.sleep(0.05)
        self.base = f"http://127.0.0.1:{self.port}"
        while True:
            status, _ = self.get("/health")
            if status == 200:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"adakv serve did not become ready:\n{self.stderr()}")
            time.sleep(0.05)

    def stderr(self):
        if self.final_log is not None:
            return self.final_log
        return Path(self.log.name).read_text(errors="replace")

    def get(self, path, headers=None, timeout=30):
        req = urllib.request.Request(self.base + path, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout * SLOW) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except (ConnectionError, urllib.error.URLError):
            return None, ""

    def post(self, path, body, headers=None, timeout=60):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, headers={"Content-Type": "application/json",
                                                                          **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout * SLOW) as r:
                return r.status, json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read().decode())

    def metrics(self):
        status, text = self.get("/metrics")
        assert status == 200, text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout * SLOW)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self.final_log = Path(self.log.name).read_text(errors="replace")
            os.unlink(self.log.name)


def openai_client(server, api_key="unused", **kw):
    import openai

    return openai.OpenAI(base_url=server.base + "/v1", api_key=api_key, max_retries=0, timeout=120 * SLOW, **kw)


def wait_for(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout * SLOW
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="session")
def server():
    s = Server("--kv-window", "16")
    yield s
    assert s.stop() == 0, s.stderr()


@pytest.fixture(scope="session")
def client(server):
    return openai_client(server)
