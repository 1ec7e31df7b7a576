"""Chat backends for the prompting procedures: an OpenAI-compatible HTTP client and an offline one.

Both take a batch of `ChatRequest`s and return, per request, the validated value or a `ChatError`
(never raising for one bad request), so a procedure's code is the same for either backend.

`ChatClient` speaks the chat-completions protocol (`POST {base_url}/chat/completions`) of OpenAI
and of local servers (vLLM, llama.cpp, ollama) with the standard library only:
- the API key is read from the environment variable named in the config (default
  `OPENAI_API_KEY`) and sent only in the Authorization header; a server may echo it back (in an
  error body, a non-JSON body, the reply content), so it is scrubbed from every reply and every
  error message before either is cut short, kept, cached or shown; without a key no
  Authorization header is sent (local servers);
- a per-request deadline on the whole exchange (connect, headers and body): a server that
  trickles its reply a byte at a time is cut off at `timeout_s`; bounded retries with exponential backoff (honouring Retry-After) on 429,
  5xx, timeouts, connection errors, malformed response bodies and content that fails validation;
  other 4xx fail at once;
- bounded concurrency with a thread pool;
- an on-disk cache `cache_dir/<hh>/<sha256 of the request>.json`, written atomically as soon as
  a response validates, so a crashed or repeated run re-sends only what never finished.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from tqdm import tqdm

from llm3d_jax.fileio import InputError, write_text_atomic

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


@dataclasses.dataclass(frozen=True)
class ChatConfig:
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-3.5-turbo"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 4  # attempts = 1 + max_retries
    backoff_s: float = 1.0  # first wait; doubles per retry
    max_backoff_s: float = 30.0
    concurrency: int = 4
    cache_dir: str | None = None
    max_tokens: int = 1024
    json_mode: bool = (
        False  # send response_format {"type": "json_object"} (not every server has it)
    )


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat completion: OpenAI-style `messages` (content may be a list of parts, e.g. images)."""

    messages: tuple[dict, ...]
    temperature: float = 0.0
    expect_json: bool = True


class ChatError(Exception):
    """A request that did not produce a valid answer after the allowed attempts."""


def parse_json_content(text: str) -> Any:
    """The JSON value in a model reply, tolerating a ```json fence or text around one object."""
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else body[3:]
        body = body.rsplit("```", 1)[0]
    try:
        return json.loads(body)
    except json.JSONDecodeError:
        start, end = body.find("{"), body.rfind("}")
        if 0 <= start < end:
            try:
                return json.loads(body[start : end + 1])
            except json.JSONDecodeError:
                pass
    raise ValueError(f"reply is not JSON: {text[:120]!r}")


def _check(request: ChatRequest, content: str, validate: Callable | None) -> Any:
    value = parse_json_content(content) if request.expect_json else content
    return validate(value) if validate is not None else value


def _run_batch(work: Callable[[int], Any], n: int, concurrency: int, desc: str | None) -> list[Any]:
    results: list[Any] = [None] * n
    bar = tqdm(total=n, desc=desc, unit="req", leave=False, disable=desc is None)
    with concurrent.futures.ThreadPoolExecutor(max(1, concurrency)) as pool:
        futures = {pool.submit(work, i): i for i in range(n)}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            bar.update()
    bar.close()
    return results


class _Deadline:
    """Shuts the sockets of one HTTP exchange down when it runs past `seconds` in all.

    urllib's timeout bounds each socket operation, so a body trickled a byte at a time never
    times out; shutting the socket down makes the blocked read return and the exchange fail.
    """

    def __init__(self, seconds: float):
        self.sockets: list[socket.socket] = []
        self.expired = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self.sockets.append(sock)
            if self.expired:
                sock.shutdown(socket.SHUT_RDWR)

    def opener(self) -> urllib.request.OpenerDirector:
        """A urllib opener (proxies and TLS as usual) whose connections register their socket."""
        deadline = self

        def watched(base):
            class Connection(base):
                def connect(self):
                    super().connect()
                    deadline.watch(self.sock)

            return Connection

        class HTTPHandler(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(watched(http.client.HTTPConnection), req)

        class HTTPSHandler(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(
                    watched(http.client.HTTPSConnection), req, context=self._context
                )

        return urllib.request.build_opener(HTTPHandler, HTTPSHandler)

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


class ChatClient:
    """OpenAI-compatible chat completions over HTTP (see the module docstring)."""

    def __init__(self, config: ChatConfig, sleep: Callable[[float], None] = time.sleep):
        self.config = config
        self._sleep = sleep
        # Stripped: a key read from a file often ends in a newline, and http.client would put
        # the header value, key and all, into its error message.
        self._key = (os.environ.get(config.api_key_env) or "").strip() or None
        if self._key and any(ord(c) < 32 or ord(c) == 127 for c in self._key):
            raise InputError(
                None,
                f"${config.api_key_env} holds a control character; it cannot be sent in a header",
            )
        # The forms a server may echo the key in: as is, and as a JSON string ("/" maybe escaped).
        escaped = json.dumps(self._key or "")[1:-1]
        self._key_forms = sorted(
            {f for f in (self._key, escaped, escaped.replace("/", "\\/")) if f},
            key=len,
            reverse=True,
        )

    def __repr__(self) -> str:  # never shows the key
        return f"ChatClient(base_url={self.config.base_url!r}, model={self.config.model!r})"

    def _body(self, request: ChatRequest) -> dict:
        body = {
            "model": self.config.model,
            "messages": list(request.messages),
            "temperature": request.temperature,
            "max_tokens": self.config.max_tokens,
        }
        if self.config.json_mode and request.expect_json:
            body["response_format"] = {"type": "json_object"}
        return body

    def cache_key(self, request: ChatRequest) -> str:
        """sha256 of everything that determines the reply: server, model and request body."""
        blob = json.dumps([self.config.base_url.rstrip("/"), self._body(request)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def _cache_path(self, key: str) -> str | None:
        if not self.config.cache_dir:
            return None
        return os.path.join(self.config.cache_dir, key[:2], key + ".json")

    def _scrub(self, text: str) -> str:
        """`text` without the key; always before cutting it short (no half key survives)."""
        for form in self._key_forms:
            text = text.replace(form, "***")
        return text

    def _post(self, body: dict) -> str:
        """One HTTP attempt -> the reply content; raises _Retry or ChatError."""
        url = self.config.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        timeout = self.config.timeout_s
        try:
            with _Deadline(timeout) as deadline:
                try:
                    with deadline.opener().open(req, timeout=timeout) as resp:
                        raw = resp.read()
                except urllib.error.HTTPError as err:
                    text = err.read(1 << 16).decode("utf-8", "replace")
                    detail = self._scrub(text)[:200]
                    message = f"HTTP {err.code} from {url}: {detail}"
                    if err.code in RETRY_STATUS or err.code >= 500:
                        retry_after = _retry_after(err.headers.get("Retry-After"))
                        raise _Retry(message, retry_after) from None
                    raise ChatError(message) from None
        except TimeoutError as err:
            raise _Retry(f"timeout after {timeout} s ({err})") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as err:
            if deadline.expired:
                raise _Retry(f"timeout: no complete response within {timeout} s") from None
            raise _Retry(self._scrub(f"connection to {url} failed: {err}")) from None
        if deadline.expired:  # the read may end early, without an error, when cut off
            raise _Retry(f"timeout: no complete response within {timeout} s")
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            text = self._scrub(raw.decode("utf-8", "replace"))
            raise _Retry(f"malformed response body from {url}: {text[:120]!r}") from None
        if not isinstance(content, str):
            raise _Retry(f"response content is not text: {self._scrub(repr(content))[:120]}")
        return self._scrub(content)

    def complete(self, request: ChatRequest, validate: Callable | None = None) -> Any:
        """The validated reply of one request (from the cache when present); ChatError when it fails.

        `validate(value)` gets the parsed JSON (or the text when `expect_json` is False) and
        returns what to keep or raises ValueError; invalid replies are retried and never cached.
        """
        key = self.cache_key(request)
        path = self._cache_path(key)
        if path and os.path.exists(path):
            try:
                with open(path, encoding="utf-8") as f:
                    return _check(request, json.load(f)["content"], validate)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # an unreadable or no longer valid cache entry is fetched again
        body = self._body(request)
        last, wait = "no attempt", None
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self._sleep(
                    min(
                        self.config.max_backoff_s,
                        wait or self.config.backoff_s * 2 ** (attempt - 1),
                    )
                )
            wait = None
            try:
                content = self._post(body)
                value = _check(request, content, validate)
            except _Retry as err:
                last, wait = self._scrub(str(err)), err.retry_after
                continue
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
                # A validator's complaint about a malformed reply: retried like a bad body.
                last = self._scrub(f"invalid reply: {err}")
                continue
            if path:
                write_text_atomic(
                    path, json.dumps({"model": self.config.model, "content": content})
                )
            return value
        raise ChatError(f"{last} (gave up after {self.config.max_retries + 1} attempts)")

    def complete_many(
        self,
        requests: Sequence[ChatRequest],
        validate: Callable | None = None,
        desc: str | None = None,
    ) -> list[Any]:
        """`complete` for each request, `concurrency` at a time; a failure is its ChatError.

        `validate` is one callable for all requests or a sequence with one per request.
        """
        checks = _validators(validate, len(requests))

        def work(i: int) -> Any:
            try:
                return self.complete(requests[i], checks[i])
            except ChatError as err:
                return err

        return _run_batch(work, len(requests), self.config.concurrency, desc)


def _validators(validate, n: int) -> list:
    if validate is None or callable(validate):
        return [validate] * n
    if len(validate) != n:
        raise ValueError(f"{len(validate)} validators for {n} requests")
    return list(validate)


class _Retry(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class OfflineChat:
    """The deterministic template "LLM": `respond(messages, temperature) -> reply text`.

    Each procedure supplies a responder that reads its own prompts (the scene lines, the
    dialogue so far) and answers from them, so the offline run goes through the same prompt
    building, reply parsing and validation as a run against a server.
    """

    def __init__(self, respond: Callable[[Sequence[dict], float], str]):
        self.respond = respond

    def complete(self, request: ChatRequest, validate: Callable | None = None) -> Any:
        try:
            return _check(request, self.respond(request.messages, request.temperature), validate)
        except ValueError as err:
            raise ChatError(f"invalid reply: {err}") from None

    def complete_many(self, requests, validate=None, desc=None) -> list[Any]:
        out = []
        for r, check in zip(requests, _validators(validate, len(requests))):
            try:
                out.append(self.complete(r, check))
            except ChatError as err:
                out.append(err)
        return out
