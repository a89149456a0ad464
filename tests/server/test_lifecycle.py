"""`adakv serve` under client disconnects, shutdown signals, limits, API keys and load."""
import http.client
import json
import signal
import socket
import threading
import time

import openai
import pytest

from conftest import MODEL_NAME, SLOW, Server, openai_client, wait_for


def open_stream(server, body):
    """Starts a streaming request on a raw connection; returns it after the first event."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60 * SLOW)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    line = resp.readline()
    assert line.startswith(b"data: "), line
    return conn, resp


def test_disconnect_cancels_and_frees_pages(server):
    base = server.metrics()
    conn, resp = open_stream(server, {"model": MODEL_NAME, "prompt": "A very long story begins", "max_tokens": 4000,
                                      "ignore_eos": True, "stream": True})
    # The engine publishes its counters after each step: the first token may arrive before.
    wait_for(lambda: (m := server.metrics())["adakv_kv_pages_used"] > 0 and m["adakv_requests_running"] == 1,
             what="the stream to hold pages")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    after = wait_for(lambda: (m := server.metrics())["adakv_kv_pages_used"] == 0 and m["adakv_requests_running"] == 0
                     and m, what="pages to return")
    key = 'adakv_requests_cancelled_total{reason="disconnect"}'
    assert after[key] == base[key] + 1
    # Far fewer tokens than asked for were generated.
    assert after["adakv_generated_tokens_total"] - base["adakv_generated_tokens_total"] < 2000


def test_disconnect_of_non_streaming_request_cancels(server):
    base = server.metrics()
    s = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps({"model": MODEL_NAME, "prompt": "Another long story", "max_tokens": 4000, "ignore_eos": True})
    s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    wait_for(lambda: server.metrics()["adakv_requests_running"] == 1, what="request to run")
    s.close()
    after = wait_for(lambda: (m := server.metrics())["adakv_kv_pages_used"] == 0 and m["adakv_requests_running"] == 0
                     and m, what="pages to return")
    key = 'adakv_requests_cancelled_total{reason="disconnect"}'
    assert after[key] == base[key] + 1


def test_api_key():
    s = Server("--api-key", "sekrit")
    try:
        with pytest.raises(openai.AuthenticationError) as e:
            openai_client(s, api_key="wrong").models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        status, text = s.get("/v1/models")
        assert status == 401 and "Authorization" in json.loads(text)["error"]["message"]
        assert openai_client(s, api_key="sekrit").models.list().data[0].id == MODEL_NAME
        r = openai_client(s, api_key="sekrit").completions.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
        assert r.usage.completion_tokens > 0
        # Health and metrics stay open for probes.
        assert s.get("/health")[0] == 200 and s.get("/metrics")[0] == 200
    finally:
        assert s.stop() == 0


def test_small_pool_and_body_limit():
    # 64 pages of 16 tokens over 8 layers x 2 kv heads: a prompt over 64 tokens can never fit.
    s = Server("--kv-pages", "64", "--max-body-bytes", "4096")
    try:
        status, payload = s.post("/v1/completions", {"model": MODEL_NAME, "prompt": "word " * 200, "max_tokens": 2})
        assert status == 400, payload
        assert payload["error"]["code"] == "kv_pool_too_small" and "never fit" in payload["error"]["message"]
        status, payload = s.post("/v1/completions", {"model": MODEL_NAME, "prompt": "x" * 5000, "max_tokens": 2})
        assert status == 413 and payload["error"]["code"] == "request_too_large"
        # A request that fits still works.
        status, payload = s.post("/v1/completions", {"model": MODEL_NAME, "prompt": "Hi", "max_tokens": 2})
        assert status == 200, payload
    finally:
        assert s.stop() == 0


def test_sigterm_finishes_in_flight_requests_and_exits_0():
    s = Server("--shutdown-grace", "60")
    result = {}

    def run():
        result["r"] = openai_client(s).completions.create(model=MODEL_NAME, prompt="Finish me", max_tokens=48,
                                                          temperature=0, extra_body={"ignore_eos": True})

    t = threading.Thread(target=run)
    t.start()
    wait_for(lambda: s.metrics()["adakv_requests_running"] == 1, what="request to run")
    s.proc.send_signal(signal.SIGTERM)
    t.join(timeout=120 * SLOW)
    assert result["r"].usage.completion_tokens == 48
    assert s.stop() == 0
    assert "shutting down" in s.stderr() and "stopped" in s.stderr()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=2).close()


def test_sigint_cancels_after_the_grace_period():
    s = Server("--shutdown-grace", "0.5")
    conn, resp = open_stream(s, {"model": MODEL_NAME, "prompt": "Never ending", "max_tokens": 7000,
                                 "ignore_eos": True, "stream": True})
    start = time.monotonic()
    s.proc.send_signal(signal.SIGINT)
    rest = resp.read().decode()  # the stream ends with an error event and [DONE]
    assert time.monotonic() - start < 30 * SLOW
    events = [line[len("data: "):] for line in rest.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "service_unavailable"
    conn.close()
    assert s.stop() == 0
    assert "cancelling 1 request" in s.stderr()


def test_64_concurrent_streaming_clients(server):
    n, failures, done = 64, [], []
    lock = threading.Lock()

    def run(i):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300 * SLOW)
            body = {"model": MODEL_NAME, "prompt": f"Client {i} says", "max_tokens": 12, "stream": True,
                    "stream_options": {"include_usage": True}}
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read().decode()
            conn.close()
            events = [line[len("data: "):] for line in payload.split("\n") if line.startswith("data: ")]
            assert resp.status == 200, payload
            assert events[-1] == "[DONE]", payload
            usage = json.loads(events[-2])["usage"]
            assert usage["completion_tokens"] >= 1
            with lock:
                done.append(i)
        except Exception as e:  # noqa: BLE001 - collected and reported
            with lock:
                failures.append((i, repr(e)))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600 * SLOW)
    assert not failures, failures[:5]
    assert len(done) == n
    m = wait_for(lambda: (m := server.metrics())["adakv_requests_running"] == 0 and m, what="idle engine")
    assert m["adakv_kv_pages_used"] == 0
    assert m["adakv_requests_running_peak"] > 1  # the engine batched them


def test_unrenderable_chat_template_fails_at_start_up(tmp_path):
    import os
    import subprocess

    from conftest import BINARY, MODEL_DIR

    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        os.symlink(os.path.join(MODEL_DIR, name), tmp_path / name)
    with open(os.path.join(MODEL_DIR, "tokenizer_config.json")) as f:
        config = json.load(f)
    config["chat_template"] = "{% for m in messages %}{{ m.content | no_such_filter }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    r = subprocess.run([BINARY, "serve", "--model", str(tmp_path), "--port", "0"], capture_output=True, text=True,
                       timeout=120 * SLOW)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("adakv: error:") and "chat template" in lines[-1], r.stderr
    assert "listening" not in r.stderr  # refused before it serves anything
