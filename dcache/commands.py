"""The commands users type, declared once: their arguments and options, what
they do, and how their outcome is shown.

The one-shot CLI (``dcache get k``) and the shell (``get k``) both parse with
these declarations (:func:`click_command` builds each one's click command)
and run these actions. An action takes a connected client and its parsed
arguments and returns an :class:`Outcome`: the data (JSON-ready), the plain
text for stdout, an optional note for stderr and the exit status; only the
rendering differs between the CLI and the shell.

Importing this module loads neither trio nor rich (rich loads when a table
is shown on a terminal), so one-shot commands start quickly.
"""

from __future__ import annotations

import base64
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from .client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, MAX_SCAN_PAGE, MAX_TIMEOUT, MAX_TTL, Operations, WatchEvent, is_leaving
from .errors import (
    ConnectError,
    ConnectionLost,
    DcacheError,
    RequestError,
    RequestTimeout,
)
from .shard import NUM_SHARDS, rank, shard_of

if TYPE_CHECKING:
    from rich.table import Table

EXIT_OK = 0
EXIT_NOT_FOUND = 1  # a get or delete that found nothing; scripts test for it
EXIT_UNAVAILABLE = 2  # the node could not be reached (also click's usage errors)
EXIT_REFUSED = 3  # the node answered with an error

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"]}


# -- outcomes -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TableData:
    """A table for people; ``columns`` empty means a two-column label/value list.
    ``numeric`` are the columns aligned right."""

    rows: Sequence[tuple[str, ...]]
    columns: tuple[str, ...] = ()
    title: str | None = None
    numeric: tuple[int, ...] = ()


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


def printable(text: str) -> str:
    """``text`` on one line with every control character escaped (``\\n``,
    ``\\x1b``, ``\\u202e``), so that a key or a message shown in a note or an
    error can neither break the line nor drive the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


SHOWN_BINARY_BYTES = 1024  # of a value that is not text, shown escaped on a terminal


def show_value(value: bytes) -> str:
    """A value as people should see it: quoted text, or a bytes literal when
    binary (its first :data:`SHOWN_BINARY_BYTES`, then " …")."""
    try:
        text = value.decode()
    except UnicodeDecodeError:
        return _binary(value)
    if text.isprintable() or all(c.isprintable() or c in "\n\t" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return _binary(value)


def _binary(value: bytes) -> str:
    return repr(value[:SHOWN_BINARY_BYTES]) + (" …" if len(value) > SHOWN_BINARY_BYTES else "")


# -- actions ------------------------------------------------------------------


def _missing(key: str, **data: Any) -> Outcome:
    return Outcome({"key": key, "found": False, **data}, note=f"{key}: not found", exit_code=EXIT_NOT_FOUND)


def get(client: Operations, *, key: str, ns: str = "", meta: bool = False, as_json: bool = False) -> Outcome:
    if not (meta or as_json):
        value = client.get(key, ns=ns)
        if value is None:
            return _missing(key)
        return Outcome({"key": key, "found": True, **value_json(value)}, stdout=value)
    entry = client.get_meta(key, ns=ns)
    if entry is None:
        return _missing(key)
    ttl = None if entry.ttl == math.inf else entry.ttl
    data = {"key": key, "found": True, **value_json(entry.value), "version": entry.version, "ttl": ttl}
    if not meta:
        return Outcome(data, stdout=entry.value)
    rows = [("value", show_value(entry.value)), ("version", str(entry.version)), ("ttl", human_seconds(entry.ttl))]
    plain = "\n".join(f"{name}\t{value}" for name, value in rows)
    return Outcome(data, stdout=plain, table=TableData(rows))


def getdel(client: Operations, *, key: str, ns: str = "") -> Outcome:
    value = client.getdel(key, ns=ns)
    if value is None:
        return _missing(key)
    return Outcome({"key": key, "found": True, **value_json(value)}, stdout=value)


def mget(client: Operations, *, keys: tuple[str, ...] | list[str], ns: str = "") -> Outcome:
    keys = list(keys)
    values = client.mget(keys, ns=ns)
    missing = [key for key, value in zip(keys, values) if value is None]
    data = {
        "values": [
            {"key": key, "found": value is not None, **({} if value is None else value_json(value))}
            for key, value in zip(keys, values)
        ],
        "missing": missing,
    }
    rows = [(key, "(missing)" if value is None else show_value(value)) for key, value in zip(keys, values)]
    plain = "\n".join(f"{printable(key)}\t{shown}" for key, shown in rows)
    note = None
    if missing:
        note = f"{missing[0]}: not found" if len(missing) == 1 else f"{len(missing)} of {len(keys)} keys not found"
    return Outcome(
        data, stdout=plain, note=note, exit_code=EXIT_NOT_FOUND if missing else EXIT_OK, table=TableData(rows, ("key", "value"))
    )


def mset(client: Operations, *, items: tuple[str, ...] | list[str], ttl: float | None = None, ns: str = "") -> Outcome:
    if len(items) % 2:
        raise ValueError("mset takes pairs: KEY VALUE [KEY VALUE ...]")
    pairs = [(items[i], os.fsencode(items[i + 1])) for i in range(0, len(items), 2)]
    versions = client.mset(pairs, ttl=ttl, ns=ns)
    keys = [key for key, _ in pairs]
    return Outcome({"keys": keys, "versions": versions, "ttl": ttl}, stdout=f"OK ({len(keys)} set)")


def scan(client: Operations, *, prefix: str = "", limit: int | None = None, ns: str = "") -> Outcome:
    """Every key (or the first ``limit``) that starts with ``prefix``, across the cluster, a page at a time."""
    keys: list[bytes] = []
    cursor = None
    while True:
        page = MAX_SCAN_PAGE if limit is None else min(MAX_SCAN_PAGE, limit - len(keys))
        found, cursor = client.scan_page(cursor, prefix=prefix, ns=ns, limit=page)
        keys.extend(found)
        if cursor is None or (limit is not None and len(keys) >= limit):
            break
    texts = [key.decode("utf-8", "backslashreplace") for key in keys]
    data = {"keys": texts, "count": len(texts), "complete": cursor is None}
    return Outcome(data, stdout="\n".join(map(printable, texts)) if texts else None)


def watch_line(event: WatchEvent, *, as_json: bool) -> tuple[str, bool]:
    """How one watch event is shown: its line, and whether it goes to stderr
    (a notice of lost events, when not JSON)."""
    key = event.key.decode("utf-8", "backslashreplace")
    if as_json:
        data: dict[str, Any] = {"event": event.kind, "node": event.node, "ns": event.ns}
        data.update({"missed": event.missed} if event.kind == "lagged" else {} if event.kind == "restarted" else {"key": key})
        return json.dumps(data), False
    if event.kind == "lagged":
        count = "an unknown number of events" if event.missed < 0 else f"{event.missed:,} event(s)"
        return f"lost {count} from {event.node}: this watch fell behind", True
    if event.kind == "restarted":
        return f"{event.node} restarted: what changed on it meanwhile is unknown", True
    return f"{event.kind}\t{printable(key)}", False


def incr(client: Operations, *, key: str, by: int = 1, ns: str = "") -> Outcome:
    number = client.incr(key, by, ns=ns)
    return Outcome({"key": key, "value": number}, stdout=str(number))


def decr(client: Operations, *, key: str, by: int = 1, ns: str = "") -> Outcome:
    number = client.decr(key, by, ns=ns)
    return Outcome({"key": key, "value": number}, stdout=str(number))


def add(client: Operations, *, key: str, value: bytes, ttl: float | None = None, ns: str = "") -> Outcome:
    version = client.add(key, value, ttl=ttl, ns=ns)
    if version is None:
        return Outcome({"key": key, "stored": False}, note=f"{key}: exists; not stored", exit_code=EXIT_NOT_FOUND)
    return Outcome({"key": key, "stored": True, "version": version, "ttl": ttl}, stdout="OK")


def replace(client: Operations, *, key: str, value: bytes, ttl: float | None = None, ns: str = "") -> Outcome:
    version = client.replace(key, value, ttl=ttl, ns=ns)
    if version is None:
        return Outcome({"key": key, "stored": False}, note=f"{key}: not found; not stored", exit_code=EXIT_NOT_FOUND)
    return Outcome({"key": key, "stored": True, "version": version, "ttl": ttl}, stdout="OK")


def cas(client: Operations, *, key: str, value: bytes, version: int, ttl: float | None = None, ns: str = "") -> Outcome:
    result = client.cas(key, value, version=version, ttl=ttl, ns=ns)
    data = {"key": key, "stored": result.stored, "version": result.version}
    if result.stored:
        return Outcome(data, stdout=f"OK (version {result.version})")
    now = "it is missing" if result.version is None else f"its version is now {result.version}"
    return Outcome(data, note=f"{key}: changed since version {version} ({now}); not stored", exit_code=EXIT_NOT_FOUND)


def expire(client: Operations, *, key: str, seconds: float, ns: str = "") -> Outcome:
    if not client.expire(key, seconds, ns=ns):
        return _missing(key)
    return Outcome({"key": key, "found": True, "ttl": seconds}, stdout="OK")


def persist(client: Operations, *, key: str, ns: str = "") -> Outcome:
    if not client.persist(key, ns=ns):
        return _missing(key)
    return Outcome({"key": key, "found": True, "ttl": None}, stdout="OK")


def set_(client: Operations, *, key: str, value: bytes, ttl: float | None = None, ns: str = "") -> Outcome:
    version = client.set(key, value, ttl=ttl, ns=ns)
    return Outcome({"key": key, "ok": True, "version": version, "ttl": ttl}, stdout="OK")


def delete(client: Operations, *, keys: tuple[str, ...] | list[str], ns: str = "") -> Outcome:
    keys = list(keys)
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
        return _missing(key)
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
    ("evicted", "evicted", lambda v: f"{v:,}"),
    ("data_bytes", "data", human_bytes),
    ("memory_bytes", "memory (est.)", human_bytes),
    ("max_memory_bytes", "memory limit", lambda v: human_bytes(v) if v else "none"),
    ("compression_saved_bytes", "saved by compression", human_bytes),
    ("process_memory_bytes", "process memory", human_bytes),
    ("connections", "connections", str),
    ("refused", "refused", lambda v: ", ".join(f"{reason} {n:,}" for reason, n in sorted(v.items())) or "none"),
    ("uptime_s", "uptime", lambda v: human_seconds(float(v))),
    ("version", "version", str),
    # with replicas only:
    ("replicas", "replicas", str),
    ("shards_under_replicated", "shards to copy to replicas", lambda v: f"{v:,}"),
    ("shard_copies_held", "shard copies kept for others", lambda v: f"{v:,}"),
    ("shards_failed_over", "shards taken over from a copy", lambda v: f"{v:,}"),
)
_REPLICA_STATS = frozenset({"replicas", "shards_under_replicated", "shard_copies_held", "shards_failed_over"})


def _with_hit_ratio(stats: dict[str, Any]) -> dict[str, Any]:
    data = dict(stats)
    lookups = data.get("hits", 0) + data.get("misses", 0)
    data["hit_ratio"] = data.get("hits", 0) / lookups if lookups else None
    return data


def stats(client: Operations, *, cluster: bool = False, ns: str | None = None) -> Outcome:
    if ns is not None:
        return namespace_stats(client, ns)
    if cluster:
        return cluster_stats(client)
    data = _with_hit_ratio(client.stats())
    shown = [
        (name, label, fmt)
        for name, label, fmt in STAT_ROWS
        if name in data and (name not in _REPLICA_STATS or data.get("replicas", 1) > 1)
    ]
    rows = [(label, fmt(data[name])) for name, label, fmt in shown]
    plain = "\n".join(f"{name}\t{data[name]}" for name, _, _ in shown)
    members = data.get("members", 1)
    note = f"this node only; `stats --cluster` shows all {members} members" if members > 1 else None
    return Outcome(data, stdout=plain, table=TableData(rows, numeric=(1,)), note=note)


CLUSTER_COUNTERS = ("keys", "hits", "misses", "sets", "deletes", "expired", "evicted", "data_bytes", "memory_bytes")


def namespace_stats(client: Operations, ns: str) -> Outcome:
    """One namespace's keys and bytes on each node, and their total."""
    found = client.namespace_stats(ns)
    nodes = sorted(found["nodes"].items())
    rows = [(node, f"{n['keys']:,}", human_bytes(n["data_bytes"])) for node, n in nodes]
    rows.append(("total", f"{found['keys']:,}", human_bytes(found["data_bytes"])))
    plain_rows = [(node, n["keys"], n["data_bytes"]) for node, n in nodes] + [("total", found["keys"], found["data_bytes"])]
    title = f"namespace {ns!r}" if ns else "the default namespace"
    return Outcome(
        {"ns": ns, **found},
        stdout=_plain_table(("node", "keys", "data_bytes"), plain_rows),
        table=TableData(rows, ("node", "keys", "data"), title=title, numeric=(1, 2)),
    )


def flush(client: Operations, *, ns: str | None = None, all_: bool = False, yes: bool = False) -> Outcome:
    count = client.flush_all() if all_ else client.flush(ns or "")
    where = "every namespace" if all_ else (f"namespace {ns!r}" if ns else "the default namespace")
    return Outcome({"ns": None if all_ else ns, "flushed": count}, stdout=f"flushed {count:,} key(s) from {where}")


def flush_question(args: dict[str, Any]) -> str | None:
    """What ``flush`` asks before it runs; click.UsageError if it names neither --ns nor --all, or both."""
    if args["all_"] == (args["ns"] is not None):
        raise click.UsageError("give --ns NAME (--ns '' for the default namespace) or --all")
    if args["all_"]:
        return "Delete every key of every namespace on every node of the cluster?"
    name = f"namespace {args['ns']!r}" if args["ns"] else "the default namespace"
    return f"Delete every key of {name} on every node of the cluster?"


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
    columns = ("node", "state", "keys", "hits", "misses", "hit ratio", "sets", "deletes", "expired", "evicted", "memory")

    def cells(row: dict[str, Any]) -> tuple[str, ...]:
        def count(name: str) -> str:
            return "-" if row[name] is None else f"{row[name]:,}"

        ratio = "-" if row["hit_ratio"] is None else f"{row['hit_ratio']:.1%}"
        memory = "-" if row["memory_bytes"] is None else human_bytes(row["memory_bytes"])
        return (
            row["node"],
            row["state"],
            *map(count, ("keys", "hits", "misses")),
            ratio,
            *map(count, ("sets", "deletes", "expired", "evicted")),
            memory,
        )

    rows = [cells(row) for row in nodes] + [cells({**total, "node": "total", "state": ""})]
    plain_columns = ("node", "state", *CLUSTER_COUNTERS)
    plain_rows = [tuple("-" if row[c] is None else row[c] for c in plain_columns) for row in nodes]
    plain_rows.append(("total", "", *(total[c] for c in CLUSTER_COUNTERS)))
    down = [row["node"] for row in nodes if row["state"] != "up"]
    return Outcome(
        {"epoch": view["epoch"], "nodes": nodes, "total": total},
        stdout=_plain_table(plain_columns, plain_rows),
        note=f"unreachable: {', '.join(down)}" if down else None,
        table=TableData(rows, columns, title=f"cluster at epoch {view['epoch']}", numeric=tuple(range(2, len(columns)))),
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
            # joining, ready, leaving or rejoining as the node says; unreachable if it said nothing
            "state": stats.get("state", "up") if m["state"] == "up" else m["state"],
            "shards": m["shards"],
            "shards_arriving": stats.get("shards_arriving", 0),
            "shards_leaving": stats.get("shards_leaving", 0),
            "shards_under_replicated": stats.get("shards_under_replicated", 0),
            "keys": stats.get("keys"),
            "uptime_s": stats.get("uptime_s"),
        }
        moving = [f"{entry['shards_arriving']:,} in"] if entry["shards_arriving"] else []
        moving += [f"{entry['shards_leaving']:,} out"] if entry["shards_leaving"] else []
        moving += [f"{entry['shards_under_replicated']:,} to copy"] if entry["shards_under_replicated"] else []
        data.append(entry)
        rows.append(
            (
                entry["node"],
                entry["client"],
                entry["state"],
                f"{entry['shards']:,}",
                ", ".join(moving) or "-",
                "-" if entry["keys"] is None else f"{entry['keys']:,}",
                "-" if entry["uptime_s"] is None else human_seconds(float(entry["uptime_s"])),
            )
        )
    columns = ("node", "client address", "state", "shards", "moving", "keys", "uptime")
    plain = _plain_table(
        ("node", "client", "state", "shards", "shards_arriving", "shards_leaving", "shards_under_replicated", "keys", "uptime_s"),
        [tuple("" if v is None else v for v in e.values()) for e in data],
    )
    return Outcome(
        {"epoch": view["epoch"], "members": data},
        stdout=plain,
        table=TableData(rows, columns, title=f"{len(rows)} member(s) at epoch {view['epoch']}", numeric=(3, 5, 6)),
    )


def ping(client: Operations) -> Outcome:
    client.ping()
    return Outcome({"ok": True, "node": client.server_info.get("node")}, stdout="PONG")  # type: ignore[attr-defined]


def where(client: Operations, *, key: str, ns: str = "") -> Outcome:
    """Which node owns KEY, by the connected node's view, and its time to live."""
    view = client.members()
    seconds = client.ttl(key, ns=ns)
    by_id = {m["node"]: m for m in view["members"]}
    shard = shard_of(ns, key.encode())
    staying = [n for n, m in by_id.items() if not is_leaving(m)] or list(by_id)  # (unless every node is leaving)
    owner = rank(shard, staying)[0]
    client_address = by_id[owner]["client"]
    data = {
        "key": key,
        "ns": ns,
        "shard": shard,
        "owner": owner,
        "owner_client": client_address,
        "found": seconds is not None,
        "ttl": None if seconds is None or seconds == math.inf else seconds,
        "epoch": view["epoch"],
    }
    rows = [
        ("key", show_value(key.encode()) + (f" in namespace {ns!r}" if ns else "")),
        ("shard", f"{shard} of {NUM_SHARDS}"),
        ("owner", f"{owner} (clients: {client_address})"),
        ("time to live", "missing" if seconds is None else human_seconds(seconds)),
        ("epoch", str(view["epoch"])),
    ]
    plain = "\t".join(
        f"{name}={'' if value is None else value}" for name, value in data.items()
    )  # one line, as the shell's scripts expect
    return Outcome(data, stdout=plain, table=TableData(rows))


def failure(exc: DcacheError) -> Outcome:
    """The outcome of a command that raised: one line for stderr and its exit status."""
    if isinstance(exc, RequestError):
        return Outcome(
            {"error": exc.code, "message": exc.message}, note=f"error: {exc.code}: {exc.message}", exit_code=EXIT_REFUSED
        )
    kind = "unavailable" if isinstance(exc, (ConnectError, ConnectionLost, RequestTimeout)) else "error"
    return Outcome({"error": kind, "message": str(exc)}, note=f"error: {exc}", exit_code=EXIT_UNAVAILABLE)


def bad_input(exc: ValueError) -> Outcome:
    """The outcome of a command the client refused before sending it (an empty key, say)."""
    return Outcome({"error": "bad_input", "message": str(exc)}, note=f"error: {exc}", exit_code=EXIT_UNAVAILABLE)


# -- the command table ----------------------------------------------------------


class Seconds(click.ParamType):
    """A finite number of seconds above ``minimum`` (or from it, when it is
    not 0) up to ``limit``, called ``what`` in errors; click's own ranges
    let nan through."""

    name = "seconds"

    def __init__(self, limit: float, what: str, *, minimum: float = 0, zero: str = "") -> None:
        self.limit = limit
        self.what = what
        self.minimum = minimum
        self.zero = zero  # what 0 means, if it is allowed

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if number == 0 and self.zero:
            return number
        if not (self.minimum <= number if self.minimum else 0 < number) or not number <= self.limit:
            low = f"from {self.minimum:g} s" if self.minimum else "above 0"
            zero = f", or 0 for {self.zero}" if self.zero else ""
            self.fail(f"{value!r} is not a number of seconds {low} up to {self.what}{zero}", param, ctx)
        return number


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class ByteSize(click.ParamType):
    """A size in bytes: a number with an optional unit (B, KB, MB, GB, TB in
    powers of 1000; KiB, MiB, GiB, TiB in powers of 1024), 0, or at least
    ``minimum``."""

    name = "size"

    def __init__(self, *, minimum: int = 0) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().replace(" ", "")
        number, unit = text.rstrip("abcdefghijklmnopqrstuvwxyz"), text.lstrip("0123456789.")
        try:
            size = float(number) * _UNITS[unit or "b"]
        except (ValueError, KeyError):
            size = math.nan
        if not (size == 0 or self.minimum <= size < 2**63):
            at_least = f"at least {human_bytes(self.minimum)}, or 0" if self.minimum else "a size"
            self.fail(f"{value!r} is not {at_least} (units: B, KB, MB, GB, KiB, MiB, GiB)", param, ctx)
        return int(size)


class ValueBytes(click.ParamType):
    """A value from the command line, as the bytes the user typed."""

    name = "value"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> bytes:
        return value if isinstance(value, bytes) else os.fsencode(value)


TTL = Seconds(MAX_TTL, "100 years")
TIMEOUT = Seconds(MAX_TIMEOUT, "a day")


def _key() -> click.Argument:
    return click.Argument(["key"], metavar="KEY")


def _ns() -> click.Option:
    return click.Option(["--ns"], metavar="NAME", default="", help="Namespace of the key.")


@dataclass(frozen=True, slots=True)
class Command:
    """One command: its name and help, a factory of its own parameters
    (called with ``for_shell``, since a few words differ), and its action.

    ``stdin`` names the parameter that the one-shot CLI reads from stdin when
    it is omitted or ``-``; the shell, whose stdin carries commands, requires
    it. A command without an action (``top``) is run by the shell itself.
    """

    name: str
    help: str
    params: Callable[[bool], list[click.Parameter]]
    action: Callable[..., Outcome] | None
    stdin: str | None = None
    shell_only: bool = False
    cli_help: str = ""  # more help, for the one-shot command only
    json_arg: bool = False  # the action takes ``as_json`` (it asks for more when it is shown as JSON)
    # A question to answer yes to before the action runs, from its args (it
    # takes ``yes``, which skips it); raises click.UsageError for bad args.
    confirm: Callable[[dict[str, Any]], str | None] | None = None
    negative_numbers: bool = False  # an argument may be a negative number (incr k -5), not an option


def _set_params(for_shell: bool) -> list[click.Parameter]:
    return [
        _key(),
        click.Argument(["value"], metavar="VALUE" if for_shell else "[VALUE]", required=for_shell, type=ValueBytes()),
        _ttl_option(),
        _ns(),
    ]


def _ttl_option() -> click.Option:
    return click.Option(
        ["--ttl"], type=TTL, metavar="SECONDS", help="Expire the entry after this many seconds (fractions allowed)."
    )


def _cas_params(for_shell: bool) -> list[click.Parameter]:
    version = click.Option(
        ["--version", "version"],
        type=click.IntRange(min=0),
        required=True,
        metavar="N",
        help="The version the entry must still have (from get --meta or --json).",
    )
    return [*_set_params(for_shell), version]


def _by(for_shell: bool) -> list[click.Parameter]:
    return [_key(), click.Argument(["by"], metavar="[BY]", required=False, default=1, type=_STEP), _ns()]


_STEP = click.IntRange(min=-(2**63 - 1), max=2**63 - 1)

_SET_HELP = (
    "With no VALUE, or '-', the value is read from stdin (dcache set logo < logo.png). "
    "A value that starts with '-' goes after '--' (dcache set temp -- -5)."
)


COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        Command(
            "get",
            "Print the value of KEY (raw bytes, so it pipes); exit 1 if it is missing.",
            lambda for_shell: [
                _key(),
                _ns(),
                click.Option(["--meta"], is_flag=True, help="Show the entry's version and TTL with its value."),
            ],
            get,
            json_arg=True,
        ),
        Command("set", "Store VALUE under KEY, optionally with a TTL.", _set_params, set_, stdin="value", cli_help=_SET_HELP),
        Command(
            "add",
            "Store VALUE under KEY only if KEY is missing; exit 1 if it exists.",
            _set_params,
            add,
            "value",
            cli_help=_SET_HELP,
        ),
        Command(
            "replace",
            "Store VALUE under KEY only if KEY exists; exit 1 if it is missing.",
            _set_params,
            replace,
            "value",
            cli_help=_SET_HELP,
        ),
        Command(
            "cas",
            "Store VALUE under KEY only if its version is still N (compare and set); exit 1 with the current version otherwise.",
            _cas_params,
            cas,
            stdin="value",
            cli_help=_SET_HELP,
        ),
        Command(
            "getdel",
            "Delete KEY and print the value it had; exit 1 if it was missing.",
            lambda for_shell: [_key(), _ns()],
            getdel,
        ),
        Command(
            "mget",
            "Print the values of many keys, one line each; exit 1 if any is missing.",
            lambda for_shell: [click.Argument(["keys"], metavar="KEY...", nargs=-1, required=True), _ns()],
            mget,
        ),
        Command(
            "mset",
            "Store many entries in one request: KEY VALUE [KEY VALUE ...].",
            lambda for_shell: [click.Argument(["items"], metavar="KEY VALUE...", nargs=-1, required=True), _ttl_option(), _ns()],
            mset,
        ),
        Command(
            "scan",
            "List the keys that start with PREFIX (all keys without one), across the cluster, one per line.",
            lambda for_shell: [
                click.Argument(["prefix"], metavar="[PREFIX]", required=False, default=""),
                click.Option(["--limit"], type=click.IntRange(min=1), metavar="N", help="Stop after N keys."),
                _ns(),
            ],
            scan,
            cli_help="Keys come a page at a time, in no meaningful order; a key that is there for the whole walk is "
            "listed once (unless nodes join or leave meanwhile). Keys that are not UTF-8 are shown with \\x escapes.",
        ),
        Command(
            "incr",
            "Add BY (default 1) to the integer at KEY (a missing key counts as 0) and print the result.",
            _by,
            incr,
            negative_numbers=True,
        ),
        Command(
            "decr", "Subtract BY (default 1) from the integer at KEY and print the result.", _by, decr, negative_numbers=True
        ),
        Command(
            "delete",
            "Delete keys; exit 1 if none of them existed.",
            lambda for_shell: [click.Argument(["keys"], metavar="KEY...", nargs=-1, required=True), _ns()],
            delete,
        ),
        Command("ttl", "Show how long KEY has left to live; exit 1 if it is missing.", lambda for_shell: [_key(), _ns()], ttl),
        Command(
            "expire",
            "Let KEY live SECONDS more (fractions allowed); exit 1 if it is missing.",
            lambda for_shell: [_key(), click.Argument(["seconds"], metavar="SECONDS", type=TTL), _ns()],
            expire,
        ),
        Command("persist", "Remove KEY's TTL; exit 1 if it is missing.", lambda for_shell: [_key(), _ns()], persist),
        Command(
            "stats",
            "Show the node's counters: hits, misses, keys, sets, deletes, expired, evicted, memory.",
            lambda for_shell: [
                click.Option(["--cluster"], is_flag=True, help="One row per node and a cluster total."),
                click.Option(["--ns"], metavar="NAME", help="One namespace's keys and bytes on each node, and the total."),
            ],
            stats,
        ),
        Command(
            "flush",
            "Delete every key of a namespace (--ns NAME, '' for the default one) or of all (--all), on every node.",
            lambda for_shell: [
                click.Option(["--ns"], metavar="NAME", help="The namespace to empty."),
                click.Option(["--all", "all_"], is_flag=True, help="Every namespace."),
                click.Option(["--yes", "-y"], is_flag=True, help="Do not ask first (needed when not on a terminal)."),
            ],
            flush,
            confirm=flush_question,
        ),
        Command(
            "members",
            "List the cluster's nodes: address, state, shards owned, moving and still to copy to replicas, keys, uptime.",
            lambda for_shell: [],
            members,
        ),
        Command("ping", "Check that the node answers.", lambda for_shell: [], ping),
        Command(
            "where", "Show which node owns KEY: its shard, owner and time to live.", lambda for_shell: [_key(), _ns()], where
        ),
        Command(
            "watch",
            "Print each change to keys that start with PREFIX (set, delete, expire, evict) on every node, "
            "as it happens, until Ctrl-C.",
            lambda for_shell: [click.Argument(["prefix"], metavar="[PREFIX]", required=False, default=""), _ns()],
            None,
            cli_help="One line per change: the event and the key, tab-separated (--json: one JSON object per line). "
            "A watch that falls behind, or a node that restarts, is reported on stderr; if its node goes away "
            "the watch reconnects for up to 30 s.",
        ),
        Command(
            "top",
            "A live table of every member; q or Ctrl-C leaves.",
            lambda for_shell: [
                click.Option(
                    ["--interval"], type=Seconds(3600, "an hour"), default=1.0, metavar="SECONDS", help="Time between refreshes."
                ),
                click.Option(["--iterations"], type=click.IntRange(min=1), metavar="N", help="Stop after N refreshes."),
            ],
            None,
            shell_only=True,
        ),
    )
}


SERVER_OPTION: dict[str, Any] = {
    "envvar": "DCACHE_SERVER",
    "default": DEFAULT_ADDRESS,
    "metavar": "HOST:PORT",
    "show_default": True,
}
TIMEOUT_OPTION: dict[str, Any] = {
    "envvar": "DCACHE_TIMEOUT",
    "type": TIMEOUT,
    "default": DEFAULT_TIMEOUT,
    "metavar": "SECONDS",
    "show_default": True,
}


def connection_params() -> list[click.Parameter]:
    """The options a one-shot command takes to reach its node; the shell keeps its own connection."""
    return [
        click.Option(["--server", "-s"], help="Node to talk to (also DCACHE_SERVER).", **SERVER_OPTION),
        click.Option(["--timeout"], help="Give up after this long (also DCACHE_TIMEOUT).", **TIMEOUT_OPTION),
        *access_params(),
    ]


def access_params() -> list[click.Parameter]:
    """The options that say how to reach a node that asks for a token or speaks TLS."""
    return [
        click.Option(
            ["--token-file"],
            envvar="DCACHE_TOKEN_FILE",
            metavar="FILE",
            help="Say hello with the token in FILE (or put the token itself in DCACHE_TOKEN).",
        ),
        click.Option(
            ["--ca"],
            envvar="DCACHE_CA",
            metavar="FILE",
            help="Speak TLS, checking the node's certificate against this CA (wss:// addresses use the system's CAs without it).",
        ),
        click.Option(
            ["--client-cert"],
            envvar="DCACHE_CLIENT_CERT",
            metavar="FILE",
            help="This client's TLS certificate, for a node that asks.",
        ),
        click.Option(["--client-key"], envvar="DCACHE_CLIENT_KEY", metavar="FILE", help="The key of --client-cert."),
    ]


@dataclass(frozen=True, slots=True)
class AccessOptions:
    """What the access options said, as plain values (a bench hands them to its processes)."""

    token: str | None = field(default=None, repr=False)
    ca: str | None = None
    client_cert: str | None = None
    client_key: str | None = None

    @classmethod
    def take(cls, args: dict[str, Any], environ: Any = os.environ) -> AccessOptions:
        """Take the access options out of ``args`` (a command's parameters);
        the token from ``--token-file``, else ``DCACHE_TOKEN``. ValueError if
        the file cannot be read."""
        token_file = args.pop("token_file", None)
        token = (environ.get("DCACHE_TOKEN") or "").strip() or None
        if token_file:
            from .security import parse_tokens

            try:
                with open(token_file, encoding="utf-8") as f:
                    tokens = parse_tokens(f.read())
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"--token-file {token_file}: {getattr(exc, 'strerror', None) or exc}") from None
            if not tokens:
                raise ValueError(f"--token-file {token_file} holds no token")
            token = tokens[0]
        return cls(token, args.pop("ca", None), args.pop("client_cert", None), args.pop("client_key", None))

    def client_args(self) -> dict[str, Any]:
        """Keyword arguments for a client: ``token``, and ``tls`` if a CA or
        certificate was given. ValueError if a file is unusable."""
        tls = None
        if self.ca or self.client_cert or self.client_key:
            from .security import client_context

            tls = client_context(ca=self.ca, cert=self.client_cert, key=self.client_key)
        return {"token": self.token, "tls": tls}


def json_param() -> click.Option:
    return click.Option(["--json", "as_json"], is_flag=True, help="Print one JSON object (for scripts).")


def click_command(command: Command, *, for_shell: bool, callback: Callable[..., Any] | None = None) -> click.Command:
    """``command`` as a click command: the shell's variant has no connection
    options, and speaks of no stdin."""
    params = command.params(for_shell)
    if not for_shell:
        params += connection_params()
    params.append(json_param())
    text = command.help if for_shell or not command.cli_help else f"{command.help}\n\n{command.cli_help}"
    settings = {**CONTEXT_SETTINGS, "ignore_unknown_options": True} if command.negative_numbers else CONTEXT_SETTINGS
    return click.Command(command.name, params=params, callback=callback, help=text, context_settings=settings)


# -- rendering for the one-shot CLI ------------------------------------------------


def rich_table(data: TableData) -> Table:
    from rich.table import Table
    from rich.text import Text

    if not data.columns:
        table = Table(show_header=False, box=None, pad_edge=False, title=data.title)
        table.add_column(style="bold cyan")
        table.add_column(justify="right" if 1 in data.numeric else "left")
    else:
        table = Table(title=data.title, title_justify="left")
        for i, column in enumerate(data.columns):
            table.add_column(column, style="bold cyan" if i == 0 else None, justify="right" if i in data.numeric else "left")
    for row in data.rows:
        table.add_row(*(Text(printable(cell)) for cell in row))  # Text: a key's brackets are not rich markup
    return table


def render(outcome: Outcome, *, as_json: bool) -> int:
    """Print an outcome the way scripts and people expect; return the exit status."""
    if as_json:
        print(json.dumps(outcome.data, default=str))
        return outcome.exit_code
    tty = sys.stdout.isatty()
    if outcome.table is not None and tty:
        from rich.console import Console

        Console().print(rich_table(outcome.table))
    elif isinstance(outcome.stdout, bytes):
        value = outcome.stdout
        shown = show_value(value) if tty else ""
        if shown.startswith("b"):  # binary, on a terminal: escaped, not raw, and not all of a big one
            print(shown)
            print(f"({len(value):,} bytes, not text: redirect the output for the raw bytes)", file=sys.stderr)
        else:
            sys.stdout.buffer.write(outcome.stdout)
            if tty and not outcome.stdout.endswith(b"\n"):
                sys.stdout.buffer.write(b"\n")
            sys.stdout.flush()
    elif outcome.stdout is not None:
        print(outcome.stdout)
    if outcome.note:
        print(printable(outcome.note), file=sys.stderr)
    return outcome.exit_code
