"""claude-peers bench: this hub's figures, side by side with the anchor's, measured on this machine.

One driver measures ours and, with --anchor, the original claude-peers-mcp (Bun) from a
checkout: the same sessions, the same texts, the same clocks, each side receiving as its own
shim does. Every run starts a fresh broker (neither meets the other's history), and the
runs of each figure alternate between the two (ours, anchor, ours, anchor...), so a warmer or
busier machine favours neither. Every text a run sends is unique: each phase checks that
each one arrived exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import claude_peers
from bench.harness import (
    BrokerHarness,
    InteractiveClaude,
    ModelApi,
    claude_first_request,
    end_process,
    free_port,
)
from claude_peers import (
    CHANNEL_METHOD,
    CLAUDE_CODE_CLIENT,
    INBOX_SETTLE_S,
    JSON_SAFE_INT,
    MEMORY_CLIPPED,
    SERVER_NAME,
    TOOLS,
    ApiError,
    BrokerClient,
    BrokerUnreachable,
    Config,
    Store,
    UserError,
    __version__,
    git_output,
    mcp_registration,
    module_command,
    new_id,
    post_to_inbox,
    raise_fd_limit,
    repo_identity,
)

T = TypeVar("T")

ANCHOR_POLL_S = 1.0  # the anchor's shim polls its broker once a second (server.ts, POLL_INTERVAL_MS)
DELIVERY_DEADLINE_S = 120.0  # how long a run waits for its last message
LATENCY_GAP_S = 0.02  # latency samples go out this far apart, round-robin: the sessions stay idle
HTTP_CONNECTIONS = 8


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))]


def proc_mb(pid: int, name: str, field: str) -> float:
    """A kB field of /proc/PID/<name>, in MB (0 when the process is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def rss_mb(pid: int) -> float:
    return proc_mb(pid, "status", "VmRSS")


def pss_mb(pid: int) -> float:
    """Proportional set size: each shared page counted in shares, so what N processes cost adds up."""
    return proc_mb(pid, "smaps_rollup", "Pss")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU a process has used so far, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tally(expected: Iterable[str], arrived: collections.Counter[str]) -> tuple[int, int]:
    """(lost, duplicated): texts sent that never arrived, and extra copies of those that did."""
    counts = [arrived[text] for text in expected]
    return sum(1 for n in counts if n == 0), sum(n - 1 for n in counts if n > 1)


class BenchPeer:
    """A session of ours on an HTTP connection of its own, receiving as the shim does: a
    long-poll that acknowledges the previous batch."""

    def __init__(self, broker: BenchBroker, identity: tuple[str, str] | None = None) -> None:
        self.broker = broker
        self.client = BrokerClient(broker.url, broker.token, 60)
        if identity is None:
            self.client.register({"machine": "bench", "pid": os.getpid(), "cwd": "/bench", "client": "bench"})
        else:
            self.client.session_id, self.client.session_secret = identity
        self.address: str = self.client.session_id or ""
        self.delivered: list[str] = []  #: ids of the last batch received: the next poll acknowledges them

    def twin(self) -> BenchPeer:
        """The same session on a connection of its own (for another thread or process)."""
        return BenchPeer(self.broker, (self.address, self.client.session_secret or ""))

    def send(self, to: str, text: str) -> None:
        self.client.session_call("POST", "/send", {"to": to, "text": text})

    def receive(self) -> list[str]:
        body = {"wait_s": 1, "max": 1000, "ack": self.delivered}
        messages = self.client.session_call("POST", "/poll", body)["messages"]
        self.delivered = [m["id"] for m in messages]
        return [m["text"] for m in messages]

    def finish(self) -> int:
        """Acknowledge the last batch (no poll follows it); the requests that took."""
        if self.delivered:
            self.client.session_call("POST", "/ack", {"ids": self.delivered, "state": "delivered"})
        return int(bool(self.delivered))


class AnchorPeer:
    """A peer of the anchor on an HTTP connection of its own, receiving as its shim does: a
    poll every ANCHOR_POLL_S, which marks whatever it returns delivered."""

    def __init__(self, url: str, address: str) -> None:
        self.url = url
        self.client = BrokerClient(url, "", 60)
        self.address = address
        self.next_poll = time.monotonic()

    def twin(self) -> AnchorPeer:
        return AnchorPeer(self.url, self.address)

    def send(self, to: str, text: str) -> None:
        answer = self.client.call("POST", "/send-message", {"from_id": self.address, "to_id": to, "text": text})
        if not answer.get("ok"):
            raise UserError(f"bench: the anchor refused a send: {answer.get('error')}")

    def receive(self) -> list[str]:
        self.next_poll += ANCHOR_POLL_S
        time.sleep(max(0.0, self.next_poll - time.monotonic()))
        return [m["text"] for m in self.client.call("POST", "/poll-messages", {"id": self.address})["messages"]]

    def finish(self) -> int:
        """Nothing to acknowledge: the anchor's poll marked everything it returned delivered."""
        return 0


class BenchMcpClient:
    """A plain JSON-RPC MCP client on a shim's stdio, one reader thread: it timestamps each
    channel notification the moment its line arrives, keyed by its text, with no client
    framework in between (the figure is the shim's, not a client library's)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: str, eof_stops: bool) -> None:
        self.name = name
        self.eof_stops = eof_stops  #: the shim exits when its stdin closes (else it needs SIGTERM)
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.arrivals: dict[str, list[float]] = {}  #: channel notification text -> when each copy came
        self.responses: dict[int, Any] = {}
        self.changed = threading.Condition()
        self.next_id = 0
        self.ready_at = 0.0  #: when `tools/list` was answered (0: not yet)
        threading.Thread(target=self._read, daemon=True).start()

    def _send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        self.proc.stdin.flush()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            at = time.perf_counter()
            message = json.loads(line)
            with self.changed:
                if message.get("method") == CHANNEL_METHOD:
                    self.arrivals.setdefault(message["params"]["content"], []).append(at)
                elif "id" in message:
                    self.responses[message["id"]] = message
                self.changed.notify_all()

    def request(self, method: str, params: dict[str, Any]) -> Any:
        self.next_id += 1
        rid = self.next_id
        self._send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        with self.changed:
            if not self.changed.wait_for(lambda: rid in self.responses, 60):
                raise UserError(f"bench: shim {self.name} did not answer {method} within 60 s")
            return self.responses.pop(rid).get("result")

    def handshake(self) -> None:
        """Open the server as Claude Code does: initialize, initialized, tools/list."""
        with contextlib.suppress(UserError, OSError):
            self.request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                        "clientInfo": {"name": "bench", "version": __version__}})
            self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
            self.request("tools/list", {})
            self.ready_at = time.perf_counter()

    def wait_arrival(self, text: str, timeout: float) -> float | None:
        """When the first notification carrying ``text`` arrived (None: not within ``timeout``)."""
        with self.changed:
            self.changed.wait_for(lambda: text in self.arrivals, max(0.0, timeout))
            return self.arrivals[text][0] if text in self.arrivals else None

    def stop(self) -> None:
        """Close the session as Claude Code does when it exits (the anchor's shim needs SIGTERM)."""
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        if not self.eof_stops:
            self.proc.terminate()



def stop_shims(clients: list[BenchMcpClient]) -> None:
    for client in clients:
        client.stop()
    for client in clients:
        end_process(client.proc, terminate=False)


class BenchBroker:
    """Our broker in a temp dir (a subprocess, from cached bytecode), and our shims on it."""

    label = "ours"

    def __init__(self, nats_toml: str = "embedded = false\n", prepare: Callable[[Path], None] | None = None) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="claude-peers-bench-")
        self.home = self.tmp.name
        if prepare is not None:
            prepare(Path(self.home))
        # no rate limit, no push cap, no reply-loop pause (its sessions write each other thousands of times a
        # minute): the figures are of delivery at full speed, not of the flood damping
        self.harness = BrokerHarness(Path(self.home), f"rate_per_s = 0.0\nreply_loop_limit = {JSON_SAFE_INT}\n"
                                     "[shim]\nmax_pushes_per_minute = 0", nats_toml)
        try:
            self.harness.start()
        except UserError:
            self.tmp.cleanup()
            raise
        self.env, self.url, self.token = self.harness.env, self.harness.url, self.harness.token
        self.proc = self.harness.proc
        self.pid = self.proc.pid

    def client(self) -> BrokerClient:
        return self.harness.client(timeout=60)

    def peer(self) -> BenchPeer:
        return BenchPeer(self)

    def shim(self, name: str, via: str | None = None, cwd: Path | None = None) -> BenchMcpClient:
        """A shim with agent name ``name``, on this broker or on the relay at ``via``, in ``cwd`` (its home)."""
        env = {**self.env, "CLAUDE_PEERS_URL": via} if via else self.env
        # it plays Claude Code with channels on: its shims push
        return BenchMcpClient(name, module_command("shim", "--name", name, "--mode", "push"), env,
                              str(cwd or self.home), eof_stops=True)

    def addresses(self, clients: list[BenchMcpClient]) -> list[str]:
        """What send_message takes for each shim (its agent name), once every one is registered."""
        names = [c.name for c in clients]
        deadline = time.monotonic() + 30
        while not set(names) <= {p["name"] for p in self.client().call("GET", "/api/peers")["peers"]}:
            if time.monotonic() > deadline:
                raise UserError("bench: our shims did not all register within 30 s")
            time.sleep(0.05)
        return names

    @staticmethod
    def send_arguments(to: str, text: str) -> dict[str, str]:
        return {"to": to, "text": text}

    def close(self) -> None:
        self.harness.stop()
        self.tmp.cleanup()


class AnchorBroker:
    """The anchor, claude-peers-mcp (Bun), from a checkout: its broker on a free port with its
    db in a temp dir, and its shims run as Claude Code runs them (``bun server.ts``)."""

    label = "anchor"

    def __init__(self, checkout: Path, bun: str) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="claude-peers-bench-anchor-")
        self.home = self.tmp.name
        self.checkout, self.bun = checkout, bun
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}  # else its shim asks OpenAI
        self.env.update(CLAUDE_PEERS_PORT=str(port), CLAUDE_PEERS_DB=str(Path(self.home) / "peers.db"),
                        PATH=f"{Path(bun).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        self.api = BrokerClient(self.url, "", 30)
        self.closing = threading.Event()  #: set at close: the threads lending their ids as peer pids end
        self.proc = subprocess.Popen([bun, str(checkout / "broker.ts")], env=self.env, cwd=self.home,
                                     stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(BrokerUnreachable, ApiError):
                BrokerClient(self.url, "", 1).call("GET", "/health")
                return
            time.sleep(0.05)
        self.close()
        raise UserError(f"bench: the anchor's broker ({checkout / 'broker.ts'}) did not start")

    def _live_pid(self) -> int:
        """A pid that stays alive until close: the anchor keys a peer by its pid and drops one
        whose pid is gone, so each peer the driver registers gets a thread of its own."""
        ids: list[int] = []
        lent = threading.Event()

        def lend() -> None:
            ids.append(threading.get_native_id())
            lent.set()
            self.closing.wait()

        threading.Thread(target=lend, daemon=True).start()
        lent.wait()
        return ids[0]

    def peer(self) -> AnchorPeer:
        info = {"pid": self._live_pid(), "cwd": "/bench", "git_root": None, "tty": None, "summary": ""}
        return AnchorPeer(self.url, self.api.call("POST", "/register", info)["id"])

    def shim(self, name: str, via: str | None = None) -> BenchMcpClient:
        """Its shim, on this broker or on the relay at ``via`` (its shims only take a port)."""
        env = {**self.env, "CLAUDE_PEERS_PORT": str(urllib.parse.urlsplit(via).port)} if via else self.env
        return BenchMcpClient(name, [self.bun, str(self.checkout / "server.ts")], env, self.home, eof_stops=False)

    def addresses(self, clients: list[BenchMcpClient]) -> list[str]:
        """What its send_message takes for each shim: the peer id it registered under its pid."""
        deadline = time.monotonic() + 30
        while True:
            peers = self.api.call("POST", "/list-peers", {"scope": "machine", "cwd": self.home, "git_root": None})
            ids = {p["pid"]: p["id"] for p in peers}
            if all(c.proc.pid in ids for c in clients):
                return [ids[c.proc.pid] for c in clients]
            if time.monotonic() > deadline:
                raise UserError("bench: the anchor's shims did not all register within 30 s")
            time.sleep(0.05)

    @staticmethod
    def send_arguments(to: str, text: str) -> dict[str, str]:
        return {"to_id": to, "message": text}

    def close(self) -> None:
        self.closing.set()
        end_process(self.proc)
        self.tmp.cleanup()


BenchSystem = BenchBroker | AnchorBroker
Systems = list[tuple[str, Callable[[], BenchSystem]]]


def interleaved(systems: Systems, runs: int, measure: Callable[[BenchSystem], T]) -> dict[str, list[T]]:
    """``measure`` on a fresh broker of each system in turn, ``runs`` times: ours, anchor, ours..."""
    results: dict[str, list[T]] = {label: [] for label, _ in systems}
    for _ in range(runs):
        for label, start in systems:
            broker = start()
            try:
                results[label].append(measure(broker))
            finally:
                broker.close()
    return results


def _bench_senders(peers: list[Any], receivers: list[str], count: int, start: Any, stop: Any = None,
                   counter: Any = None) -> None:
    """A sender process: one thread and connection per peer, cycling over the receivers; each
    sends ``count`` texts ``bench <its address> <i>`` (0: until ``stop``), counted in ``counter``."""
    def pump(peer: BenchPeer | AnchorPeer) -> None:
        peer = peer.twin()
        i = 0
        while i < count if count else not stop.is_set():
            peer.send(receivers[i % len(receivers)], f"bench {peer.address} {i}")
            i += 1
            if counter is not None:
                with counter.get_lock():
                    counter.value += 1

    threads = [threading.Thread(target=pump, args=(peer,)) for peer in peers]
    start.wait()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class Delivery(NamedTuple):
    """A throughput run: its rate, the broker's CPU per message, and where every text went."""
    rate: float
    cpu_ms: float  # broker CPU per message, from the first send to the last delivery
    sent: int
    lost: int  # not delivered within DELIVERY_DEADLINE_S
    duplicated: int
    requests: float = 0.0  # broker requests per delivered message (HTTP path: every one the driver made)


def bench_delivery_rate(system: BenchSystem, connections: int, per_connection: int,
                        receive: bool = True) -> Delivery:
    """Messages/s through ``connections`` senders (spread over two processes, so the driver's
    GIL is not what is measured), each cycling over as many receivers that take mail as the
    system's shim does (``receive``), or that stay idle (then it is the rate of committed
    sends). Receivers take mail until every text sent arrived or the deadline passed; the rate
    runs to the last delivery."""
    import multiprocessing

    senders = [system.peer() for _ in range(connections)]
    receivers = [system.peer() for _ in range(connections)]
    expected = [f"bench {s.address} {i}" for s in senders for i in range(per_connection)]
    arrived: collections.Counter[str] = collections.Counter()
    last = [0.0]
    everything = threading.Event()
    lock = threading.Lock()
    deadline = time.monotonic() + DELIVERY_DEADLINE_S

    requests = [len(expected)]  # a request per send, then each receiver's polls and its last acknowledgement

    def receive_all(receiver: BenchPeer | AnchorPeer) -> None:
        polls = 0
        while not everything.is_set() and time.monotonic() < deadline:
            texts = receiver.receive()
            polls += 1
            with lock:
                arrived.update(texts)
                if texts:
                    last[0] = time.perf_counter()
                if arrived.total() >= len(expected):
                    everything.set()
        polls += receiver.finish()
        with lock:
            requests[0] += polls

    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    targets = [r.address for r in receivers]
    procs = [ctx.Process(target=_bench_senders, args=(senders[i::2], targets, per_connection, start))
             for i in range(2)]
    for proc in procs:
        proc.start()
    threads = [threading.Thread(target=receive_all, args=(r,)) for r in receivers] if receive else []
    for thread in threads:
        thread.start()
    cpu = cpu_seconds(system.pid)
    began = time.perf_counter()
    start.set()
    for proc in procs:
        proc.join()
    sends_done = time.perf_counter()
    for thread in threads:
        thread.join()
    cpu_ms = (cpu_seconds(system.pid) - cpu) * 1000 / len(expected)
    if not receive:
        return Delivery(len(expected) / (sends_done - began), cpu_ms, len(expected), 0, 0)
    lost, duplicated = tally(expected, arrived)
    return Delivery(arrived.total() / ((last[0] or sends_done) - began), cpu_ms, len(expected), lost, duplicated,
                    requests[0] / max(1, len(expected) - lost))


def spawn_shims(system: BenchSystem, count: int, via: str | None = None) -> tuple[list[BenchMcpClient], float]:
    """``count`` shims spawned at once and opened as Claude Code opens them; returns them and
    the seconds from the first spawn to the last `tools/list` answered."""
    began = time.perf_counter()
    clients = [system.shim(f"bench-{i}", via) for i in range(count)]
    threads = [threading.Thread(target=c.handshake) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if not all(c.ready_at for c in clients):
        stop_shims(clients)
        raise UserError(f"bench: a shim of {system.label} did not answer tools/list")
    return clients, max(c.ready_at for c in clients) - began


def spawn_one(system: BenchSystem, times: int = 3) -> float:
    """The median of ``times`` shims spawned one after another, each alone."""
    spawns = []
    for _ in range(times):
        clients, seconds = spawn_shims(system, 1)
        stop_shims(clients)
        spawns.append(seconds)
    return statistics.median(spawns)


class Sample(NamedTuple):
    """Send -> channel notification latencies (ms) of a batch of texts, and what came of them."""
    latencies: list[float]
    sent: int
    lost: int
    duplicated: int


def bench_latency(system: BenchSystem, clients: list[BenchMcpClient], addresses: list[str], samples: int,
                  tag: str) -> Sample:
    """Texts sent over HTTP LATENCY_GAP_S apart, round-robin over the shims, each timed from
    its send to its channel notification."""
    sender = system.peer()
    sent = []
    began = time.perf_counter()
    for k in range(samples):
        time.sleep(max(0.0, began + k * LATENCY_GAP_S - time.perf_counter()))
        at = time.perf_counter()
        sender.send(addresses[k % len(clients)], f"latency {tag} {k}")
        sent.append((clients[k % len(clients)], f"latency {tag} {k}", at))
    deadline = time.monotonic() + 30
    arrivals = [(client.wait_arrival(text, deadline - time.monotonic()), at) for client, text, at in sent]
    out = [(arrival - at) * 1000 for arrival, at in arrivals if arrival is not None]
    copies = sum(len(client.arrivals.get(text, ())) for client, text, _ in sent)
    return Sample(out, len(sent), len(sent) - len(out), copies - len(out))


class BenchLoad:
    """Background senders keeping a broker busy: a forked process, 8 connections, one sink."""

    def __init__(self, system: BenchSystem) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        self.stop_flag = ctx.Event()
        self.counter = ctx.Value("i", 0)
        senders = [system.peer() for _ in range(HTTP_CONNECTIONS)]
        sink = system.peer()
        started = ctx.Event()
        started.set()
        self.proc = ctx.Process(target=_bench_senders, args=(senders, [sink.address], 0, started, self.stop_flag,
                                                             self.counter))
        self.proc.start()
        deadline = time.monotonic() + 10
        while self.counter.value < 100 and time.monotonic() < deadline:  # under way
            time.sleep(0.01)

    def stop(self) -> int:
        self.stop_flag.set()
        self.proc.join(30)
        return self.counter.value


def bench_tool_sends(system: BenchSystem, clients: list[BenchMcpClient], addresses: list[str],
                     per_session: int) -> Delivery:
    """Every shim sends ``per_session`` texts to the next one through its send tool, all at
    once; the rate runs from the first call to the last channel notification."""
    count = len(clients)
    failed = [0]

    def pump(i: int) -> None:
        for k in range(per_session):
            arguments = system.send_arguments(addresses[(i + 1) % count], f"tool {i} {k}")
            result = clients[i].request("tools/call", {"name": "send_message", "arguments": arguments})
            failed[0] += bool(result is None or result.get("isError"))

    expected = [(clients[(i + 1) % count], f"tool {i} {k}") for i in range(count) for k in range(per_session)]
    cpu = cpu_seconds(system.pid)
    began = time.perf_counter()
    threads = [threading.Thread(target=pump, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + DELIVERY_DEADLINE_S
    arrivals = [client.wait_arrival(text, deadline - time.monotonic()) for client, text in expected]
    cpu_ms = (cpu_seconds(system.pid) - cpu) * 1000 / len(expected)
    delivered = [at for at in arrivals if at is not None]
    copies = sum(len(client.arrivals.get(text, ())) for client, text in expected)
    rate = len(delivered) / (max(delivered) - began) if delivered else 0.0
    return Delivery(rate, cpu_ms, len(expected), len(expected) - len(delivered), copies - len(delivered))


class ShimRound(NamedTuple):
    """One system's figures from one group of shims running at once."""
    spawn_s: float
    idle: Sample
    busy: Sample
    background: int  # sends that kept the broker busy meanwhile
    tools: Delivery
    rss_mb: float
    pss_mb: float
    broker_rss_mb: float


def bench_shim_round(system: BenchSystem, sessions: int, samples: int, messages: int) -> ShimRound:
    """``sessions`` shims spawned at once, then: latency while idle and while the broker is
    saturated, the send tool's throughput, and their memory with all of them running."""
    clients, spawn_s = spawn_shims(system, sessions)
    try:
        addresses = system.addresses(clients)
        idle = bench_latency(system, clients, addresses, samples, "idle")
        load = BenchLoad(system)
        try:
            busy = bench_latency(system, clients, addresses, samples, "busy")
        finally:
            background = load.stop()
        tools = bench_tool_sends(system, clients, addresses, max(1, messages // sessions))
        rss = statistics.mean(rss_mb(c.proc.pid) for c in clients)
        pss = statistics.mean(pss_mb(c.proc.pid) for c in clients)
        return ShimRound(spawn_s, idle, busy, background, tools, rss, pss, rss_mb(system.pid))
    finally:
        stop_shims(clients)


class RequestCounter:
    """A TCP relay in front of a broker that notes when each HTTP request goes through it, per
    connection, for the idle cost of the shims pointed at it (both systems speak HTTP/1.1)."""

    MARK = b" HTTP/1.1\r\n"  # ends every request line; JSON bodies cannot hold a raw CR LF

    def __init__(self, upstream: str) -> None:
        self.upstream = urllib.parse.urlsplit(upstream)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.requests: list[list[float]] = []  #: per client connection: when each request came through
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection((self.upstream.hostname, self.upstream.port))
            except OSError:
                return
            self.sockets += [client, upstream]
            self.requests.append([])
            threading.Thread(target=self._pump, args=(client, upstream, self.requests[-1]), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, requests: list[float] | None) -> None:
        tail = b""  # shorter than MARK: a mark split across two reads is counted once
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if requests is not None:
                    seen = tail + data
                    requests += [time.monotonic()] * seen.count(self.MARK)
                    tail = seen[-(len(self.MARK) - 1):]
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def count(self, since: float) -> int:
        """Requests since ``since`` (monotonic), every connection's."""
        return sum(1 for times in self.requests for t in times if t >= since)

    def rate(self, since: float) -> float:
        """Requests per second since ``since`` (monotonic): each connection's from its first
        request to its last. Shims started together poll in step, so a plain count in a window
        would move by a whole poll of every shim with where the window falls."""
        total = 0.0
        for times in self.requests:
            seen = [t for t in times if t >= since]
            if len(seen) > 1 and seen[-1] > seen[0]:
                total += (len(seen) - 1) / (seen[-1] - seen[0])
        return total

    def close(self) -> None:
        self.server.close()
        for sock in self.sockets:
            sock.close()


def bench_relayed(systems: Systems, sessions: int, seconds: float,
                  per_session: int) -> tuple[dict[str, float], dict[str, Delivery]]:
    """What the shims ask of their broker, each system's group behind a relay that notes every
    request: per idle session per minute (every group idle side by side in one window), then
    per message delivered through the MCP send tool (``per_session`` sends by each shim)."""
    groups: list[tuple[str, BenchSystem, RequestCounter, list[BenchMcpClient]]] = []
    try:
        for label, start in systems:
            broker = start()
            relay = RequestCounter(broker.url)
            groups.append((label, broker, relay, []))
            groups[-1][3].extend(spawn_shims(broker, sessions, relay.url)[0])
            broker.addresses(groups[-1][3])
        time.sleep(min(2.0, seconds))  # registrations and first polls are over: from here on, idle traffic
        since = time.monotonic()
        time.sleep(seconds)
        idle = {label: relay.rate(since) * 60 / sessions for label, _, relay, _ in groups}
        per_message = {}
        for label, broker, relay, clients in groups:
            since = time.monotonic()
            tools = bench_tool_sends(broker, clients, broker.addresses(clients), per_session)
            per_message[label] = tools._replace(requests=relay.count(since) / max(1, tools.sent - tools.lost))
        return idle, per_message
    finally:
        for _, broker, relay, clients in groups:
            stop_shims(clients)
            relay.close()
            broker.close()


def bench_clones(folder: Path, count: int) -> list[Path]:
    """``count`` clones of one repository of ``count`` files (f0.txt, ...), as on so many machines."""
    seed = folder / "seed"
    seed.mkdir(parents=True)
    for i in range(count):
        (seed / f"f{i}.txt").write_text("first\n")
    steps = [(seed, "init", "-q"), (seed, "add", "."),
             (seed, "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "first"),
             *((folder, "clone", "-q", str(seed), str(folder / f"clone-{i}")) for i in range(count))]
    for cwd, *args in steps:
        if git_output(cwd, *args) is None:
            raise UserError(f"bench: git {args[0]} failed in {cwd} (is git installed?)")
    return [folder / f"clone-{i}" for i in range(count)]


def keep_editing(clones: list[Path], stop: threading.Event) -> None:
    """Each clone's own file and the next clone's, rewritten twice a second until ``stop``."""
    edits = 0
    while not stop.wait(0.5):
        for i, clone in enumerate(clones):
            for name in (f"f{i}.txt", f"f{(i + 1) % len(clones)}.txt"):
                (clone / name).write_text(f"edit {edits}\n")
        edits += 1


def bench_editing(sessions: int, seconds: float) -> float:
    """Broker requests per session per minute while each session keeps editing two files of its clone
    of one repository, one of them also the next session's: counted once every session was told of
    its overlaps (telling wakes a poll once), so what it counts is the reports riding on the polls."""
    broker = BenchBroker()
    relay = RequestCounter(broker.url)
    clients: list[BenchMcpClient] = []
    stop = threading.Event()
    try:
        clones = bench_clones(Path(broker.home) / "repo", sessions)
        clients = [broker.shim(f"bench-{i}", relay.url, clone) for i, clone in enumerate(clones)]
        for client in clients:
            client.handshake()
        broker.addresses(clients)
        threading.Thread(target=keep_editing, args=(clones, stop), daemon=True).start()
        cfg = Config({}, None)
        deadline = time.monotonic() + 3 * (cfg.shim.changes_every_s + cfg.broker.poll_wait_s)
        while not all(client.arrivals for client in clients):
            if time.monotonic() > deadline:
                raise UserError("bench: the editing sessions were not told of their overlaps in time")
            time.sleep(0.1)
        since = time.monotonic()
        time.sleep(seconds)
        return relay.rate(since) * 60 / sessions
    finally:
        stop.set()
        stop_shims(clients)
        relay.close()
        broker.close()


async def bench_many_sessions(broker: BenchBroker, sessions: int) -> float:
    """Broker RSS (MB) with ``sessions`` registered, each with a long-poll parked."""
    writers = []
    for _ in range(sessions):
        peer = broker.peer()
        _, writer = await asyncio.open_connection("127.0.0.1", urllib.parse.urlsplit(broker.url).port)
        body = json.dumps({"wait_s": 60}).encode()
        writer.write(f"POST /api/sessions/{peer.address}/poll HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {broker.token}\r\nX-Session-Secret: {peer.client.session_secret}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        writers.append(writer)
        peer.client.close()
    await asyncio.sleep(1.0)
    rss = rss_mb(broker.pid)
    for writer in writers:
        writer.close()
    return rss


def bench_relay(events: int) -> tuple[float | None, int]:
    """Events/s the relay moves from a full outbox into JetStream (embedded nats-server),
    timed from its connection (None: all were moved before a second look)."""
    def fill(home: Path) -> None:
        cfg = Config({}, None)
        store = Store(home / "broker.db", cfg)
        with store.tx() as c:
            for i in range(events):
                store.event(c, "message.sent", "fleet.message.sent", message_id=f"{i:012x}", bytes=64)
        store.close()

    broker = BenchBroker(f'embedded = true\nlisten = "127.0.0.1:{free_port()}"\n', prepare=fill)
    try:
        client = broker.client()
        first = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            nats = client.call("GET", "/api/status")["nats"]
            if first is None and nats["connected"]:
                first = (time.perf_counter(), nats["published"])
            if first is not None and nats["backlog"] == 0:
                moved = nats["published"] - first[1]
                return (moved / (time.perf_counter() - first[0]) if moved else None), nats["published"]
            time.sleep(0.01)
        return 0.0, 0
    finally:
        broker.close()


class Target(NamedTuple):
    """What a figure must reach: ``op`` (<= or >=) ``bound``, times the anchor's if ``relative``."""
    op: str
    bound: float
    relative: bool = False

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}" + (" x anchor" if self.relative else "")

    def met(self, ours: float, anchor: float | None) -> bool | None:
        if self.relative and not anchor:
            return None
        value = ours / anchor if self.relative and anchor else ours
        return value <= self.bound if self.op == "<=" else value >= self.bound


class BenchReport:
    """Prints each figure for every system measured, the ratio ours/anchor and the target met
    or missed; keeps count of misses, and of messages lost or duplicated anywhere."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.missed: list[str] = []
        self.faults: list[str] = []  #: ours lost or duplicated a message somewhere
        columns = "".join(f"{label:>10}" for label in labels) + ("  ours/anchor" if len(labels) > 1 else "")
        print(f"{'figure':<62}{columns}  target")

    def figure(self, name: str, values: dict[str, float | None], fmt: str = "{:.0f}",
               target: Target | None = None) -> None:
        ours, anchor = values["ours"], values.get("anchor")
        cells = "".join(f"{fmt.format(values.get(label)) if values.get(label) is not None else '-':>10}"
                        for label in self.labels)
        if len(self.labels) > 1:
            cells += f"{ours / anchor:>13.2f}" if ours is not None and anchor else f"{'-':>13}"
        verdict = ""
        if target is not None and ours is not None:
            met = target.met(ours, anchor)
            verdict = f"  {target} {'ok' if met else 'MISSED' if met is False else '(needs --anchor)'}"
            if met is False:
                self.missed.append(name)
        print(f"{name:<62}{cells}{verdict}")

    def delivery(self, phase: str, runs: dict[str, list[Delivery | Sample]]) -> None:
        """Every text sent in a phase, per system: how many, lost, shown twice."""
        parts = []
        for label in self.labels:
            sent, lost, duplicated = (sum(getattr(run, key) for run in runs[label])
                                      for key in ("sent", "lost", "duplicated"))
            parts.append(f"{label} {sent} sent, {lost} lost, {duplicated} duplicated")
            if label == "ours" and (lost or duplicated):
                self.faults.append(f"{phase}: {lost} lost, {duplicated} duplicated")
        print(f"  delivery check, {phase}: " + "; ".join(parts))

    def summary(self) -> None:
        print(f"targets missed: {', '.join(self.missed) if self.missed else 'none'}")
        print(f"messages lost or duplicated by ours: {'; '.join(self.faults) if self.faults else 'none'}")


def medians(runs: dict[str, list[T]], value: Callable[[T], float]) -> dict[str, float | None]:
    return {label: statistics.median(value(r) for r in results) if results else None
            for label, results in runs.items()}


def bench_http_path(systems: Systems, args: argparse.Namespace, report: BenchReport) -> None:
    """Committed sends and delivered messages through HTTP senders, both systems interleaved."""
    per_connection = max(1, args.messages // HTTP_CONNECTIONS)
    sends = interleaved(systems, args.rounds,
                        lambda b: bench_delivery_rate(b, HTTP_CONNECTIONS, per_connection, receive=False))
    report.figure(f"send requests/s, {HTTP_CONNECTIONS} HTTP connections", medians(sends, lambda r: r.rate))
    runs = interleaved(systems, args.rounds, lambda b: bench_delivery_rate(b, HTTP_CONNECTIONS, per_connection))
    report.figure(f"delivered messages/s, senders on {HTTP_CONNECTIONS} HTTP connections",
                  medians(runs, lambda r: r.rate), target=Target(">=", 1.3, relative=True))
    report.figure("broker CPU per delivered message, HTTP path (ms)", medians(runs, lambda r: r.cpu_ms), "{:.3f}",
                  Target("<=", 1.0, relative=True))
    report.figure("broker requests per delivered message, HTTP path", medians(runs, lambda r: r.requests), "{:.2f}",
                  Target("<=", 2.1))
    report.delivery("HTTP path", runs)


def pooled(rounds: dict[str, list[ShimRound]], which: str, pct: float) -> dict[str, float | None]:
    """A percentile of every latency sample of every round, per system."""
    return {label: percentile([ms for r in runs for ms in getattr(r, which).latencies], pct)
            if any(getattr(r, which).latencies for r in runs) else None for label, runs in rounds.items()}


def bench_shim_figures(systems: Systems, args: argparse.Namespace, report: BenchReport) -> None:
    """The figures that need real shims, driven as Claude Code drives them."""
    count = args.sessions
    one = interleaved(systems, args.rounds, spawn_one)
    report.figure("one session spawned -> tools/list answered (ms)", medians(one, lambda s: s * 1000),
                  target=Target("<=", 200))
    samples = max(1, args.samples // args.rounds)
    rounds = interleaved(systems, args.rounds, lambda b: bench_shim_round(b, count, samples, args.messages // 4))
    report.figure(f"{count} sessions spawned at once -> all tools/list answered (s)",
                  medians(rounds, lambda r: r.spawn_s), "{:.2f}", Target("<=", 2.5))
    for which, name, p50, p99 in (("idle", f"{count} idle sessions", 5, 25), ("busy", "broker saturated", 50, 200)):
        report.figure(f"send -> channel notification, {name}, p50 (ms)", pooled(rounds, which, 50), "{:.1f}",
                      Target("<=", p50))
        report.figure(f"send -> channel notification, {name}, p99 (ms)", pooled(rounds, which, 99), "{:.1f}",
                      Target("<=", p99))
    report.figure("  (sends that saturated the broker meanwhile)", medians(rounds, lambda r: r.background))
    report.figure(f"delivered messages/s, {count} sessions through the MCP send tool",
                  medians(rounds, lambda r: r.tools.rate), target=Target(">=", 1.3, relative=True))
    report.figure("broker CPU per delivered message, MCP path (ms)", medians(rounds, lambda r: r.tools.cpu_ms),
                  "{:.3f}", Target("<=", 1.0, relative=True))
    report.figure(f"shim RSS with {count} running (MB)", medians(rounds, lambda r: r.rss_mb), "{:.1f}",
                  Target("<=", 30))
    report.figure(f"shim PSS with {count} running (MB)", medians(rounds, lambda r: r.pss_mb), "{:.1f}",
                  Target("<=", 20))
    report.figure(f"broker RSS with {count} sessions (MB)", medians(rounds, lambda r: r.broker_rss_mb), "{:.1f}",
                  Target("<=", 60))
    report.delivery("latency, idle and saturated",
                    {label: [s for r in runs for s in (r.idle, r.busy)] for label, runs in rounds.items()})
    report.delivery("MCP path", {label: [r.tools for r in runs] for label, runs in rounds.items()})
    idle, per_message = bench_relayed(systems, count, args.idle_seconds, max(1, args.messages // 4 // count))
    report.figure(f"broker requests per idle session per minute ({args.idle_seconds:.0f} s)", idle, "{:.1f}",
                  Target("<=", 3))
    report.figure("broker requests per delivered message, MCP path (relayed)",
                  {label: run.requests for label, run in per_message.items()}, "{:.2f}", Target("<=", 2.1))
    report.delivery("MCP path behind a relay", {label: [run] for label, run in per_message.items()})
    report.figure(f"broker requests per editing session per minute ({args.idle_seconds:.0f} s)",
                  {"ours": bench_editing(count, args.idle_seconds)}, "{:.1f}", Target("<=", 4))


# -- the shim as Claude Code shows it to the model -------------------------------

CLAUDE_TEXT_LIMIT = 2048  # Claude Code 2.1.197 cuts server instructions and tool descriptions here (2.1.332: 4096)
CUT_MARK = "… [truncated]"  # what Claude Code puts where it cut
VIEW_PEERS = 16  # the fleet bench shows Claude Code: 16 live peers, and the memory fleet-memory wrote of them


class ShimView(NamedTuple):
    """claude-peers in one model request: its instructions as they arrived, and its tools."""
    instructions: str  #: from the heading Claude Code gives them to their end, or to CUT_MARK; '' if absent
    cut: bool  #: Claude Code cut them
    tools: list[dict[str, Any]]  #: ours, as the request's tool list carries them


def request_texts(body: dict[str, Any]) -> Iterator[str]:
    """Every text a Messages API request shows the model: the system blocks, then each message's."""
    system = body.get("system") or []
    yield from [system] if isinstance(system, str) else (b.get("text", "") for b in system)
    for message in body.get("messages", []):
        content = message.get("content")
        yield from [content] if isinstance(content, str) else (b.get("text", "") for b in content or [])


def shim_view(body: dict[str, Any], ending: str) -> ShimView:
    """Find claude-peers in a request: the instructions run from their heading to the regex ``ending``
    (their known last line), unless Claude Code cut them first."""
    tools = [t for t in body.get("tools", []) if t.get("name", "").startswith(f"mcp__{SERVER_NAME}__")]
    for text in request_texts(body):
        start = text.find(f"\n## {SERVER_NAME}\n")
        if start < 0:
            continue
        start += len(SERVER_NAME) + 5
        found, cut = re.compile(ending).search(text, start), text.find(CUT_MARK, start)
        if cut >= 0 and (found is None or cut < found.end()):
            return ShimView(text[start:cut + len(CUT_MARK)], True, tools)
        return ShimView(text[start:found.end()] if found else "", False, tools)
    return ShimView("", False, tools)


def instructions_ending(memory: str) -> str:
    """A regex for the last line of instructions that carry ``memory``: its clip note, or its own last line."""
    clipped = re.escape(MEMORY_CLIPPED).replace(r"\{kept\}", r"\d+").replace(r"\{total\}", r"\d+")
    return f"{clipped}|{re.escape(memory.strip().splitlines()[-1])}" if memory.strip() else clipped


def view_fleet(broker: BenchBroker) -> None:
    """The fleet a new session joins: VIEW_PEERS sessions at work, and what fleet-memory wrote of them."""
    for n in range(VIEW_PEERS):
        broker.client().register({"machine": f"host{n % 4}", "pid": os.getpid(), "cwd": f"/srv/project-{n}",
                                  "name": f"peer-{n}", "branch": "main", "client": CLAUDE_CODE_CLIENT,
                                  "summary": f"working on part {n} of the migration, tests first"})
    ran = subprocess.run(module_command("trigger", "fleet-memory", "--here"), env=broker.env, capture_output=True,
                         text=True, timeout=120, check=False)
    if ran.returncode:
        raise UserError(f"bench: fleet-memory did not run: {ran.stderr.strip()[-300:]}")


def bench_claude_view(report: BenchReport) -> None:
    """The shim's instructions and tool list in bytes, as the model receives them: from the request
    a real `claude -p` sends (claude on PATH), else from the shim's own initialize and tools/list."""
    broker = BenchBroker()
    try:
        view_fleet(broker)
        claude = shutil.which("claude")
        ending = instructions_ending(broker.client().call("GET", "/api/memory")["text"])
        if claude:
            with tempfile.TemporaryDirectory(prefix="claude-peers-bench-home-") as home:
                body = claude_first_request(claude, broker.env, Path(home), mcp_registration(
                    module_command("shim", "--name", "bench-view")))
            view = shim_view(body, ending)
            version = subprocess.run([claude, "--version"], capture_output=True, text=True, timeout=30,
                                     check=False).stdout.split(" ")[0]
            source = (f"from the request Claude Code {version} sent to a local model API: instructions"
                      f" {'cut' if view.cut else 'whole' if view.instructions else 'absent'},"
                      f" {len(view.tools)} of {len(TOOLS)} tools in its tool list")
        else:
            shim = BenchMcpClient("bench-view", module_command("shim", "--name", "bench-view"), broker.env,
                                  broker.home, eof_stops=True)
            try:
                answer = shim.request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                                     "clientInfo": {"name": CLAUDE_CODE_CLIENT, "version": "bench"}})
                view = ShimView(answer["instructions"], False, shim.request("tools/list", {})["tools"])
            finally:
                stop_shims([shim])
            source = "from the shim's own initialize and tools/list (no claude on PATH)"
    finally:
        broker.close()
    report.figure("shim instructions as the model receives them (bytes)",
                  {"ours": len(view.instructions.encode()) or None}, target=Target("<=", CLAUDE_TEXT_LIMIT))
    report.figure(f"shim tool list as the model receives it ({len(view.tools)} tools, bytes)",
                  {"ours": len(json.dumps(view.tools, separators=(",", ":")).encode()) or None})
    report.figure("  longest tool description (bytes)",
                  {"ours": max((len(t.get("description", "").encode()) for t in view.tools), default=None)},
                  target=Target("<=", CLAUDE_TEXT_LIMIT // 2))
    print(f"  ({source})")


def installed_hook_command(home: Path, env: dict[str, str]) -> str:
    """The hook command `hook install` writes for a launcher laid out as install.sh lays it out (a venv
    whose claude_peers.pth names this checkout, the module run with -P -m from its cached bytecode)."""
    import venv  # this figure only
    venv.EnvBuilder(symlinks=True, with_pip=False).create(home / "venv")
    site = subprocess.run([str(home / "venv/bin/python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    Path(site, "claude_peers.pth").write_text(f"{Path(claude_peers.__file__).resolve().parent}\n")
    launcher = home / "bin/claude-peers"
    launcher.parent.mkdir()
    launcher.write_text(f'#!/bin/sh\nexec {shlex.quote(str(home / "venv/bin/python"))} -P -m claude_peers "$@"\n')
    launcher.chmod(0o755)
    settings = {**env, "CLAUDE_CONFIG_DIR": str(home / "claude")}
    subprocess.run([str(launcher), "hook", "install", "--launcher", str(launcher)], env=settings,
                   capture_output=True, text=True, timeout=30, check=True)
    [group] = json.loads((home / "claude/settings.json").read_text())["hooks"]["PreToolUse"]
    return group["hooks"][0]["command"]


def bench_hook(samples: int) -> tuple[list[float], str]:
    """The PreToolUse hook as Claude Code runs the command `hook install` wrote (through a shell),
    ``samples`` times in a row on an Edit another machine's session claimed exclusively (so the
    claims come from the hook's cache, and from the broker when it is older than HOOK_CACHE_S):
    each run's wall time (ms), and what the first run that let it through said on stderr ('' if none did)."""
    broker = BenchBroker()
    try:
        repo = Path(broker.home) / "repo"
        (repo / "src").mkdir(parents=True)
        for argv in (["init", "-q"], ["remote", "add", "origin", "git@github.com:bench/claims.git"]):
            subprocess.run(["git", "-C", str(repo), *argv], check=True, capture_output=True, timeout=30)
        holder = broker.client()
        holder.register({"machine": "bench-elsewhere", "pid": os.getpid(), "cwd": str(repo), "name": "holder"})
        holder.session_call("POST", "/claims", {"repo": repo_identity(repo), "paths": ["src"], "exclusive": True})
        payload = json.dumps({"hook_event_name": "PreToolUse", "tool_name": "Edit", "cwd": str(repo),
                              "tool_input": {"file_path": str(repo / "src/app.py"), "old_string": "a",
                                             "new_string": "b"}})
        command = installed_hook_command(Path(broker.home), broker.env)
        times, leak, heard = [], "", time.monotonic()
        for _ in range(samples):
            if time.monotonic() - heard > 10:  # as the holder's shim polls: its session (and claim) stays live
                holder.session_call("GET", "")
                heard = time.monotonic()
            start = time.perf_counter()
            out = subprocess.run(["/bin/sh", "-c", command], input=payload, env=broker.env, cwd=repo,
                                 capture_output=True, text=True, timeout=30, check=False)
            times.append((time.perf_counter() - start) * 1000)
            if '"permissionDecision": "deny"' not in out.stdout:
                leak = leak or out.stderr.strip() or f"exit {out.returncode}, nothing on stderr"
        return times, leak
    finally:
        broker.close()


def report_hook(report: BenchReport, samples: int) -> bool:
    """The hook's p50 and p99 figures; False (and a FAULT line) if it let an Edit of a claimed file through."""
    times, leak = bench_hook(samples)
    report.figure("file-claims PreToolUse hook, one Edit checked, p50 (ms)", {"ours": percentile(times, 50),
                                                                              "anchor": None})
    report.figure("file-claims PreToolUse hook, one Edit checked, p99 (ms)", {"ours": percentile(times, 99),
                                                                              "anchor": None},
                  target=Target("<=", 100))
    if leak:
        print(f"  (FAULT: the hook let an Edit of a claimed file through: {leak[-300:]})")
    return not leak


def inbox_peer(broker: BenchBroker, session: InteractiveClaude, name: str) -> dict[str, Any] | None:
    """The session ``name`` once its shim registered (None if Claude Code exits or 90 s pass first)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and session.proc.poll() is None:
        peer = next((p for p in broker.client().call("GET", "/api/peers")["peers"] if p["name"] == name), None)
        if peer is not None:
            return peer
        time.sleep(0.05)
    return None


def time_inbox(broker: BenchBroker, session: InteractiveClaude, api: ModelApi, name: str,
               samples: int) -> dict[str, list[float]]:
    """Milliseconds from each post (the shim's own post_to_inbox) and each hub send to the model request
    that carries it, interleaved; a text no request carried within 30 s is not counted."""
    latencies: dict[str, list[float]] = {"post": [], "send": []}
    time.sleep(INBOX_SETTLE_S)  # as the shim waits before its first post
    for n in range(samples):
        for kind, latency in latencies.items():
            text = f"bench-{kind}-{n}-{new_id()}"
            start = time.monotonic()
            if kind == "post":
                asyncio.run(post_to_inbox(str(session.inbox), "", [text]))
            else:
                broker.client().call("POST", "/api/send", {"to": name, "text": text})
            found = api.wait(lambda body, text=text: text in json.dumps(body.get("messages", [])), 30)
            if found is not None:
                latency.append((found[1] - start) * 1000)
            while api.arrived and time.monotonic() - api.arrived[-1] < 0.5:  # idle again: no request for 0.5 s
                time.sleep(0.05)
    return latencies


def bench_inbox(report: BenchReport, claude: str | None, samples: int) -> None:
    """Post -> model request in a plain, idle, interactive `claude` whose shim is in inbox mode, and
    hub send -> model request through that shim; skipped, saying why, where that cannot run."""
    figure = "inbox: post -> model request, idle plain claude"
    if claude is None:
        print(f"{figure}: skipped (no claude on PATH; give one with --claude)")
        return
    version = subprocess.run([claude, "--version"], capture_output=True, text=True, timeout=30,
                             check=False).stdout.split(" ")[0]
    broker, api = BenchBroker(), ModelApi()
    try:
        with tempfile.TemporaryDirectory(prefix="claude-peers-bench-home-") as home:
            session = InteractiveClaude(claude, broker.env, Path(home), mcp_registration(
                module_command("shim", "--name", "bench-inbox")), api.url)
            try:
                peer = inbox_peer(broker, session, "bench-inbox")
                latencies = time_inbox(broker, session, api, "bench-inbox", samples) if peer and \
                    peer["mode"] == "inbox" else None
            finally:
                session.close()
    finally:
        api.close()
        broker.close()
    if latencies is None:
        why = f"its shim is {peer['mode']}: {peer['mode_reason']}" if peer else "its shim never registered"
        print(f"{figure}: skipped (Claude Code {version}: {why})")
        return
    for kind, label in (("post", "post"), ("send", "hub send (shim posting)")):
        values = latencies[kind]
        for pct, target in ((50, None), (99, Target("<=", 1000) if kind == "send" else None)):
            report.figure(f"inbox: {label} -> model request, p{pct} (ms)",
                          {"ours": percentile(values, pct) if values else None}, target=target)
    missed = ", ".join(f"{samples - len(values)} {kind}s" for kind, values in latencies.items() if len(values) < samples)
    print(f"  (Claude Code {version}, interactive on a pseudo-terminal, idle, its model a local stand-in;"
          f" {samples} of each{'; no model request within 30 s for ' + missed if missed else ''})")


def bench_systems(args: argparse.Namespace) -> Systems:
    """Ours, and the anchor when --anchor names a checkout of claude-peers-mcp with its packages."""
    systems: Systems = [("ours", BenchBroker)]
    if args.anchor is None:
        return systems
    checkout = Path(args.anchor).resolve()
    if not (checkout / "server.ts").is_file() or not (checkout / "broker.ts").is_file():
        raise UserError(f"--anchor {args.anchor}: not a checkout of claude-peers-mcp (no server.ts and broker.ts"
                        " there); clone it and give its directory")
    if not (checkout / "node_modules" / "@modelcontextprotocol" / "sdk").is_dir():
        raise UserError(f"--anchor {args.anchor}: its packages are not installed; run `bun install` there")
    bun = args.bun or shutil.which("bun")
    if not bun or not os.access(bun, os.X_OK):
        raise UserError(f"--bun: {'no executable ' + bun if bun else 'bun is not on PATH'};"
                        " give its path with --bun PATH (npm install bun puts it in node_modules/.bin)")
    systems.append(("anchor", lambda: AnchorBroker(checkout, bun)))
    return systems


def anchor_commit(checkout: str) -> str:
    """`` (commit abc1234)`` of the anchor's checkout, when git can tell."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "-C", checkout, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True)
        return f" (commit {out.stdout.strip()})"
    return ""


def run_bench(args: argparse.Namespace) -> bool:
    """Measure and print every figure; False if ours lost or duplicated a message."""
    raise_fd_limit()
    systems = bench_systems(args)
    if args.rounds < 1:
        raise UserError("--rounds: give 1 or more")
    claude_peers.cache_bytecode()
    print(f"claude-peers {__version__} bench on {socket.gethostname()} ({os.cpu_count()} cores)"
          + (f", side by side with the anchor at {args.anchor}{anchor_commit(args.anchor)}" if args.anchor else "")
          + f"; {args.rounds} run(s) per system and figure, interleaved, medians shown")
    report = BenchReport([label for label, _ in systems])
    if args.only == "hook":
        denied = report_hook(report, max(args.samples, 10))
        report.summary()
        return denied
    bench_http_path(systems, args, report)
    if args.sessions:
        bench_shim_figures(systems, args, report)
    many = BenchBroker()
    try:
        rss = asyncio.run(bench_many_sessions(many, 1000))
    finally:
        many.close()
    report.figure("broker RSS, 1000 sessions long-polling (MB)", {"ours": rss, "anchor": None}, "{:.1f}",
                  Target("<=", 150))
    bench_claude_view(report)
    denied = report_hook(report, max(args.samples, 10))
    if args.inbox_samples:
        bench_inbox(report, args.claude or shutil.which("claude"), args.inbox_samples)
    relayed, published = bench_relay(args.events)
    report.figure(f"events relayed to JetStream per second ({published} published)", {"ours": relayed, "anchor": None},
                  target=Target(">=", 5000))
    if relayed is None:
        print("  (too few events to time the relay: try --events 20000)")
    report.summary()
    return not report.faults and denied

