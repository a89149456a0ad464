"""The OpenAI-compatible API of `adakv serve`, through the official openai client and curl."""
import json
import re
import subprocess
import threading

import openai
import pytest

from conftest import BINARY, MODEL_DIR, MODEL_NAME, SERVER_ARGS, wait_for

# Long enough that a budget of 64 entries per head really evicts (about 330 tokens).
LONG_PROMPT = " ".join(
    f"Item {i}: the {c} box holds {i * 7 % 13} marbles." for i, c in enumerate(["red", "blue", "green"] * 9)
) + " Question: how many marbles does the red box hold? Answer:"


def usage_extra(usage, name):
    return usage.model_dump()[name]


def curl(*args, timeout=60):
    """curl's output as text with its CRLFs kept (text mode would turn them into LFs)."""
    r = subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=timeout)
    r.stdout = r.stdout.decode(errors="replace")
    return r


def test_health_and_models(server, client):
    assert server.get("/health") == (200, "ok\n")
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME


def test_start_up_line_names_the_device(server):
    m = re.search(r"serving 'adakv-tiny-v1' on http://127\.0\.0\.1:\d+ \(device (cpu|cuda \([^)]+\)), loaded in",
                  server.stderr())
    assert m, server.stderr()
    if "--device" in SERVER_ARGS:
        assert m.group(1).startswith(SERVER_ARGS[SERVER_ARGS.index("--device") + 1])


def test_completion(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert choice.text
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0
    assert r.usage.completion_tokens == 12 or choice.finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert usage_extra(r.usage, "kv_entries") == usage_extra(r.usage, "kv_full_entries") > 0
    assert usage_extra(r.usage, "compression_ratio") == 1.0


def test_greedy_output_equals_adakv_generate(client):
    prompt = "The old lighthouse keeper looked at the sea and said"
    out = subprocess.run([BINARY, "generate", "--model", MODEL_DIR, "--prompt", prompt, "-n", "24", "--temperature", "0"],
                         capture_output=True, text=True, timeout=300, check=True)
    expected = out.stdout[:-1]  # generate ends its output with a newline
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0)
    assert r.choices[0].text == expected
    # The same through the chat-free streaming path.
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0, stream=True))
    assert streamed == expected


def test_chat(client):
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "system", "content": "Be brief."},
                                                                   {"role": "user", "content": "Say hello."}],
                                       max_tokens=10, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    # The prompt is the model's chat template: system + user turns and the assistant header.
    assert r.usage.prompt_tokens > 8


def test_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL_NAME, prompt="In a small village by the river", max_tokens=20, temperature=0)
    whole = client.completions.create(**kw)
    pieces, finish, usage = [], None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == whole.choices[0].text
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert "\ufffd" not in "".join(pieces)  # no character was split between chunks


def test_chat_streaming(client):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    whole = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_streaming_with_curl(server):
    body = json.dumps({"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 5, "stream": True})
    r = curl("-i", "-N", server.base + "/v1/completions", "-H", "Content-Type: application/json", "-d", body)
    head, _, payload = r.stdout.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert "Content-Type: text/event-stream" in head
    assert "Transfer-Encoding: chunked" in head
    events = [line for line in payload.split("\n") if line]
    assert all(e.startswith("data: ") for e in events), events
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_strings_cut_the_text(client):
    base = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=30, temperature=0)
    text = base.choices[0].text
    stop = text[5:9]
    assert stop and stop in text
    cut = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=30, temperature=0,
                                    stop=[stop, "never-appears"])
    assert cut.choices[0].text == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL_NAME, prompt="Once upon a time", max_tokens=30, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_sampling_seed_reproduces(client):
    kw = dict(model=MODEL_NAME, prompt="The weather today", max_tokens=12, temperature=1.0, top_p=0.9, seed=1234,
              extra_body={"top_k": 40})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b


def test_per_request_policy_changes_compression(client):
    full = client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT, max_tokens=4, temperature=0)
    assert usage_extra(full.usage, "compression_ratio") == 1.0
    assert full.usage.prompt_tokens > 200
    for policy in ("snapkv", "ada-snapkv", "pyramidkv", "streamingllm"):
        r = client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT, max_tokens=4, temperature=0,
                                      extra_body={"kv_policy": policy, "kv_budget": 64})
        ratio = usage_extra(r.usage, "compression_ratio")
        assert ratio > 2.0, (policy, r.usage)
        assert usage_extra(r.usage, "kv_entries") < usage_extra(r.usage, "kv_full_entries")
    r = client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT, max_tokens=4, temperature=0,
                                  extra_body={"kv_policy": "kvcompress", "kv_max_cache_tokens": 96,
                                              "kv_protected_window": 8})
    assert usage_extra(r.usage, "compression_ratio") > 1.5, r.usage
    # A tighter budget keeps fewer entries.
    loose = client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT, max_tokens=2, temperature=0,
                                      extra_body={"kv_policy": "snapkv", "kv_budget": 128})
    tight = client.completions.create(model=MODEL_NAME, prompt=LONG_PROMPT, max_tokens=2, temperature=0,
                                      extra_body={"kv_policy": "snapkv", "kv_budget": 48, "kv_window": 8})
    assert usage_extra(tight.usage, "compression_ratio") > usage_extra(loose.usage, "compression_ratio")


def test_concurrent_requests(client):
    prompts = [f"Story number {i}: once upon a time" for i in range(8)]
    results, errors = [None] * len(prompts), []

    def run(i):
        try:
            results[i] = client.completions.create(model=MODEL_NAME, prompt=prompts[i], max_tokens=10, temperature=0)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    for r in results:
        assert r is not None and r.usage.completion_tokens > 0


# ---- errors ---------------------------------------------------------------------------------

def expect_error(server, path, body, status, param=None, code=None, headers=None):
    got, payload = server.post(path, body, headers=headers)
    assert got == status, payload
    err = payload["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize("body,param", [
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": "x", "kv_budget": "many"}, "kv_budget"),
    ({"prompt": "x", "kv_alpha": [1]}, "kv_alpha"),
])
def test_wrong_types(server, body, param):
    expect_error(server, "/v1/completions", body, 400, param=param)


def test_malformed_json(server):
    err = expect_error(server, "/v1/completions", b"{\"prompt\": ", 400, code="invalid_json")
    assert "JSON" in err["message"]
    expect_error(server, "/v1/chat/completions", b"[1, 2]", 400, code="invalid_json")
    r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", server.base + "/v1/completions", "-d", "not json")
    assert r.stdout == "400"


def test_errors_through_the_openai_client(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, extra_body={"kv_policy": "magic"})
    assert e.value.body["param"] == "kv_policy" and "snapkv" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2,
                                  extra_body={"kv_policy": "snapkv", "kv_budget": 16, "kv_window": 32})
    assert e.value.body["param"] == "kv_budget" and "window" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=100000)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL_NAME, messages=[], max_tokens=2)
    assert e.value.body["param"] == "messages"


def test_prompt_over_the_context(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="word " * 9000, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    assert "8192" in e.value.body["message"]


def test_unknown_route_and_wrong_method(server):
    status, text = server.get("/v2/nothing")
    assert status == 404 and json.loads(text)["error"]["code"] == "not_found"
    r = curl("-i", "-X", "DELETE", server.base + "/v1/models")
    assert r.stdout.startswith("HTTP/1.1 405") and "Allow: GET" in r.stdout
    status, text = server.get("/v1/completions")
    assert status == 405 and json.loads(text)["error"]["code"] == "method_not_allowed"


def test_chunked_request_body_is_refused(server):
    r = curl("-i", server.base + "/v1/completions", "-H", "Transfer-Encoding: chunked", "-H",
             "Content-Type: application/json", "-d", '{"prompt": "x"}')
    assert r.stdout.startswith("HTTP/1.1 411"), r.stdout
    assert json.loads(r.stdout.partition("\r\n\r\n")[2])["error"]["code"] == "length_required"


def test_server_keeps_serving_after_errors(server, client):
    for body in (b"{", b"\xff\xfe", {"prompt": None}, {"messages": "nope"}):
        server.post("/v1/completions", body)
    r = client.completions.create(model=MODEL_NAME, prompt="Still alive", max_tokens=3, temperature=0)
    assert r.usage.completion_tokens > 0


def test_metrics_content(server, client):
    before = server.metrics()
    client.completions.create(model=MODEL_NAME, prompt="Count me", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    after = wait_for(lambda: (m := server.metrics())["adakv_requests_running"] == 0 and m, what="idle engine")
    for name in ("adakv_ready", "adakv_requests_total", "adakv_requests_running", "adakv_requests_waiting",
                 "adakv_prompt_tokens_total", "adakv_generated_tokens_total", "adakv_generation_tokens_per_second",
                 "adakv_kv_pages_total", "adakv_kv_pages_used", "adakv_kv_pages_free", "adakv_kv_tokens_kept_total",
                 "adakv_kv_tokens_evicted_total", "adakv_kv_compression_ratio", "adakv_preemptions_total"):
        assert name in after, name
    assert after["adakv_ready"] == 1
    assert after["adakv_requests_total"] == before["adakv_requests_total"] + 1
    assert after["adakv_generated_tokens_total"] >= before["adakv_generated_tokens_total"] + 5
    assert after["adakv_kv_pages_used"] + after["adakv_kv_pages_free"] == after["adakv_kv_pages_total"]
    assert after['adakv_http_responses_total{route="/v1/completions",code="200"}'] >= 1
    status, text = server.get("/metrics")
    assert "# TYPE adakv_kv_pages_used gauge" in text
