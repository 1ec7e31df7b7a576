"""Issue 22, cases 4, 6, 10, 12: `--backend openai` against a hostile server on 127.0.0.1.

The key never reaches a message, a log, the cache, the records or the stats file, whatever the
server echoes of it and on whichever path; a trickled response ends at --timeout; bad numbers
are one-line errors; --tasks is obeyed.
"""

from __future__ import annotations

import http.server
import json
import os
import threading
import time

import pytest

from data_pipeline.language import boxes_demo
from data_pipeline.language.openai_client import ChatClient, ChatConfig, ChatError, ChatRequest
from data_pipeline.scenes.synthetic import make_scene
from tests.hostile.pipeline_inputs import assert_no_traceback, run_module

SECRET = "sk-hostile/4f9c2a7d1e8b60535aa1"
# Pieces of the key a truncated echo could leave behind.
FRAGMENTS = (SECRET, SECRET[:14], SECRET[-14:], "4f9c2a7d", "60535aa1", "sk-hostile")


class HostileServer:
    """A chat-completions server whose reply is `self.mode`; every mode echoes the key."""

    def __init__(self):
        self.mode, self.requests = "echo_body", []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                auth = self.headers.get("Authorization", "")
                try:
                    server.reply(self, server.mode, auth, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def reply(self, handler, mode, auth, body):
        echo = f"you sent Authorization: {auth}"
        status, payload, trickle_headers, trickle_body = 200, None, False, False
        content = None
        if mode == "echo_body":  # a 200 whose body is not JSON
            payload = echo.encode()
        elif mode == "echo_body_cut":  # the key straddles where a message would cut the body
            payload = ("x" * 74 + echo).encode()
        elif mode in ("echo_401", "echo_500"):
            status, payload = int(mode[-3:]), ("x" * 154 + echo).encode()
        elif mode == "echo_content":  # reply content that is not the JSON asked for
            content = "x" * 74 + echo
        elif mode == "echo_valid_content":  # valid JSON: the key would land in the records
            content = json.dumps({"description": f"a room. {echo}"})
        elif mode == "echo_json_escaped":  # the key as a JSON string with "/" escaped
            payload = (json.dumps({"you_sent": auth}).replace("/", "\\/")).encode() + b" <"
        elif mode == "echo_nontext_content":
            content = {"echo": echo}
        elif mode == "answer":
            content = boxes_demo.offline_respond(body["messages"], body["temperature"])
        elif mode == "trickle_body":
            trickle_body = True
            content = json.dumps({"description": "a room, slowly."})
        elif mode == "trickle_headers":
            trickle_headers = True
        if payload is None and content is not None:
            payload = json.dumps({"choices": [{"message": {"content": content}}]}).encode()
        if trickle_headers:
            handler.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(200):
                handler.wfile.write(b"X-Slow: y\r\n")
                handler.wfile.flush()
                time.sleep(0.5)
            return
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        if trickle_body:
            for i in range(len(payload)):
                handler.wfile.write(payload[i : i + 1])
                handler.wfile.flush()
                time.sleep(0.5)
        else:
            handler.wfile.write(payload)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    s = HostileServer()
    yield s
    s.close()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    make_scene(4, 0).save(d)
    return d


def language(server, scenes, out, *extra, timeout=60):
    return run_module(
        "data_pipeline.language", "--scenes", str(scenes), "--out", str(out),
        "--backend", "openai", "--base-url", server.url, "--model", "mock",
        "--api-key-env", "HOSTILE_KEY", "--temperatures", "0.2", "--max-retries", "0",
        "--backoff", "0", *extra,
        env={"HOSTILE_KEY": SECRET}, timeout=timeout,
    )  # fmt: skip


def everything_written(root) -> str:
    out = []
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out.append(f"{os.path.join(d, f)}\n{fh.read().decode('utf-8', 'replace')}")
    return "\n".join(out)


@pytest.mark.parametrize(
    "mode",
    [
        "echo_body", "echo_body_cut", "echo_401", "echo_500", "echo_content",
        "echo_valid_content", "echo_nontext_content", "echo_json_escaped",
    ],
)  # fmt: skip
def test_the_key_is_never_shown_or_written(server, scenes, tmp_path, mode):
    server.mode = mode
    proc = language(server, scenes, tmp_path / "r.jsonl", "--tasks", "caption")
    assert_no_traceback(proc)
    assert server.requests, "the server was asked"
    written = everything_written(tmp_path)
    for fragment in FRAGMENTS:
        assert fragment not in proc.stdout + proc.stderr, (mode, proc.stderr)
        assert fragment not in written, (mode, written[:2000])
    if mode == "echo_valid_content":
        assert proc.returncode == 0 and "***" in (tmp_path / "r.jsonl").read_text()
    else:
        assert proc.returncode == 1 and "1 scenes incomplete" in proc.stderr
        assert (tmp_path / "r.stats.json").exists()  # the failures are in it, scrubbed


def test_client_errors_never_hold_the_key(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTILE_KEY", SECRET)
    config = ChatConfig(
        base_url=server.url, model="mock", api_key_env="HOSTILE_KEY", timeout_s=5,
        max_retries=0, cache_dir=str(tmp_path / "cache"),
    )  # fmt: skip
    client = ChatClient(config)
    for mode in ("echo_body", "echo_body_cut", "echo_401", "echo_500", "echo_content"):
        server.mode = mode
        with pytest.raises(ChatError) as err:
            client.complete(ChatRequest(({"role": "user", "content": mode},)))
        assert not any(f in str(err.value) for f in FRAGMENTS), (mode, str(err.value))


@pytest.mark.parametrize("mode", ["trickle_body", "trickle_headers"])
def test_a_trickled_response_ends_at_the_timeout(server, tmp_path, mode):
    server.mode = mode
    client = ChatClient(ChatConfig(base_url=server.url, model="mock", timeout_s=1.0, max_retries=0))
    start = time.perf_counter()
    with pytest.raises(ChatError, match="timeout"):
        client.complete(ChatRequest(({"role": "user", "content": "q"},)))
    assert time.perf_counter() - start < 1.8


def test_a_trickled_response_ends_at_the_timeout_cli(server, scenes, tmp_path):
    server.mode = "trickle_body"
    start = time.perf_counter()
    proc = language(server, scenes, tmp_path / "r.jsonl", "--tasks", "caption", "--timeout", "2")
    elapsed = time.perf_counter() - start
    assert_no_traceback(proc)
    assert proc.returncode == 1 and "timeout" in proc.stderr
    assert elapsed < 15  # python start-up plus 2 s; the trickle alone takes minutes


@pytest.mark.parametrize(
    "args,message",
    [
        (["--timeout", "-5"], "--timeout must be > 0"),
        (["--timeout", "nan"], "--timeout must be > 0"),
        (["--max-retries", "-1"], "--max-retries must be >= 0"),
        (["--concurrency", "0"], "--concurrency must be >= 1"),
        (["--backoff", "-1"], "--backoff must be >= 0"),
        (["--temperatures", "abc"], "--temperatures: 'abc' is not a number"),
        (["--temperatures", "0.2,,1"], "--temperatures: '' is not a number"),
        (["--temperatures", "5"], "--temperatures must be in [0, 2]"),
        (["--num-views", "0"], "--num-views must be >= 1"),
        (["--rounds", "0"], "--rounds must be >= 1"),
    ],
)
def test_bad_numbers_are_one_line_errors(server, scenes, tmp_path, args, message):
    proc = language(server, scenes, tmp_path / "r.jsonl", *args)
    assert_no_traceback(proc)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"error: {message}" + proc.stderr.split(message, 1)[1].rstrip("\n")
    ], proc.stderr
    assert not os.listdir(tmp_path)


def test_tasks_are_obeyed(server, scenes, tmp_path):
    server.mode = "answer"
    server.requests.clear()
    out = tmp_path / "r.jsonl"
    proc = language(server, scenes, out, "--tasks", "qa")
    assert proc.returncode == 0, proc.stderr
    tasks = {json.loads(line)["task"] for line in out.read_text().splitlines()}
    assert tasks == {"qa"}
    assert len(server.requests) == 1
    assert server.requests[0]["messages"][0]["content"] == boxes_demo.SYSTEM_PROMPTS["qa"]


def test_tasks_a_procedure_cannot_make_are_refused(server, scenes, tmp_path):
    proc = language(server, scenes, tmp_path / "r.jsonl", "--tasks", "qa,navigation")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: --tasks: boxes_demo does not make 'navigation' (it makes "
        + ", ".join(boxes_demo.TASKS)
        + ")"
    ], proc.stderr


def test_a_key_with_a_trailing_newline_is_used_stripped(server, scenes, tmp_path):
    """A key read from a file often ends in a newline; http.client would put the header value,
    key included, into its error message."""
    server.mode = "answer"
    server.requests.clear()
    proc = run_module(
        "data_pipeline.language", "--scenes", str(scenes), "--out", str(tmp_path / "r.jsonl"),
        "--backend", "openai", "--base-url", server.url, "--api-key-env", "HOSTILE_KEY",
        "--tasks", "caption", "--temperatures", "0.2", "--max-retries", "0",
        env={"HOSTILE_KEY": SECRET + "\n"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not any(f in proc.stdout + proc.stderr for f in FRAGMENTS)
    proc = run_module(
        "data_pipeline.language", "--scenes", str(scenes), "--out", str(tmp_path / "s.jsonl"),
        "--backend", "openai", "--base-url", server.url, "--api-key-env", "HOSTILE_KEY",
        "--tasks", "caption", env={"HOSTILE_KEY": "sk-a\nb-4f9c2a7d"},
    )  # fmt: skip
    assert_no_traceback(proc)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "error: $HOSTILE_KEY holds a control character; it cannot be sent in a header"
    ]
