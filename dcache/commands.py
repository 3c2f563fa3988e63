"""What each user command does, independent of how it was typed or is shown.

A command takes a connected client and its parsed arguments and returns an
:class:`Outcome`: the data (JSON-ready), the plain text for stdout, an
optional note for stderr and the exit status. The one-shot CLI and the shell
both run commands through :func:`run`; only their rendering differs.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .client import Operations
from .errors import ConnectError, ConnectionLost, DcacheError, RequestError, RequestTimeout

EXIT_OK = 0
EXIT_NOT_FOUND = 1  # a get or delete that found nothing; scripts test for it
EXIT_UNAVAILABLE = 2  # the node could not be reached (also click's usage errors)
EXIT_REFUSED = 3  # the node answered with an error


@dataclass(frozen=True, slots=True)
class TableData:
    """A table for people; ``columns`` empty means a two-column label/value list."""

    rows: list[tuple[str, ...]]
    columns: tuple[str, ...] = ()
    title: str | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    data: dict[str, Any]
    stdout: bytes | str | None = None
    note: str | None = None
    exit_code: int = EXIT_OK
    table: TableData | None = field(default=None)


def value_json(value: bytes) -> dict[str, str]:
    """A value in JSON: text when it is UTF-8, base64 otherwise."""
    try:
        return {"value": value.decode()}
    except UnicodeDecodeError:
        return {"value_base64": base64.b64encode(value).decode()}


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    if seconds == math.inf:
        return "no ttl"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60)} s"
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def show_value(value: bytes) -> str:
    """A value as people should see it: quoted text, or a bytes literal when binary."""
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return repr(value)
    if text.isprintable() or all(c.isprintable() or c in "\n\t" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return repr(value)


def get(client: Operations, *, key: str, ns: str = "") -> Outcome:
    value = client.get(key, ns=ns)
    if value is None:
        return Outcome({"key": key, "found": False}, note=f"{key}: not found", exit_code=EXIT_NOT_FOUND)
    return Outcome({"key": key, "found": True, **value_json(value)}, stdout=value)


def set_(client: Operations, *, key: str, value: bytes, ttl: float | None = None, ns: str = "") -> Outcome:
    version = client.set(key, value, ttl=ttl, ns=ns)
    return Outcome({"key": key, "ok": True, "version": version, "ttl": ttl}, stdout="OK")


def delete(client: Operations, *, keys: list[str], ns: str = "") -> Outcome:
    if len(keys) == 1:
        deleted = 1 if client.delete(keys[0], ns=ns) else 0
    else:
        deleted = client.mdelete(keys, ns=ns)
    data = {"keys": keys, "deleted": deleted}
    if not deleted:
        note = f"{keys[0]}: not found" if len(keys) == 1 else "none of the keys were found"
        return Outcome(data, stdout=None, note=note, exit_code=EXIT_NOT_FOUND)
    return Outcome(data, stdout=f"deleted {deleted}")


def ttl(client: Operations, *, key: str, ns: str = "") -> Outcome:
    seconds = client.ttl(key, ns=ns)
    if seconds is None:
        return Outcome({"key": key, "found": False}, note=f"{key}: not found", exit_code=EXIT_NOT_FOUND)
    data = {"key": key, "found": True, "ttl": None if seconds == math.inf else seconds}
    return Outcome(data, stdout=human_seconds(seconds))


STAT_ROWS: tuple[tuple[str, str, Callable[[Any], str]], ...] = (
    ("node", "node", str),
    ("keys", "keys", lambda v: f"{v:,}"),
    ("hits", "hits", lambda v: f"{v:,}"),
    ("misses", "misses", lambda v: f"{v:,}"),
    ("hit_ratio", "hit ratio", lambda v: "-" if v is None else f"{v:.1%}"),
    ("sets", "sets", lambda v: f"{v:,}"),
    ("deletes", "deletes", lambda v: f"{v:,}"),
    ("expired", "expired", lambda v: f"{v:,}"),
    ("data_bytes", "data", human_bytes),
    ("memory_bytes", "memory (est.)", human_bytes),
    ("process_memory_bytes", "process memory", human_bytes),
    ("connections", "connections", str),
    ("uptime_s", "uptime", lambda v: human_seconds(float(v))),
    ("version", "version", str),
)


def _with_hit_ratio(stats: dict[str, Any]) -> dict[str, Any]:
    data = dict(stats)
    lookups = data.get("hits", 0) + data.get("misses", 0)
    data["hit_ratio"] = data.get("hits", 0) / lookups if lookups else None
    return data


def stats(client: Operations) -> Outcome:
    data = _with_hit_ratio(client.stats())
    rows = [(label, fmt(data[name])) for name, label, fmt in STAT_ROWS if name in data]
    plain = "\n".join(f"{name}\t{data[name]}" for name, _, _ in STAT_ROWS if name in data)
    members = data.get("members", 1)
    note = f"this node only; `stats --cluster` shows all {members} members" if members > 1 else None
    return Outcome(data, stdout=plain, table=TableData(rows), note=note)


CLUSTER_COUNTERS = ("keys", "hits", "misses", "sets", "deletes", "expired", "data_bytes", "memory_bytes")


def _plain_table(columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    return "\n".join("\t".join(str(v) for v in row) for row in [columns, *rows])


def cluster_stats(client: Operations) -> Outcome:
    """Per-node counters and their total, as the connected node gathers them."""
    view = client.members()
    nodes = []
    total = {name: 0 for name in CLUSTER_COUNTERS}
    for member in view["members"]:
        if member["state"] == "up":
            row = _with_hit_ratio({name: member["stats"].get(name, 0) for name in CLUSTER_COUNTERS})
            for name in CLUSTER_COUNTERS:
                total[name] += row[name]
        else:  # its counters are unknown, not zero
            row = {name: None for name in (*CLUSTER_COUNTERS, "hit_ratio")}
        row.update(node=member["node"], state=member["state"])
        nodes.append(row)
    total = _with_hit_ratio(total)
    columns = ("node", "state", "keys", "hits", "misses", "hit ratio", "sets", "deletes", "expired", "memory")

    def cells(row: dict[str, Any]) -> tuple[str, ...]:
        def count(name: str) -> str:
            return "-" if row[name] is None else f"{row[name]:,}"

        ratio = "-" if row["hit_ratio"] is None else f"{row['hit_ratio']:.1%}"
        memory = "-" if row["memory_bytes"] is None else human_bytes(row["memory_bytes"])
        return (row["node"], row["state"], *map(count, ("keys", "hits", "misses")), ratio, *map(count, ("sets", "deletes", "expired")), memory)

    rows = [cells(row) for row in nodes] + [cells({**total, "node": "total", "state": ""})]
    plain_columns = ("node", "state", *CLUSTER_COUNTERS)
    plain_rows = [tuple("-" if row[c] is None else row[c] for c in plain_columns) for row in nodes]
    plain_rows.append(("total", "", *(total[c] for c in CLUSTER_COUNTERS)))
    down = [row["node"] for row in nodes if row["state"] != "up"]
    return Outcome(
        {"epoch": view["epoch"], "nodes": nodes, "total": total},
        stdout=_plain_table(plain_columns, plain_rows),
        note=f"unreachable: {', '.join(down)}" if down else None,
        table=TableData(rows, columns, title=f"cluster at epoch {view['epoch']}"),
    )


def members(client: Operations) -> Outcome:
    view = client.members()
    rows = []
    data = []
    for m in view["members"]:
        stats = m.get("stats") or {}
        entry = {
            "node": m["node"],
            "client": m["client"],
            "state": m["state"],
            "shards": m["shards"],
            "keys": stats.get("keys"),
            "uptime_s": stats.get("uptime_s"),
        }
        data.append(entry)
        rows.append(
            (
                entry["node"],
                entry["client"],
                entry["state"],
                f"{entry['shards']:,}",
                "-" if entry["keys"] is None else f"{entry['keys']:,}",
                "-" if entry["uptime_s"] is None else human_seconds(float(entry["uptime_s"])),
            )
        )
    columns = ("node", "client address", "state", "shards", "keys", "uptime")
    plain = _plain_table(
        ("node", "client", "state", "shards", "keys", "uptime_s"),
        [tuple("" if v is None else v for v in e.values()) for e in data],
    )
    return Outcome(
        {"epoch": view["epoch"], "members": data},
        stdout=plain,
        table=TableData(rows, columns, title=f"{len(rows)} member(s) at epoch {view['epoch']}"),
    )


def ping(client: Operations) -> Outcome:
    client.ping()
    return Outcome({"ok": True, "node": client.server_info.get("node")}, stdout="PONG")  # type: ignore[attr-defined]


def failure(exc: DcacheError) -> Outcome:
    """The outcome of a command that raised: one line for stderr and its exit status."""
    if isinstance(exc, RequestError):
        return Outcome({"error": exc.code, "message": exc.message}, note=f"error: {exc.message}", exit_code=EXIT_REFUSED)
    kind = "unavailable" if isinstance(exc, (ConnectError, ConnectionLost, RequestTimeout)) else "error"
    return Outcome({"error": kind, "message": str(exc)}, note=f"error: {exc}", exit_code=EXIT_UNAVAILABLE)
