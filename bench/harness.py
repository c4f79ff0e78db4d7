"""The real processes the bench and the tests start: a broker in a home of its own, Anthropic's
Messages API stood in on loopback, and a real Claude Code driven as a user runs it."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from claude_peers import (
    INBOX_SOCKET_ENV,
    INBOX_TOKEN_ENV,
    SERVER_NAME,
    BrokerClient,
    UserError,
    module_command,
    new_id,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def end_process(proc: subprocess.Popen[bytes], terminate: bool = True) -> None:
    """Stop a child: SIGTERM (unless it was told to stop another way), 10 s to exit, then SIGKILL."""
    if terminate:
        proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class BrokerHarness:
    """A real broker subprocess in a home of its own, for bench and the tests: started from
    cached bytecode on port 0 (its bound URL read from its own output, then written into its
    config so clients and restarts use it), its stderr kept in ``log``, stopped or killed."""

    def __init__(self, home: Path, toml: str = "", nats: str = "embedded = false\n", port: int = 0) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.config = home / "daemons.toml"
        self.port = port  #: the bound port (0: known once started)
        self.toml, self.nats = toml, nats
        self._write_config()
        self.env = {**os.environ, "CLAUDE_PEERS_HOME": str(home), "CLAUDE_PEERS_CONFIG": str(self.config)}
        for key in ("CLAUDE_PEERS_URL", "CLAUDE_PEERS_TOKEN", "CLAUDE_PEERS_NAME", "CLAUDE_PEERS_MODE",
                    INBOX_SOCKET_ENV, INBOX_TOKEN_ENV):  # run inside a Claude Code session: never post into it
            self.env.pop(key, None)
        self.url = ""
        self.token = ""
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []  #: the broker's stderr, line by line

    def _write_config(self) -> None:
        self.config.write_text(f'[broker]\nlisten = "127.0.0.1:{self.port}"\n{self.toml}\n[nats]\n{self.nats}')

    def start(self, timeout: float = 20) -> BrokerHarness:
        self.proc = subprocess.Popen(module_command("broker"), env=self.env, stderr=subprocess.PIPE, text=True)
        bound = queue.Queue()

        def drain(stream: Any) -> None:
            for line in stream:
                self.log.append(line)
                found = re.search(r"listening on (http\S*://127\.0\.0\.1:(\d+))", line)
                if found:
                    bound.put(found.groups())
            bound.put(None)

        threading.Thread(target=drain, args=(self.proc.stderr,), daemon=True).start()
        try:
            ready = bound.get(timeout=timeout)
        except queue.Empty:
            ready = None
        if ready is None:
            self.stop()
            raise UserError("the broker did not start:\n" + "".join(self.log))
        self.url, port = ready
        if not self.port:  # the port it bound: clients find it there, and a restart takes it again
            self.port = int(port)
            self._write_config()
        self.token = (self.home / "token").read_text().strip()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            end_process(self.proc)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()

    def client(self, token: str | None = None, timeout: float = 30) -> BrokerClient:
        return BrokerClient(self.url, token or self.token, timeout)

    def session(self, **info: Any) -> BrokerClient:
        client = self.client()
        client.register({"machine": "testbox", "pid": os.getpid(), "cwd": "/work/a", **info})
        return client

    def cli(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """This program's command line on this broker's home and config."""
        return subprocess.run(module_command(*args), env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=60, check=False)



Answer = Callable[[dict[str, Any]], "dict[str, Any] | None"]  # a request body -> the content block to answer with


class LoopbackApi:
    """A JSON-over-HTTP API on a loopback port that a real client calls: each request's body (``{}``
    for a GET) goes to ``respond``, whose (status, bytes, content type) is the answer, or None for none."""

    def __init__(self, name: str) -> None:
        import http.server  # bench and the tests only: the shim never pays for it

        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                """Quiet: the callers keep what they need."""

            def do_GET(self) -> None:
                self.do_POST()

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                answer = api.respond(self.path, dict(self.headers), body)
                if answer is None:
                    self.close_connection = True
                    return
                status, reply, kind = answer
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name=name, daemon=True).start()

    def respond(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, bytes, str] | None:
        raise NotImplementedError

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ModelApi(LoopbackApi):
    """Anthropic's Messages API stood in on loopback for a real Claude Code: it keeps every request
    body (what the model would read) and when it came, and answers each with one streamed word, so
    `claude -p` ends, or with the content block ``answer`` scripts for it (a tool call)."""

    def __init__(self, answer: Answer | None = None) -> None:
        self.answer = answer or (lambda body: None)
        self.requests: list[dict[str, Any]] = []
        self.arrived: list[float] = []  #: time.monotonic() of each request, in order
        self.came = threading.Condition()
        super().__init__("model-api")

    def respond(self, path: str, headers: dict[str, str], body: Any) -> tuple[int, bytes, str]:
        """Keep the request and when it came, then answer it."""
        with self.came:
            self.requests.append(body)
            self.arrived.append(time.monotonic())
            self.came.notify_all()
        return 200, *self.reply(path, body)

    def wait(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> tuple[dict[str, Any], float] | None:
        """The first request that ``predicate`` holds for and when it came, waiting up to ``timeout``."""
        def found() -> tuple[dict[str, Any], float] | None:
            return next(((r, t) for r, t in zip(self.requests, self.arrived, strict=True) if predicate(r)), None)

        with self.came:
            self.came.wait_for(lambda: found() is not None, timeout)
            return found()

    def reply(self, path: str, body: dict[str, Any]) -> tuple[bytes, str]:
        """The answer to one request: a token count, or an assistant message saying "ok" or making the
        scripted tool call."""
        if "count_tokens" in path or "messages" not in body:
            return b'{"input_tokens": 1}', "application/json"
        return assistant_message(body, [self.answer(body) or {"type": "text", "text": "ok"}])


def assistant_message(request: dict[str, Any], blocks: list[dict[str, Any]]) -> tuple[bytes, str]:
    """An assistant message with ``blocks`` as Anthropic's API sends it: server-sent events when the
    request asks to stream, else one JSON object; it stops for a tool call if it makes one."""
    stop = "tool_use" if any(block["type"] == "tool_use" for block in blocks) else "end_turn"
    message = {"id": "msg_" + new_id(), "type": "message", "role": "assistant", "model": request.get("model", ""),
               "content": [], "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}}
    if not request.get("stream"):
        return json.dumps({**message, "content": blocks, "stop_reason": stop}).encode(), "application/json"
    events: list[dict[str, Any]] = [{"type": "message_start", "message": message}]
    for index, block in enumerate(blocks):
        start, delta = (({**block, "input": {}}, {"type": "input_json_delta", "partial_json": json.dumps(block["input"])})
                        if block["type"] == "tool_use" else
                        ({"type": "text", "text": ""}, {"type": "text_delta", "text": block["text"]}))
        events += [{"type": "content_block_start", "index": index, "content_block": start},
                   {"type": "content_block_delta", "index": index, "delta": delta},
                   {"type": "content_block_stop", "index": index}]
    events += [{"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                "usage": {"output_tokens": 1}},
               {"type": "message_stop"}]
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events), "text/event-stream"


def register_with_claude(claude: str, env: dict[str, str], entry: dict[str, Any]) -> None:
    """Register claude-peers in the home ``env`` names, through `claude mcp add-json` as docs/sessions.md says."""
    added = subprocess.run([claude, "mcp", "add-json", "--scope", "user", SERVER_NAME, json.dumps(entry)], env=env,
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60, check=False)
    if added.returncode:
        raise UserError(f"{claude} mcp add-json failed: {(added.stderr or added.stdout).strip()[:300]}")


def claude_first_request(claude: str, env: dict[str, str], home: Path, entry: dict[str, Any],
                         options: tuple[str, ...] = ()) -> dict[str, Any]:
    """The first model request of `claude [options] -p` in ``home``, where claude-peers is registered
    with ``entry`` (through `claude mcp add-json`, as docs/sessions.md says), its API a local ModelApi."""
    env = {**env, "HOME": str(home), "ANTHROPIC_API_KEY": "sk-ant-offline",
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"}
    register_with_claude(claude, env, entry)
    api = ModelApi()
    try:
        ran = subprocess.run([claude, *options, "-p", "hello"], env={**env, "ANTHROPIC_BASE_URL": api.url}, cwd=home,
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False)
    finally:
        api.close()
    first = next((r for r in api.requests if r.get("tools")), None)
    if first is None:
        raise UserError(f"{claude} -p made no model request: {(ran.stderr or ran.stdout).strip()[:300]}")
    return first


class InteractiveClaude:
    """A plain interactive `claude` (no channel flag, no wrapper) on a pseudo-terminal, as a user starts
    it: in a home where onboarding is done, its directory trusted, its API key approved and claude-peers'
    tools allowed, claude-peers registered with ``entry``, its model the ModelApi at ``api_url``, and
    its session inbox in a runtime directory of its own (short: a socket path has at most 103 bytes)."""

    KEY = "sk-ant-offline-0123456789abcdefghij"

    def __init__(self, claude: str, env: dict[str, str], home: Path, entry: dict[str, Any], api_url: str,
                 settings: dict[str, Any] | None = None, args: tuple[str, ...] = ()) -> None:
        self.cwd, self.runtime = home / "project", Path(tempfile.mkdtemp(prefix="cc-run-"))
        for folder in (self.cwd, home / ".claude"):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        (home / ".claude.json").write_text(json.dumps({
            "hasCompletedOnboarding": True, "theme": "dark", "bypassPermissionsModeAccepted": True,
            "customApiKeyResponses": {"approved": [self.KEY[-20:]], "rejected": []},
            "projects": {str(self.cwd): {"hasTrustDialogAccepted": True, "hasCompletedProjectOnboarding": True}}}))
        (home / ".claude" / "settings.json").write_text(json.dumps(
            {"permissions": {"allow": [f"mcp__{SERVER_NAME}"]}, **(settings or {})}))
        env = {**env, "HOME": str(home), "ANTHROPIC_API_KEY": self.KEY, "ANTHROPIC_BASE_URL": api_url,
               "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "XDG_RUNTIME_DIR": str(self.runtime),
               "TERM": "xterm-256color"}
        register_with_claude(claude, env, entry)
        self.master, terminal = os.openpty()
        try:
            self.proc = subprocess.Popen([claude, *args], stdin=terminal, stdout=terminal, stderr=terminal, cwd=self.cwd,
                                         env=env, start_new_session=True)
        finally:
            os.close(terminal)
        self.screen = collections.deque(maxlen=64)  #: the terminal's last output chunks (for errors)
        threading.Thread(target=self._drain, name="claude-tty", daemon=True).start()

    def _drain(self) -> None:
        """Read the terminal, so Claude Code never blocks writing it."""
        with contextlib.suppress(OSError):
            while chunk := os.read(self.master, 65536):
                self.screen.append(chunk)

    @property
    def inbox(self) -> Path:
        """Where Claude Code binds this session's inbox (named after its pid, in the runtime directory)."""
        return self.runtime / "cc-socks" / f"{self.proc.pid}.sock"

    def close(self) -> None:
        end_process(self.proc)
        os.close(self.master)
        shutil.rmtree(self.runtime, ignore_errors=True)


