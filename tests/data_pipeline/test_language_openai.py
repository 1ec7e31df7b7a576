"""The HTTP chat backend against a scripted chat-completions server on 127.0.0.1."""

import http.server
import json
import os
import threading
import time

import pytest

from data_pipeline.language import boxes_demo
from data_pipeline.language.__main__ import main
from data_pipeline.language.openai_client import ChatClient, ChatConfig, ChatError, ChatRequest
from data_pipeline.scenes.synthetic import make_scene

SECRET = "sk-test-SECRET-0123456789"


class MockServer:
    """`script`: actions consumed one per request ("ok", "429", "500", "401", "timeout",
    "badbody", "badcontent"); when empty, `default`. Replies come from `respond(body)`."""

    def __init__(
        self, respond=lambda body: json.dumps({"answer": body["messages"][-1]["content"]})
    ):
        self.script, self.default, self.respond = [], "ok", respond
        self.bodies, self.auth, self.active, self.max_active = [], [], 0, 0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.bodies.append(body)
                    server.auth.append(self.headers.get("Authorization"))
                    action = server.script.pop(0) if server.script else server.default
                    server.active += 1
                    server.max_active = max(server.max_active, server.active)
                try:
                    self.act(action, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                finally:
                    with server.lock:
                        server.active -= 1

            def act(self, action, body):
                if action == "timeout":
                    time.sleep(0.6)
                if action in ("429", "500", "401"):
                    self.send_response(int(action))
                    if action == "429":
                        self.send_header("Retry-After", "0.25")
                    self.end_headers()
                    self.wfile.write(b'{"error": {"message": "nope"}}')
                    return
                time.sleep(0.02)  # lets concurrent requests overlap
                if action == "badbody":
                    payload = b"{this is not json"
                else:
                    content = (
                        "sorry, no JSON today" if action == "badcontent" else server.respond(body)
                    )
                    payload = json.dumps(
                        {"choices": [{"message": {"role": "assistant", "content": content}}]}
                    ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = MockServer()
    yield s
    s.close()


def client(server, tmp_path, sleeps=None, **overrides):
    config = ChatConfig(
        base_url=server.url,
        model="mock",
        timeout_s=0.3,
        max_retries=3,
        backoff_s=0.01,
        cache_dir=str(tmp_path / "cache"),
        concurrency=1,
    )
    config = ChatConfig(**{**config.__dict__, **overrides})
    return ChatClient(config, sleep=(sleeps.append if sleeps is not None else time.sleep))


def req(text, temperature=0.0):
    return ChatRequest(({"role": "user", "content": text},), temperature)


def test_success_sends_the_key_only_in_the_header_and_caches(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    c = client(server, tmp_path)
    assert c.complete(req("hello")) == {"answer": "hello"}
    assert server.auth == [f"Bearer {SECRET}"]
    assert (
        server.bodies[0]["model"] == "mock"
        and server.bodies[0]["messages"][0]["content"] == "hello"
    )
    assert SECRET not in repr(c)
    cached = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert len(cached) == 1 and SECRET not in open(cached[0]).read()
    assert c.complete(req("hello")) == {"answer": "hello"}  # from the cache
    assert len(server.bodies) == 1
    c.complete(req("hello", temperature=0.5))  # another request: another key
    assert len(server.bodies) == 2


def test_no_key_no_authorization_header(server, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    client(server, tmp_path).complete(req("x"))
    assert server.auth == [None]


@pytest.mark.parametrize("failure", ["429", "500", "timeout", "badbody", "badcontent"])
def test_retries_then_succeeds(server, tmp_path, failure):
    sleeps = []
    server.script = [failure, failure]
    assert client(server, tmp_path, sleeps).complete(req("q")) == {"answer": "q"}
    assert len(server.bodies) == 3
    if failure == "429":
        assert sleeps == [0.25, 0.25]  # Retry-After honoured
    else:
        assert sleeps == [0.01, 0.02]  # exponential backoff


def test_retries_are_bounded_and_errors_never_show_the_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    server.default = "500"
    sleeps = []
    with pytest.raises(ChatError, match="HTTP 500.*gave up after 4 attempts") as err:
        client(server, tmp_path, sleeps).complete(req("q"))
    assert len(server.bodies) == 4 and len(sleeps) == 3
    assert SECRET not in str(err.value)
    server.default = "401"  # not retryable
    with pytest.raises(ChatError, match="HTTP 401"):
        client(server, tmp_path).complete(req("r"))
    assert len(server.bodies) == 5


def test_invalid_content_is_retried_and_never_cached(server, tmp_path):
    def validate(value):
        if "answer" not in value:
            raise ValueError("no answer")
        return value["answer"]

    server.script = ["badcontent"] * 4
    c = client(server, tmp_path)
    with pytest.raises(ChatError, match="invalid reply.*gave up after 4"):
        c.complete(req("q"), validate)
    assert not os.path.exists(tmp_path / "cache") or not any(
        fs for _, _, fs in os.walk(tmp_path / "cache")
    )
    assert c.complete(req("q"), validate) == "q"  # the server recovered: fetched, then cached


def test_batch_keeps_finished_requests_and_resumes_from_the_cache(server, tmp_path):
    """One request keeps failing; the others finish and are cached; the rerun asks only for it."""
    server.respond = lambda body: json.dumps({"answer": body["messages"][-1]["content"]})
    real = server.respond

    def flaky(body):
        if body["messages"][-1]["content"] == "q3":
            raise ConnectionResetError  # the server drops this one
        return real(body)

    server.respond = flaky
    c = client(server, tmp_path, sleeps=[], concurrency=4, max_retries=2)
    out = c.complete_many([req(f"q{i}") for i in range(8)])
    assert [o if isinstance(o, ChatError) else o["answer"] for o in out][:3] == ["q0", "q1", "q2"]
    assert isinstance(out[3], ChatError) and "gave up after 3 attempts" in str(out[3])
    assert len(server.bodies) == 7 + 3
    assert 2 <= server.max_active <= 4  # bounded concurrency, and it is used
    server.respond = real
    server.bodies.clear()
    again = c.complete_many([req(f"q{i}") for i in range(8)])
    assert [o["answer"] for o in again] == [f"q{i}" for i in range(8)]
    assert [b["messages"][-1]["content"] for b in server.bodies] == ["q3"]


def test_boxes_demo_over_http_equals_the_offline_backend_and_resumes(tmp_path, monkeypatch):
    """The CLI with --backend openai against a server answering like the template LLM: a first
    run loses every temperature-1.0 request (dropped connections) and exits 1 with the scenes
    incomplete; the rerun asks only for what never finished and writes exactly the offline
    backend's output; a third run is served entirely from the cache."""
    scenes = tmp_path / "scenes"
    for i in range(3):
        make_scene(11, i).save(scenes)
    monkeypatch.setenv("MOCK_KEY", SECRET)
    drop_hot = {"on": True}

    def respond(body):
        if drop_hot["on"] and body["temperature"] == 1.0:
            raise ConnectionResetError  # the handler closes the connection without a reply
        return boxes_demo.offline_respond(body["messages"], body["temperature"])

    s = MockServer(respond)
    try:
        base = ["--scenes", str(scenes), "--procedure", "boxes_demo", "--temperatures", "0.2,1.0"]
        http = base + [
            "--backend",
            "openai",
            "--base-url",
            s.url,
            "--model",
            "mock",
            "--api-key-env",
            "MOCK_KEY",
        ]
        http += [
            "--max-retries",
            "1",
            "--backoff",
            "0.01",
            "--timeout",
            "5",
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
        out = tmp_path / "http.jsonl"
        n = 3 * len(boxes_demo.TASKS)  # requests per temperature
        assert main(http + ["--out", str(out)]) == 1
        assert os.path.exists(str(out) + ".partial")
        assert len(s.bodies) == n + 2 * n  # 0.2 once; 1.0 twice (one retry), then given up
        drop_hot["on"] = False
        s.bodies.clear()
        assert main(http + ["--out", str(out)]) == 0
        assert len(s.bodies) == n and all(b["temperature"] == 1.0 for b in s.bodies)
        assert set(s.auth) == {f"Bearer {SECRET}"}
        assert not os.path.exists(str(out) + ".partial")
        offline_out = tmp_path / "offline.jsonl"
        assert main(base + ["--backend", "offline", "--out", str(offline_out)]) == 0
        assert out.read_text() == offline_out.read_text()
        s.bodies.clear()
        assert main(http + ["--out", str(tmp_path / "again.jsonl")]) == 0
        assert s.bodies == []
    finally:
        s.close()
