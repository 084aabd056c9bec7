"""Does a long paste block the gateway? `/health` latency while a huge chat is in flight.

Issue 15, item 9: with a 20 MB user message, `/health` took 4.3 s, because
work proportional to the message (redaction) ran on the event loop. Target:
`/health` p99 <= 50 ms while a 20 MB chat is in flight.

One run starts the instant fake upstream (bench/fake_upstream.py) and the
gateway (`memory-gateway serve`, default server, memory on with the same seeded
data as bench/overhead.py's memory-on target: 10k memories for the user, local
embedder, redaction on as by default, extraction inline). Then, per case:

- a sender (this script with `--sender`, its own process) sends chats with one
  user message of `size` MB (10**6 characters: a generated paste ending with a
  question about the seeded memories, new each time; a string, or with
  `--parts N` a list of N text parts and the question's) to the gateway as
  the bench user, one after another on one keep-alive connection, streamed or
  not, for the whole window: retrieval, injection, forwarding and recording
  all run (each row reports the chats' `X-Memory-Status` and how many had
  memories injected);
- meanwhile this process sends `GET /health` on its own keep-alive connection,
  one after another, paced every `--interval-ms`: a probe's latency counts from
  when it was due, so a probe that waited behind a stalled one reports the
  wait too (a closed loop would take one sample of a long stall and thousands
  of the time between: its p99 would hide what a random request meets).

The idle window (no chat) is the baseline; every case is measured against it
in the same run, round after round, because the machine is shared and noisy.
"x idle" is a case's p99 over the idle p99. After each case the run waits
until the extraction backlog is drained, so it does not run in the next window.
The exit status is 1 when any case's p99 is above `--target-ms`: it can be run
as a check.

    python bench/long_paste.py                          # 1 and 20 MB, both modes, 10 s each
    python bench/long_paste.py --rounds 2               # docs/benchmarks.md, "Long pastes"
    python bench/long_paste.py --sizes 20 --duration 5 --no-stream
    python bench/long_paste.py --sizes 20 --parts 4     # content as a list of text parts
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from load import pct, read_chunks, read_head
from overhead import USER, drain, seeded_data
from procs import PYTHON, Proc, start_fake_upstream, start_gateway

KEY = "sk-bench-not-a-real-key"
QUESTIONS = [
    "what do you remember about my sister and Paris?",
    "who is my colleague in Kyoto again?",
    "does my friend Bo still live in Lisbon?",
    "what does my cousin love, and where does she live?",
]
WORDS = [
    "error",
    "warning",
    "request",
    "response",
    "timeout",
    "retry",
    "user",
    "session",
    "token",
    "cache",
    "table",
    "index",
    "query",
    "vector",
    "memory",
    "gateway",
    "upstream",
    "stream",
    "chunk",
    "buffer",
    "socket",
    "thread",
    "worker",
    "process",
    "signal",
    "config",
    "value",
    "field",
    "record",
    "batch",
    "commit",
    "rollback",
    "lock",
    "the",
    "a",
    "of",
    "to",
    "in",
    "and",
    "is",
    "for",
    "on",
    "with",
    "as",
    "by",
    "at",
    "from",
    "that",
    "this",
    "it",
    "be",
    "are",
    "was",
]


# -- the chats ------------------------------------------------------------


def paste(chars: int, seed: int = 15) -> str:
    """`chars` characters of a plausible paste (log lines and prose with numbers,
    a thousand distinct lines cycled), cheap to build at 20 MB."""
    rng = random.Random(seed)
    lines = []
    for i in range(1000):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
        lines.append(f"2026-12-06T02:{i % 60:02d}:{rng.randint(0, 59):02d} [{i:04d}] {words}")
    out: list[str] = []
    size = 0
    i = 0
    while size < chars:
        line = lines[(i * 7919) % len(lines)]
        out.append(line)
        size += len(line) + 1
        i += 1
    return "\n".join(out)[:chars]


class Chats:
    """Chat bodies whose one user message is `size_mb` MB: the paste is
    encoded once; each body gets its own final question (a new search query).
    With `parts`, the message's content is a list: the paste in `parts` text
    parts, then the question in one more (as some clients send it)."""

    def __init__(self, size_mb: float, stream: bool, parts: int = 0) -> None:
        question = self.question(0)
        text = paste(max(0, int(size_mb * 1_000_000) - len(question)))
        if parts:
            step = -(-len(text) // parts)
            chunks = [
                {"type": "text", "text": text[k : k + step]} for k in range(0, len(text), step)
            ]
            # The list without its closing bracket, then the question's part.
            self._paste = msgspec.json.encode(chunks)[:-1] + b',{"type":"text","text":'
            self._end = b"}]}]}"
        else:
            # The opening quote and the escaped paste, without the closing quote.
            self._paste = msgspec.json.encode(text)[:-1]
            self._end = b"}]}"
        self._parts = parts
        self._head = (
            msgspec.json.encode(
                {
                    "model": "bench-model",
                    "stream": stream,
                    "messages": [{"role": "system", "content": "You are a helpful assistant."}],
                }
            )[:-2]
            + b',{"role":"user","content":'
        )

    @staticmethod
    def question(i: int) -> str:
        return f"\n\nQuestion {i:06d}: {QUESTIONS[i % len(QUESTIONS)]}"

    def request(self, port: int, i: int, headers: dict[str, str]) -> list[bytes]:
        """The i-th request, head and body, in parts: the paste is not copied."""
        question = msgspec.json.encode(self.question(i))
        body = [self._head, self._paste, question if self._parts else question[1:], self._end]
        lines = [
            "POST /v1/chat/completions HTTP/1.1",
            f"host: 127.0.0.1:{port}",
            "content-type: application/json",
            f"content-length: {sum(len(b) for b in body)}",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        return [("\r\n".join(lines) + "\r\n\r\n").encode(), *body]


async def chat(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: list[bytes]
) -> tuple[int, dict[str, str], float, bool]:
    """Send one chat, read its whole answer: status, headers, seconds, complete."""
    t0 = time.perf_counter()
    writer.writelines(req)
    await writer.drain()
    status, headers = await read_head(reader)
    data = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        async for data in read_chunks(reader):  # noqa: B007 (the last chunk is kept)
            pass
    else:
        data = await reader.readexactly(int(headers.get("content-length", "0")))
    streamed = "event-stream" in headers.get("content-type", "")
    ok = status == 200 and (b"[DONE]" in data or not streamed)
    return status, headers, time.perf_counter() - t0, ok


async def send(args: argparse.Namespace) -> dict[str, Any]:
    """The sender: one warm-up chat, then `GO` on stdout, then chats back to
    back until `duration` (plus a margin) has passed since `GO`."""
    chats = Chats(args.size, args.stream, args.parts)
    headers = {"authorization": f"Bearer {KEY}", "x-user-id": USER}
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port, limit=1 << 20)
    out: dict[str, Any] = {"latency_s": [], "statuses": {}, "memory": {}, "injected": 0}
    i = random.randrange(10**5)
    try:
        status, _, _, _ = await chat(reader, writer, chats.request(args.port, i, headers))
        if status != 200:
            raise RuntimeError(f"warm-up chat answered {status}")
        print("GO", flush=True)
        deadline = time.perf_counter() + args.duration + args.margin
        while time.perf_counter() < deadline:
            i += 1
            req = chats.request(args.port, i, headers)
            status, h, seconds, ok = await chat(reader, writer, req)
            out["statuses"][str(status)] = out["statuses"].get(str(status), 0) + 1
            memory = h.get("x-memory-status", "-")
            out["memory"][memory] = out["memory"].get(memory, 0) + 1
            out["injected"] += int(h.get("x-memory-injected", "0") or 0) > 0
            if ok:
                out["latency_s"].append(seconds)
    finally:
        writer.close()
    return out


def sender_command(port: int, size: float, stream: bool, duration: float, parts: int) -> list[str]:
    argv = [PYTHON, __file__, "--sender", "--port", str(port), "--size", str(size)]
    argv += ["--duration", str(duration), "--parts", str(parts)]
    return [*argv, "--stream"] if stream else argv


# -- the probes -----------------------------------------------------------


class Probe:
    """`GET /health` on one keep-alive connection, paced, latency from when each was due."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.request = f"GET /health HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\n".encode()
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.file = self.sock.makefile("rb")

    def once(self) -> None:
        self.sock.sendall(self.request)
        status = self.file.readline()
        if not status:
            # The server closed the idle connection (its keep-alive timeout).
            self.close()
            self._connect()
            self.sock.sendall(self.request)
            status = self.file.readline()
        length = 0
        close = False
        while (line := self.file.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection":
                close = value.strip().lower() == b"close"
        self.file.read(length)
        if b" 200 " not in status:
            raise RuntimeError(f"/health answered {status!r}")
        if close:
            self.close()
            self._connect()

    def run(self, seconds: float, interval: float) -> list[float]:
        """Latencies in seconds, each from when the probe was due."""
        # A fresh connection: the server may have closed one idle since the last window.
        self.close()
        self._connect()
        out = []
        start = time.perf_counter()
        due = start
        while due < start + seconds:
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            self.once()
            out.append(time.perf_counter() - due)
            due += interval
        return out

    def close(self) -> None:
        self.file.close()
        self.sock.close()


# -- the run --------------------------------------------------------------


def case_name(size: float, stream: bool, parts: int) -> str:
    name = f"{size:g} MB {'stream' if stream else 'non-stream'}"
    return f"{name}, {parts} parts" if parts else name


def measure(
    port: int, probe: Probe, size: float, stream: bool, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """One window: /health probed while a sender keeps chats of `size` MB in flight."""
    argv = sender_command(port, size, stream, args.duration, args.parts)
    err = (workdir / "sender.err").open("w")
    sender = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        assert sender.stdout is not None
        ready, _, _ = select.select([sender.stdout], [], [], 180)
        line = sender.stdout.readline() if ready else ""
        if line.strip() != "GO":
            sender.kill()
            sender.wait()
            raise RuntimeError(f"sender did not start: {(workdir / 'sender.err').read_text()}")
        lat = probe.run(args.duration, args.interval_ms / 1000)
        stdout, _ = sender.communicate(timeout=300)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
        err.close()
    if sender.returncode != 0:
        raise RuntimeError(f"sender failed: {(workdir / 'sender.err').read_text()[-2000:]}")
    result = json.loads(stdout)
    result["health_s"] = lat
    return result


def warm_up(port: int) -> None:
    """Two short chats as the bench user, the extraction they leave drained:
    the first loads the user's memories into the search cache (off the
    request, which may go on without them), the second finds them there."""
    body = msgspec.json.encode(
        {"model": "bench-model", "messages": [{"role": "user", "content": QUESTIONS[0]}]}
    )
    for _ in range(2):
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body)
        req.add_header("content-type", "application/json")
        req.add_header("authorization", f"Bearer {KEY}")
        req.add_header("x-user-id", USER)
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
        drain(port, timeout=300)
        time.sleep(1.0)


def row(name: str, lat: list[float], idle_p99: float, target: float, chats: str) -> str:
    p99 = pct(lat, 99)
    verdict = "-" if name == "idle" else ("met" if p99 <= target else "**missed**")
    return (
        f"| {name} | {chats} | {len(lat)} | {pct(lat, 50):.2f} | {p99:.2f} "
        f"| {max(lat) * 1000:.2f} | {p99 / idle_p99:.2f} | {verdict} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[1, 20], help="user message sizes, MB"
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per window")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-stream", action="store_true", help="only non-streamed chats")
    parser.add_argument("--interval-ms", type=float, default=5.0, help="between /health probes")
    parser.add_argument("--target-ms", type=float, default=50.0, help="/health p99 limit")
    parser.add_argument(
        "--parts",
        type=int,
        default=0,
        help="send the user message as this many text parts (a content list), not a string",
    )
    parser.add_argument("--memories", type=int, default=10_000)
    parser.add_argument("--out", type=Path, help="write every latency as JSON here")
    # The sender's own mode (run by `measure`, in a process of its own).
    parser.add_argument("--sender", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--margin", type=float, default=0.5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sender:
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        print(json.dumps(runner(send(args))), flush=True)
        return

    workdir = Path(tempfile.mkdtemp(prefix="mg-bench-long-paste-"))
    procs: list[Proc] = []
    cases = [(s, st) for s in args.sizes for st in ((False,) if args.no_stream else (False, True))]
    raw: dict[str, list[float]] = {"idle": []}
    senders: dict[str, list[dict[str, Any]]] = {}
    load_before = os.getloadavg()
    try:
        upstream, up_port = start_fake_upstream(workdir)
        procs.append(upstream)
        data = seeded_data(args.memories, workdir)
        gw, port = start_gateway("gateway-on", workdir, up_port, data, {"enabled": True})
        procs.append(gw)
        warm_up(port)
        probe = Probe(port)
        probe.run(1.0, args.interval_ms / 1000)
        for rnd in range(args.rounds):
            lat = probe.run(args.duration, args.interval_ms / 1000)
            raw["idle"] += lat
            print(
                f"round {rnd + 1} {'idle':>18}: /health p50 {pct(lat, 50):7.2f} ms "
                f"p99 {pct(lat, 99):7.2f} ms max {max(lat) * 1000:7.2f} ms",
                flush=True,
            )
            for size, stream in cases:
                name = case_name(size, stream, args.parts)
                r = measure(port, probe, size, stream, args, workdir)
                r["drain_s"] = drain(port, timeout=300)
                lat = r.pop("health_s")
                raw.setdefault(name, []).extend(lat)
                senders.setdefault(name, []).append(r)
                print(
                    f"round {rnd + 1} {name:>18}: /health p50 {pct(lat, 50):7.2f} ms "
                    f"p99 {pct(lat, 99):7.2f} ms max {max(lat) * 1000:7.2f} ms; "
                    f"{len(r['latency_s'])} chats, statuses {r['statuses']}, "
                    f"memory {r['memory']}, injected {r['injected']}, "
                    f"drain {r['drain_s']:.1f} s",
                    flush=True,
                )
        probe.close()
        rss, peak = gw.rss_mib()
        with urllib.request.urlopen(f"http://127.0.0.1:{up_port}/stats", timeout=30) as resp:
            upstream_stats = json.loads(resp.read())
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    idle_p99 = pct(raw["idle"], 99)
    rows = [
        "| case | chats (p50 s) | probes | p50 ms | p99 ms | max ms | x idle | p99 <= target |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
        row("idle", raw["idle"], idle_p99, args.target_ms, "-"),
    ]
    missed = []
    for size, stream in cases:
        name = case_name(size, stream, args.parts)
        chats = [s for r in senders[name] for s in r["latency_s"]]
        median = f"{pct(chats, 50) / 1000:.2f}" if chats else "-"
        rows.append(row(name, raw[name], idle_p99, args.target_ms, f"{len(chats)} ({median})"))
        if pct(raw[name], 99) > args.target_ms:
            missed.append(name)
    print()
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; python {platform.python_version()}")
    print(
        f"cores: {os.cpu_count()}; load average before {load_before[0]:.1f}, "
        f"after {os.getloadavg()[0]:.1f}"
    )
    print(
        f"rounds: {args.rounds} x {args.duration:g} s per case; /health every "
        f"{args.interval_ms:g} ms; gateway RSS {rss:.0f} MiB (peak {peak:.0f})"
    )
    print(
        f"extraction calls: {upstream_stats['extraction']}, "
        f"{upstream_stats['extraction_prompt_chars'] / max(1, upstream_stats['extraction']):.0f}"
        " prompt characters each on average"
    )
    print("\n".join(rows))
    if args.out:
        args.out.write_text(json.dumps({"health_s": raw, "senders": senders}))
    if missed:
        print(f"target missed (/health p99 > {args.target_ms:g} ms): {', '.join(missed)}")
        sys.exit(1)
    print(f"target met: /health p99 <= {args.target_ms:g} ms in every case")


if __name__ == "__main__":
    main()
