"""`memory-gateway memories ...` and `memory-gateway keys ...`: a running
gateway's memories and keys, from the command line.

Every command is one or a few calls to the gateway's own HTTP APIs
(`/v1/memories`, `/v1/keys`, and `/mem0` for the calls that name only a
memory id), so the gateway's rules apply unchanged. The gateway is found at
`--url`, else where `serve` with this configuration listens; the admin key
comes from `--admin-key` or `GATEWAY_ADMIN_KEY` (none is needed from this
machine when no admin key is set).

Tables for people, `--json` for scripts. Exit statuses: 0 done, 1 the
gateway refused (its message is printed), 2 bad usage or configuration,
3 the gateway cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import httpx

EPILOG = """examples:
  memory-gateway memories list alice
  memory-gateway memories search alice "where do I live?" --json
  memory-gateway memories add alice "Allergic to peanuts"
  memory-gateway memories export --all > memories.jsonl
  memory-gateway memories import memories.jsonl
  memory-gateway memories jobs --failed --retry
  memory-gateway keys create alice --name laptop
  GATEWAY_ADMIN_KEY=... memory-gateway keys --url https://gw.example list
"""
TIMEOUT = 60.0


class Refused(Exception):
    """The gateway answered with an error: exit 1 with its message."""


class Unreachable(Exception):
    """No answer from the gateway: exit 3."""


def add_commands(commands: Any, connection: Callable[..., None]) -> None:
    """The `memories` and `keys` commands, on the CLI's sub-parsers."""
    formatter = argparse.RawDescriptionHelpFormatter
    memories = commands.add_parser(
        "memories",
        help="list, search, edit, export and import memories",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    connection(memories)
    sub = memories.add_subparsers(dest="action", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help)
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        connection(parser, again=True)
        return parser

    p = action("list", "a user's memories")
    p.add_argument("user")
    p.add_argument("--limit", type=int, default=100)
    p = action("search", "a user's memories most relevant to a query")
    p.add_argument("user")
    p.add_argument("query")
    p.add_argument("--limit", type=int, default=10)
    p = action("add", "add a memory (verbatim, or --infer: through extraction)")
    p.add_argument("user")
    p.add_argument("text")
    p.add_argument("--infer", action="store_true")
    p = action("rm", "delete a memory by id")
    p.add_argument("id")
    p = action("history", "the ADD/UPDATE/DELETE history of a memory")
    p.add_argument("id")
    p = action("export", "JSON lines of a user's memories (or --all), to stdout")
    p.add_argument("user", nargs="?")
    p.add_argument("--all", action="store_true")
    p = action("import", "import JSON lines made by export")
    p.add_argument("file", type=Path)
    p.add_argument("--user", help="into this user (default: each line's own user)")
    p = action("erase", "forget a user: memories, history and queued jobs")
    p.add_argument("user")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    action("stats", "memory, user and extraction queue counts")
    p = action("jobs", "extraction jobs")
    p.add_argument("--failed", action="store_true", help="only failed ones")
    p.add_argument("--retry", action="store_true", help="retry the failed ones")

    keys = commands.add_parser(
        "keys",
        help="issue, list and revoke users' gateway keys",
        epilog=EPILOG,
        formatter_class=formatter,
    )
    connection(keys)
    ksub = keys.add_subparsers(dest="action", required=True)
    p = ksub.add_parser("create", help="issue a key for a user (printed once)")
    connection(p, again=True)
    p.add_argument("user")
    p.add_argument("--name")
    p.add_argument("--expires", help="ISO 8601 time after which the key is refused")
    p.add_argument("--json", action="store_true")
    p = ksub.add_parser("list", help="issued keys (never the keys themselves)")
    connection(p, again=True)
    p.add_argument("--user")
    p.add_argument("--json", action="store_true")
    p = ksub.add_parser("revoke", help="revoke a key by id")
    connection(p, again=True)
    p.add_argument("id")
    p.add_argument("--json", action="store_true")


class Gateway:
    """The running gateway's HTTP APIs, as the admin."""

    def __init__(self, url: str, admin_key: str | None) -> None:
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=TIMEOUT)

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise Unreachable(f"cannot reach the gateway at {self.url}: {exc}") from None
        if response.status_code >= 400:
            raise Refused(_message(response))
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.call(method, path, **kwargs).json()


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"HTTP {response.status_code}: {error.get('message')}"
    detail = body.get("detail") if isinstance(body, dict) else None
    return f"HTTP {response.status_code}: {detail or error or body}"


def table(rows: Sequence[Sequence[Any]], header: Sequence[str], out: TextIO) -> None:
    """Columns padded to their widest cell; long texts are not cut."""
    cells = [[str(c) if c is not None else "" for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header) - 1)]
    for row in cells:
        padded = [c.ljust(w) for c, w in zip(row, widths, strict=False)]
        print("  ".join([*padded, row[-1]]).rstrip(), file=out)


def _progress(label: str, done: int, total: int | None) -> None:
    """A one-line progress bar on a terminal's stderr (never in a pipe's output)."""
    if not sys.stderr.isatty():
        return
    if total:
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    else:
        sys.stderr.write(f"\r{label} {done}")
    sys.stderr.flush()


def _done_progress() -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\n")


def _memory_rows(memories: Iterable[dict[str, Any]]) -> list[list[Any]]:
    return [[m["id"], m.get("agent_id") or "", m["updated_at"][:19], m["text"]] for m in memories]


MEMORY_HEADER = ["ID", "AGENT", "UPDATED", "TEXT"]


def run(args: argparse.Namespace, gateway: Gateway, out: TextIO) -> int:
    """Carry out one command; raises Refused or Unreachable."""
    command = f"{args.command} {args.action}"
    as_json = getattr(args, "json", False)

    def emit(
        data: Any, rows: list[list[Any]] | None = None, header: list[str] | None = None
    ) -> None:
        if as_json or rows is None or header is None:
            print(json.dumps(data, ensure_ascii=False, indent=None), file=out)
        else:
            table(rows, header, out)

    if command == "memories list":
        data = gateway.json(
            "GET", "/v1/memories", params={"user_id": args.user, "limit": args.limit}
        )
        emit(data["data"], _memory_rows(data["data"]), MEMORY_HEADER)
    elif command == "memories search":
        body = {"user_id": args.user, "query": args.query, "limit": args.limit}
        results = gateway.json("POST", "/v1/memories/search", json=body)["results"]
        rows = [[f"{r['score']:.3f}", *_memory_rows([r["memory"]])[0]] for r in results]
        emit(results, rows, ["SCORE", *MEMORY_HEADER])
    elif command == "memories add":
        body = {"user_id": args.user, "text": args.text, "infer": args.infer}
        added = gateway.json("POST", "/v1/memories", json=body)
        if added.get("job_id"):
            emit(added, [[added["job_id"], added.get("job_state") or ""]], ["JOB", "STATE"])
        else:
            emit(added, _memory_rows(added["results"]), MEMORY_HEADER)
    elif command == "memories rm":
        gateway.call("DELETE", f"/mem0/v1/memories/{args.id}/")
        emit({"deleted": 1}, [[args.id]], ["DELETED"])
    elif command == "memories history":
        entries = gateway.json("GET", f"/mem0/v1/memories/{args.id}/history/")
        rows = [
            [e["created_at"][:19], e["event"], e.get("old_memory") or "", e.get("new_memory") or ""]
            for e in entries
        ]
        emit(entries, rows, ["AT", "EVENT", "OLD", "NEW"])
    elif command == "memories export":
        return _export(args, gateway, out)
    elif command == "memories import":
        return _import(args, gateway, out)
    elif command == "memories erase":
        if not args.yes and not _confirmed(args.user):
            print("not erased", file=sys.stderr)
            return 1
        data = gateway.json("DELETE", "/v1/memories", params={"user_id": args.user})
        emit(data, [[args.user, data["deleted"]]], ["ERASED", "MEMORIES"])
    elif command == "memories stats":
        stats = gateway.json("GET", "/v1/memories/stats")
        spool = stats["spool"]
        rows = [
            ["memories", stats["memories"]],
            ["users", stats["users"]],
            *[[f"jobs {k}", v] for k, v in spool.items() if isinstance(v, int | float)],
        ]
        emit(stats, rows, ["WHAT", "COUNT"])
    elif command == "memories jobs":
        if args.retry:
            retried = gateway.json("POST", "/v1/memories/jobs/retry")
            print(f"retried {retried.get('retried', 0)} failed job(s)", file=sys.stderr)
        params = {"state": "failed"} if args.failed else {}
        jobs = gateway.json("GET", "/v1/memories/jobs", params=params)["data"]
        rows = [
            [
                j["id"],
                j["user_id"],
                j["state"],
                j["attempts"],
                j.get("reason") or "",
                (j.get("last_error") or "")[:80],
            ]
            for j in jobs
        ]
        emit(jobs, rows, ["ID", "USER", "STATE", "ATTEMPTS", "REASON", "LAST ERROR"])
    elif command == "keys create":
        wanted: dict[str, Any] = {"user_id": args.user, "name": args.name}
        if args.expires:
            wanted["expires_at"] = args.expires
        key = gateway.json("POST", "/v1/keys", json=wanted)
        emit(key, [[key["id"], key["user_id"], key["key"]]], ["ID", "USER", "KEY (shown once)"])
    elif command == "keys list":
        params = {"user_id": args.user} if args.user else {}
        keys = gateway.json("GET", "/v1/keys", params=params)["data"]
        rows = [
            [
                k["id"],
                k["user_id"],
                k.get("name") or "",
                "…" + k["hint"],
                k["created_at"][:19],
                (k.get("expires_at") or "")[:19],
            ]
            for k in keys
        ]
        emit(keys, rows, ["ID", "USER", "NAME", "KEY", "CREATED", "EXPIRES"])
    elif command == "keys revoke":
        data = gateway.json("DELETE", f"/v1/keys/{args.id}")
        emit(data, [[args.id]], ["REVOKED"])
    return 0


def _confirmed(user: str) -> bool:
    if not sys.stdin.isatty():
        print(f"refusing to erase {user!r} without --yes (no terminal to ask)", file=sys.stderr)
        return False
    answer = input(f"Erase every memory of {user!r}? Type the user id to confirm: ")
    return answer.strip() == user


def _export(args: argparse.Namespace, gateway: Gateway, out: TextIO) -> int:
    if args.all == (args.user is not None):
        print("export: name one USER or --all", file=sys.stderr)
        return 2
    if args.all:
        users = [u["user_id"] for u in gateway.json("GET", "/v1/memories/users")["data"]]
    else:
        users = [args.user]
    lines = 0
    for n, user in enumerate(users, 1):
        response = gateway.call("GET", "/v1/memories/export", params={"user_id": user})
        for line in response.text.splitlines():
            if line.strip():
                out.write(line + "\n")
                lines += 1
        _progress("exporting users", n, len(users))
    _done_progress()
    print(f"exported {lines} memories of {len(users)} user(s)", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace, gateway: Gateway, out: TextIO) -> int:
    try:
        text = args.file.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"import: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return 2
    lines = text.splitlines()
    groups: dict[str, list[str]] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if args.user:
            groups.setdefault(args.user, []).append(line)
            continue
        try:
            user = json.loads(line)["user_id"]
        except (ValueError, KeyError, TypeError):
            print(f"import: line {n} is not a memory of export (no user_id)", file=sys.stderr)
            return 2
        groups.setdefault(str(user), []).append(line)
    totals = {"imported": 0, "skipped": 0, "failed": 0}
    reports = []
    for n, (user, chunk) in enumerate(groups.items(), 1):
        result = gateway.json(
            "POST",
            "/v1/memories/import",
            params={"user_id": user},
            content="\n".join(chunk).encode(),
        )
        totals["imported"] += result["imported"]
        totals["skipped"] += len(result["skipped"])
        totals["failed"] += len(result["failed"])
        reports.append({"user_id": user, **result})
        _progress("importing users", n, len(groups))
    _done_progress()
    if getattr(args, "json", False):
        print(json.dumps(reports, ensure_ascii=False), file=out)
    else:
        table(
            [[u["user_id"], u["imported"], len(u["skipped"]), len(u["failed"])] for u in reports],
            ["USER", "IMPORTED", "SKIPPED", "FAILED"],
            out,
        )
    return 1 if totals["failed"] else 0


def main(args: argparse.Namespace, url: str, out: TextIO | None = None) -> int:
    admin_key = args.admin_key or os.environ.get("GATEWAY_ADMIN_KEY") or None
    gateway = Gateway(url, admin_key)
    try:
        return run(args, gateway, out or sys.stdout)
    except Refused as exc:
        print(f"memory-gateway: {exc}", file=sys.stderr)
        return 1
    except Unreachable as exc:
        print(f"memory-gateway: {exc}", file=sys.stderr)
        return 3
    finally:
        gateway.close()
