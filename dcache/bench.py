"""`dcache bench`: a load generator over the public client, like memtier for dcache.

Bounded by a number of operations and a time limit. Every request's latency
is recorded (8 bytes each), so percentiles are exact.

It writes ``key:0`` … ``key:N-1`` in a namespace of its own (``BenchConfig.ns``)
and deletes them all when it ends, however it ends, unless told to keep them.
"""

from __future__ import annotations

import array
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from .aio import Client, ClusterClient
from .codec import MAX_NAMESPACE_BYTES, Limits
from .commands import AccessOptions
from .errors import DcacheError, RequestError

MAX_OPS = 20_000_000
DEFAULT_TIME_LIMIT = 300.0
# A namespace of the bench's own, named after it so no application uses it by
# chance: its key:0 … key:N-1 then never overwrite (nor, when it cleans up,
# delete) a user's keys of those names, which live in the default namespace "".
DEFAULT_NS = "dcache-bench"
# Keys per request when prefilling or cleaning up (within the node's limits too).
BATCH_KEYS = 1000
# How long a run that ends early (time is up for the caller, Ctrl-C, an error)
# may go on deleting its keys: ~10M keys at a local node's ~350k deletes/s.
CLEANUP_TIME_LIMIT = 30.0


@dataclass(frozen=True, slots=True)
class BenchConfig:
    servers: tuple[str, ...]
    clients: int = 50
    connections: int = 1  # per server; client tasks share them round-robin
    pipeline: int = 1
    ops: int = 100_000
    sets: int = 1
    gets: int = 10
    value_size: int = 100
    keys: int = 100_000
    ttl: float | None = None
    prefill: bool = False
    mget: int = 0  # when > 0, each get is an mget of this many keys
    time_limit: float = DEFAULT_TIME_LIMIT
    seed: int = 0
    cluster: bool = False  # a ClusterClient per connection: keys go straight to their owners
    ns: str = DEFAULT_NS  # "" is the default namespace: the bench then overwrites and deletes users' key:N
    keep: bool = False  # leave the keys written rather than delete them at the end
    processes: int = 1  # the client tasks spread over this many processes (see run_bench)
    access: AccessOptions = AccessOptions()  # token and TLS files (plain values: a process gets its own copy)

    def __post_init__(self) -> None:
        if not self.servers:
            raise ValueError("no server to benchmark")
        if not 1 <= self.ops <= MAX_OPS:
            raise ValueError(f"--ops must be from 1 to {MAX_OPS:,}")
        if self.sets < 0 or self.gets < 0 or self.sets + self.gets == 0:
            raise ValueError("--ratio needs a positive set or get share, e.g. 1:10")
        for name in ("clients", "connections", "pipeline", "keys", "processes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")
        if self.value_size < 0 or self.mget < 0:
            raise ValueError("--value-size and --mget cannot be negative")
        if self.cluster and self.pipeline > 1:
            raise ValueError("--pipeline above 1 is not available with --cluster yet")
        if self.processes > self.clients:
            raise ValueError(f"--processes {self.processes} is more than --clients {self.clients}: each needs a task")
        if len(self.ns.encode()) > MAX_NAMESPACE_BYTES:
            raise ValueError(f"--ns must be at most {MAX_NAMESPACE_BYTES} bytes")


def parse_ratio(text: str) -> tuple[int, int]:
    """``"1:10"`` → (1, 10): sets to gets, as memtier writes it."""
    try:
        sets, gets = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"--ratio must look like SETS:GETS, e.g. 1:10, not {text!r}") from None
    return sets, gets


@dataclass(slots=True)
class OpRecord:
    latencies: array.array = field(default_factory=lambda: array.array("d"))
    errors: int = 0
    misses: int = 0
    first_error: str | None = None


@dataclass(frozen=True, slots=True)
class OpSummary:
    op: str
    count: int
    errors: int
    misses: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    first_error: str | None = None


@dataclass(frozen=True, slots=True)
class BenchResult:
    config: BenchConfig
    elapsed_s: float
    ops: int
    summaries: tuple[OpSummary, ...]
    removed_keys: int = 0  # deleted at the end (the keys that existed of key:0 … key:N-1)
    cleanup_error: str | None = None  # why the cleanup stopped short, leaving keys behind

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.elapsed_s if self.elapsed_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        c = self.config
        return {
            "servers": list(c.servers),
            "clients": c.clients,
            "connections": c.connections,
            "pipeline": c.pipeline,
            "ratio": f"{c.sets}:{c.gets}",
            "value_size": c.value_size,
            "keys": c.keys,
            "mget": c.mget,
            "cluster": c.cluster,
            "processes": c.processes,
            "ns": c.ns,
            "keep": c.keep,
            "elapsed_s": round(self.elapsed_s, 3),
            "ops": self.ops,
            "ops_per_s": round(self.ops_per_s, 1),
            "by_op": {
                s.op: {
                    "count": s.count,
                    "errors": s.errors,
                    "misses": s.misses,
                    "ops_per_s": round(s.ops_per_s, 1),
                    "p50_ms": round(s.p50_ms, 3),
                    "p99_ms": round(s.p99_ms, 3),
                    "p99.9_ms": round(s.p999_ms, 3),
                    "max_ms": round(s.max_ms, 3),
                    "first_error": s.first_error,
                }
                for s in self.summaries
            },
            "removed_keys": self.removed_keys,
            "cleanup_error": self.cleanup_error,
        }


def _percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, math.ceil(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def summarize(op: str, record: OpRecord, elapsed: float) -> OpSummary:
    values = sorted(record.latencies)
    return OpSummary(
        op=op,
        count=len(values),
        errors=record.errors,
        misses=record.misses,
        ops_per_s=len(values) / elapsed if elapsed else 0.0,
        p50_ms=_percentile(values, 0.50) * 1000,
        p99_ms=_percentile(values, 0.99) * 1000,
        p999_ms=_percentile(values, 0.999) * 1000,
        max_ms=(values[-1] if values else 0.0) * 1000,
        first_error=record.first_error,
    )


async def run_bench(
    config: BenchConfig,
    *,
    on_progress: Callable[[int], None] | None = None,
    on_cleanup_progress: Callable[[int, int], None] | None = None,
) -> BenchResult:
    """Run the workload; ``on_progress(done)`` is called about ten times a second.

    Then, unless ``config.keep``, delete every key the run may have written,
    calling ``on_cleanup_progress(swept, total)`` as it goes; prefill and
    cleanup are outside the timing. A cleanup that fails (a lost node, say)
    stops at once and is reported in ``BenchResult.cleanup_error``.

    A run that ends early (the caller cancels it, Ctrl-C, an error) cleans up
    too, shielded from the cancellation but for at most ``CLEANUP_TIME_LIMIT``
    seconds; a failure of that cleanup is not raised, so the error that ended
    the run is the one raised. Another Ctrl-C stops it at once.
    """
    clients: list[Any] = []
    cleanup: _Cleanup | None = None
    try:
        for server in config.servers:
            for _ in range(config.connections):
                clients.append(await _connect(config, server))
        limits = clients[0].limits
        if config.value_size > limits.max_value_bytes:
            raise ValueError(f"--value-size {config.value_size:,} is over the node's limit of {limits.max_value_bytes:,} bytes")
        if config.mget > limits.max_batch:
            raise ValueError(f"--mget {config.mget:,} is over the node's limit of {limits.max_batch:,} keys per request")
        value = random.Random(config.seed).randbytes(config.value_size)
        if not config.keep and (config.prefill or config.sets):
            cleanup = _Cleanup(clients[0], config.ns, config.keys, on_cleanup_progress)
        if config.prefill:
            await _prefill(clients[0], config, value)
        if config.processes > 1:
            records, done, elapsed = await _measure_in_processes(config, on_progress)
        else:
            records, done, elapsed = await _measure(config, clients, value, on_progress)
        summaries = tuple(summarize(op, rec, elapsed) for op, rec in records.items() if rec.latencies)
        if cleanup is None:
            return BenchResult(config, elapsed, done, summaries)
        try:
            await cleanup.run()
        except DcacheError as exc:  # the figures stand; say what is left behind
            return BenchResult(config, elapsed, done, summaries, cleanup.removed, str(exc))
        return BenchResult(config, elapsed, done, summaries, cleanup.removed)
    except BaseException:
        if cleanup is not None and not cleanup.finished:
            with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIME_LIMIT):
                try:
                    await cleanup.run()
                except Exception:
                    pass  # the error that ended the run is the one to raise
        raise
    finally:
        for client in clients:
            await client.aclose()


async def _measure(
    config: BenchConfig, clients: list[Any], value: bytes, on_progress: Callable[[int], None] | None
) -> tuple[dict[str, OpRecord], int, float]:
    """The timed part: ``config.clients`` tasks over ``clients``; the records, ops done and seconds taken."""
    records = {"set": OpRecord(), "get": OpRecord()}
    done = 0
    claimed = 0
    set_share = config.sets / (config.sets + config.gets)

    async def worker(n: int) -> None:
        nonlocal done, claimed
        client = clients[n % len(clients)]
        rng = random.Random(config.seed * 1_000_003 + n)
        keyspace, pipeline, mget = config.keys, config.pipeline, config.mget
        ttl, ns = config.ttl, config.ns
        while claimed < config.ops:
            batch = min(pipeline, config.ops - claimed)
            claimed += batch
            ops = ["set" if rng.random() < set_share else "get" for _ in range(batch)]
            started = time.perf_counter()
            if batch == 1:
                outcomes = [await _one(client, ops[0], rng, keyspace, value, ttl, mget, ns)]
            else:
                p = client.pipeline()
                for op in ops:
                    _queue(p, op, rng, keyspace, value, ttl, mget, ns)
                outcomes = await p.execute(raise_on_error=False)
            elapsed = time.perf_counter() - started
            for op, outcome in zip(ops, outcomes):
                record = records[op]
                record.latencies.append(elapsed)
                if isinstance(outcome, Exception):
                    record.errors += 1
                    if record.first_error is None:
                        record.first_error = str(outcome)
                elif op == "get" and (outcome is None or (mget and None in outcome)):
                    record.misses += 1
            done += batch

    started = time.perf_counter()
    with trio.move_on_after(config.time_limit):
        async with trio.open_nursery() as nursery:
            if on_progress is not None:
                nursery.start_soon(_report_progress, lambda: done, on_progress)
            async with trio.open_nursery() as workers:
                for n in range(config.clients):
                    workers.start_soon(worker, n)
            nursery.cancel_scope.cancel()
    elapsed = time.perf_counter() - started
    return records, done, elapsed


async def _measure_in_processes(
    config: BenchConfig, on_progress: Callable[[int], None] | None
) -> tuple[dict[str, OpRecord], int, float]:
    """:func:`_measure` in ``config.processes`` processes, each with its share of
    the client tasks and operations and connections of its own, so that the
    load generator (a Python process per core at most) is not what limits the
    figures; their records are joined, so percentiles stay exact."""
    import multiprocessing
    import queue

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no trio run, no threads carried over
    n = config.processes
    progress = context.Array("q", n)
    results = context.Queue()
    workers = []
    for i in range(n):
        share = replace(
            config,
            clients=config.clients // n + (i < config.clients % n),
            ops=config.ops // n + (i < config.ops % n),
            seed=config.seed + i + 1,
            processes=1,
            prefill=False,
            keep=True,
        )
        workers.append(context.Process(target=_bench_process, args=(share, i, progress, results), daemon=True))
    try:
        for worker in workers:
            worker.start()
        got: list[Any] = []
        while len(got) < n:
            if on_progress is not None:
                on_progress(sum(progress[:]))
            while True:
                try:
                    got.append(results.get_nowait())
                except queue.Empty:
                    break
            if len(got) < n and not any(worker.is_alive() for worker in workers) and results.empty():
                raise DcacheError("a bench process ended without its figures")
            await trio.sleep(0.1)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
            worker.join(5)
    errors = [message for kind, *rest in got if kind == "error" for message in rest]
    if errors:
        raise DcacheError(errors[0])
    records = {"set": OpRecord(), "get": OpRecord()}
    done, elapsed = 0, 0.0
    for _, part_records, part_done, part_elapsed in got:
        done += part_done
        elapsed = max(elapsed, part_elapsed)
        for op, part in part_records.items():
            record = records[op]
            record.latencies.extend(part.latencies)
            record.errors += part.errors
            record.misses += part.misses
            record.first_error = record.first_error or part.first_error
    return records, done, elapsed


async def _connect(config: BenchConfig, server: str) -> Client | ClusterClient:
    kind = ClusterClient if config.cluster else Client
    return await kind.connect(server, **config.access.client_args())


def _bench_process(config: BenchConfig, index: int, progress: Any, results: Any) -> None:
    """A worker of :func:`_measure_in_processes`: connects, measures, sends its figures back."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers; a Ctrl-C is its to handle

    async def main() -> None:
        clients: list[Any] = []
        try:
            for server in config.servers:
                for _ in range(config.connections):
                    clients.append(await _connect(config, server))
            value = random.Random(config.seed).randbytes(config.value_size)

            def report(done: int) -> None:
                progress[index] = done

            results.put(("ok", *(await _measure(config, clients, value, report))))
        except DcacheError as exc:
            results.put(("error", str(exc)))
        finally:
            for client in clients:
                await client.aclose()

    trio.run(main)


class _Cleanup:
    """Deletes ``key:0`` … ``key:N-1`` of namespace ``ns`` in batches the node
    takes; run again after an interruption, it goes on from the batch it was at."""

    def __init__(self, client: Any, ns: str, keys: int, on_progress: Callable[[int, int], None] | None) -> None:
        self.client = client
        self.ns = ns
        self.total = _keys_that_fit(keys, client.limits.max_key_bytes)  # the others could not be written
        self.step = _batch_size(client.limits, len(f"key:{keys}") + 16)
        self.on_progress = on_progress
        self.swept = 0
        self.removed = 0

    @property
    def finished(self) -> bool:
        return self.swept >= self.total

    async def run(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.swept, self.total)
        while self.swept < self.total:
            end = min(self.total, self.swept + self.step)
            self.removed += await self.client.mdelete([f"key:{i}" for i in range(self.swept, end)], ns=self.ns)
            self.swept = end
            if self.on_progress is not None:
                self.on_progress(end, self.total)


def _keys_that_fit(keys: int, max_key_bytes: int) -> int:
    """How many of ``key:0`` … ``key:N-1`` are within the node's key size limit."""
    digits = max_key_bytes - len("key:")
    if digits < 1:
        return 0
    return keys if digits >= len(str(keys)) else min(keys, 10**digits)


def _batch_size(limits: Limits, item_bytes: int) -> int:
    """Items per request: at most BATCH_KEYS, the node's batch limit, and half its frame limit."""
    return max(1, min(BATCH_KEYS, limits.max_batch, limits.max_frame_bytes // 2 // item_bytes))


async def _one(
    client: Any, op: str, rng: random.Random, keyspace: int, value: bytes, ttl: float | None, mget: int, ns: str
) -> Any:
    try:
        if op == "set":
            return await client.set(f"key:{rng.randrange(keyspace)}", value, ttl=ttl, ns=ns)
        if mget:
            return await client.mget([f"key:{rng.randrange(keyspace)}" for _ in range(mget)], ns=ns)
        return await client.get(f"key:{rng.randrange(keyspace)}", ns=ns)
    except RequestError as exc:
        return exc


def _queue(p: Any, op: str, rng: random.Random, keyspace: int, value: bytes, ttl: float | None, mget: int, ns: str) -> None:
    if op == "set":
        p.set(f"key:{rng.randrange(keyspace)}", value, ttl=ttl, ns=ns)
    elif mget:
        p.mget([f"key:{rng.randrange(keyspace)}" for _ in range(mget)], ns=ns)
    else:
        p.get(f"key:{rng.randrange(keyspace)}", ns=ns)


async def _prefill(client: Any, config: BenchConfig, value: bytes) -> None:
    step = _batch_size(client.limits, len(value) + 32)
    for start in range(0, config.keys, step):
        end = min(config.keys, start + step)
        await client.mset({f"key:{i}": value for i in range(start, end)}, ttl=config.ttl, ns=config.ns)


async def _report_progress(done: Callable[[], int], on_progress: Callable[[int], None]) -> None:
    while True:
        on_progress(done())
        await trio.sleep(0.1)
