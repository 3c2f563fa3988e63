"""The load generators: dcache bench's arithmetic, and benchmarks/leanload.c against a node and a stand-in."""

from __future__ import annotations

import array
import shutil
import subprocess
from functools import partial
from pathlib import Path

import pytest
import trio

import dcache
from dcache import codec, wsframe
from dcache.bench import BenchConfig, OpRecord, parse_ratio, summarize
from dcache.node import BoundAddresses, Node, NodeConfig


def test_parse_ratio() -> None:
    assert parse_ratio("1:10") == (1, 10)
    assert parse_ratio("0:1") == (0, 1)
    for bad in ("1", "a:b", "1:2:3", ""):
        with pytest.raises(ValueError, match="--ratio"):
            parse_ratio(bad)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        BenchConfig(servers=("x",), sets=0, gets=0)
    with pytest.raises(ValueError):
        BenchConfig(servers=("x",), ops=0)
    with pytest.raises(ValueError):
        BenchConfig(servers=("x",), clients=0)
    with pytest.raises(ValueError):
        BenchConfig(servers=())


def test_percentiles_are_exact_on_known_data() -> None:
    record = OpRecord(latencies=array.array("d", [i / 1000 for i in range(1, 1001)]))  # 1..1000 ms
    record.misses = 3
    s = summarize("get", record, elapsed=2.0)
    assert s.count == 1000 and s.ops_per_s == 500
    assert s.p50_ms == pytest.approx(500)
    assert s.p99_ms == pytest.approx(990)
    assert s.p999_ms == pytest.approx(999)
    assert s.max_ms == pytest.approx(1000)
    assert s.misses == 3


@pytest.fixture
def leanload(tmp_path: Path) -> Path:
    """benchmarks/leanload.c, compiled."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    exe = tmp_path / "leanload"
    source = Path(__file__).resolve().parent.parent / "benchmarks" / "leanload.c"
    subprocess.run([cc, "-O2", "-o", str(exe), str(source)], check=True)
    return exe


async def test_the_c_lean_load_counts_what_the_node_served(nursery, leanload: Path) -> None:
    """benchmarks/leanload.c, which measures what a cluster serves, against a real node."""
    bound = await nursery.start(Node(NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0")).run)
    batch, depth = 5, 2
    with trio.fail_after(20):
        async with dcache.connect(bound.client_address) as client:
            await client.mset({f"k{i}": b"v" for i in range(batch)})
            hello = wsframe.build_frame(codec.encode_frame([[0, "hello", {"version": codec.PROTOCOL_VERSION}]]), masked=True)
            frame = wsframe.build_frame(codec.encode_frame([[i, "get", {"key": f"k{i}"}] for i in range(batch)]), masked=True)
            host, port = bound.client_address.rsplit(":", 1)
            done = await trio.run_process(
                [str(leanload), "0.3", str(depth), host, port, hello.hex(), frame.hex(), str(batch)], capture_stdout=True
            )
            rate, counted = done.stdout.split()
            hits = (await client.stats())["hits"]
    assert float(rate) > 0 and int(counted) > 0
    assert int(counted) <= hits <= int(counted) + depth * batch  # at most the frames still in flight


async def test_the_c_lean_load_counts_replies_off_frame_headers(nursery, leanload: Path) -> None:
    """A stand-in server answers every request frame with a frame of three
    replies, and counts the frames it answered: the generator's count must
    match, give or take the frames still in flight when it stopped."""

    answered = 0

    async def serve(stream: trio.SocketStream) -> None:
        nonlocal answered
        handshake, parser = wsframe.ServerHandshake(), wsframe.FrameParser(expect_masked=True, max_message=1 << 20)
        done = None
        while done is None:
            done = handshake.feed(await stream.receive_some(65536))
        response, leftover = done
        await stream.send_all(response)
        messages = parser.feed(leftover)
        try:
            while True:
                for _ in messages:
                    await stream.send_all(wsframe.build_frame(b"\x83\x01\x02\x03", masked=False))
                    answered += 1
                messages = parser.feed(await stream.receive_some(65536))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    [listener] = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
    port = listener.socket.getsockname()[1]
    hello = wsframe.build_frame(codec.encode_frame([[0, "hello", {}]]), masked=True)
    frame = wsframe.build_frame(b"any request frame", masked=True)
    with trio.fail_after(20):
        result = await trio.run_process(
            [str(leanload), "0.3", "2", "127.0.0.1", str(port), hello.hex(), frame.hex(), "3"], capture_stdout=True
        )
    counted = int(result.stdout.split()[1])
    replied = 3 * (answered - 1)  # the first frame answered the hello
    assert 0 < counted <= replied <= counted + 3 * 2


async def test_bench_says_what_went_wrong_and_refuses_what_cannot_work(nursery: trio.Nursery) -> None:
    from dcache.bench import run_bench

    node = Node(NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0", limits=codec.Limits(max_key_bytes=6, max_batch=50)))
    bound = await nursery.start(node.run)
    with trio.fail_after(20):
        # Keys key:0 … key:99 are up to 6 bytes, key:100 … are too long: those fail, and the report says why.
        result = await run_bench(BenchConfig(servers=(bound.client_address,), ops=300, clients=3, keys=1000, sets=1, gets=0))
        (sets,) = result.summaries
        assert 0 < sets.errors < 300
        assert sets.first_error is not None and "key_too_large" in sets.first_error
        assert result.as_dict()["by_op"]["set"]["first_error"] == sets.first_error
        # A workload the node cannot take at all is refused before it starts.
        for config in (BenchConfig(servers=(bound.client_address,), ops=10, value_size=20 << 20),
                       BenchConfig(servers=(bound.client_address,), ops=10, mget=51)):  # fmt: skip
            with pytest.raises(ValueError, match="over the node's limit"):
                await run_bench(config)


async def test_a_batch_over_the_frame_limit_is_refused_before_it_is_sent(nursery: trio.Nursery) -> None:
    from dcache.errors import RequestError

    node = Node(NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0", limits=codec.Limits(max_frame_bytes=100_000)))
    bound = await nursery.start(node.run)
    with trio.fail_after(20):
        async with dcache.connect(bound.client_address) as client:
            with pytest.raises(RequestError) as refused:
                await client.mset({f"k{i}": b"x" * 1000 for i in range(200)})
            assert refused.value.code == codec.ErrorCode.FRAME_TOO_LARGE
            with pytest.raises(RequestError):
                await client.mget([f"{i:0>1000}" for i in range(200)])
            await client.set("k", "v")  # the connection is still good
            assert await client.get("k") == b"v"


# -- the bench and users' data ----------------------------------------------------


async def _node(nursery: trio.Nursery, **limits: int) -> str:
    node = Node(NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0", limits=codec.Limits(**limits)))
    return (await nursery.start(node.run)).client_address


async def test_bench_leaves_a_users_keys_of_the_same_names_alone(nursery: trio.Nursery) -> None:
    from dcache.bench import run_bench

    address = await _node(nursery)
    with trio.fail_after(20):
        async with dcache.connect(address) as client:
            await client.set("key:1", "the user's")
            await run_bench(BenchConfig(servers=(address,), clients=4, ops=500, keys=100, sets=1, gets=1, prefill=True))
            assert await client.get("key:1") == b"the user's"
            assert (await client.stats())["keys"] == 1


async def test_bench_deletes_its_keys_in_batches_the_node_takes(nursery: trio.Nursery) -> None:
    from dcache.bench import DEFAULT_NS, run_bench

    # 500 keys of up to 7 bytes: a 2000-byte frame takes fewer than 100 of them, so cleanup needs many requests.
    address = await _node(nursery, max_frame_bytes=2000, max_batch=80)
    progress: list[tuple[int, int]] = []
    with trio.fail_after(20):
        result = await run_bench(
            BenchConfig(servers=(address,), clients=4, ops=500, keys=500, sets=1, gets=1, value_size=10, prefill=True),
            on_cleanup_progress=lambda swept, total: progress.append((swept, total)),
        )
        async with dcache.connect(address) as client:
            assert (await client.stats())["keys"] == 0
    assert not any(s.errors for s in result.summaries)
    assert result.removed_keys == 500 and result.cleanup_error is None
    assert result.as_dict()["removed_keys"] == 500 and result.as_dict()["ns"] == DEFAULT_NS
    assert progress[0] == (0, 500) and progress[-1] == (500, 500) and len(progress) > 5
    assert [swept for swept, _ in progress] == sorted(swept for swept, _ in progress)


async def test_bench_keeps_its_keys_when_asked_in_the_namespace_asked(nursery: trio.Nursery) -> None:
    from dcache.bench import run_bench

    address = await _node(nursery)
    with trio.fail_after(20):
        result = await run_bench(BenchConfig(servers=(address,), clients=4, ops=200, keys=50, prefill=True, keep=True, ns="mine"))
        async with dcache.connect(address) as client:
            assert (await client.stats())["keys"] == 50
            assert None not in await client.mget([f"key:{i}" for i in range(50)], ns="mine")
            assert await client.get("key:1") is None
    assert result.removed_keys == 0


async def test_a_run_cut_short_by_its_time_limit_still_cleans_up(nursery: trio.Nursery) -> None:
    from dcache.bench import MAX_OPS, run_bench

    address = await _node(nursery)
    with trio.fail_after(30):
        result = await run_bench(BenchConfig(servers=(address,), clients=4, ops=MAX_OPS, keys=300, prefill=True, time_limit=0.3))
        async with dcache.connect(address) as client:
            assert (await client.stats())["keys"] == 0
    assert result.ops < MAX_OPS
    assert result.removed_keys == 300


async def test_a_run_cancelled_or_failing_midway_still_cleans_up(nursery: trio.Nursery) -> None:
    from dcache.bench import run_bench

    address = await _node(nursery)
    # Several cleanup requests: a cleanup not shielded from the cancellation would send at most the first.
    config = BenchConfig(servers=(address,), clients=4, ops=20_000_000, keys=3500, prefill=True)
    with trio.fail_after(30):
        async with dcache.connect(address) as client:
            with trio.CancelScope() as caller:  # as Ctrl-C in the CLI, or a caller's deadline

                def cancel_once_running(done: int) -> None:
                    if done:
                        caller.cancel()

                await run_bench(config, on_progress=cancel_once_running)
            assert caller.cancelled_caught
            assert (await client.stats())["keys"] == 0

            def fail_once_running(done: int) -> None:
                if done:
                    raise RuntimeError("the caller's own error")

            with pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="the caller's own error"), flatten_subgroups=True):
                await run_bench(config, on_progress=fail_once_running)
            assert (await client.stats())["keys"] == 0


async def _node_to_lose(nursery: trio.Nursery) -> tuple[str, trio.CancelScope]:
    """A node, and the scope whose cancellation stops it dead (its connections closed)."""
    node = Node(NodeConfig(client_listen="127.0.0.1:0", listen="127.0.0.1:0"))
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[BoundAddresses] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await node.run(task_status=task_status)

    return (await nursery.start(run)).client_address, scope


async def test_a_lost_node_neither_hangs_the_cleanup_nor_hides_the_error(nursery: trio.Nursery) -> None:
    from dcache.bench import run_bench

    # The run went well, the node is lost as cleanup starts: the figures stand, and the result says what happened.
    address, node = await _node_to_lose(nursery)
    with trio.fail_after(20):
        result = await run_bench(
            BenchConfig(servers=(address,), clients=4, ops=300, keys=100, prefill=True),
            on_cleanup_progress=lambda swept, total: node.cancel(),
        )
    assert result.ops == 300 and result.removed_keys == 0
    assert result.cleanup_error is not None and "lost the connection" in result.cleanup_error
    assert result.as_dict()["cleanup_error"] == result.cleanup_error

    # The run fails and the node is lost with it: its error is the one raised, not the cleanup's.
    address, node = await _node_to_lose(nursery)

    def fail_and_lose_the_node(done: int) -> None:
        if done:
            node.cancel()
            raise RuntimeError("the caller's own error")

    failed = pytest.RaisesGroup(pytest.RaisesExc(RuntimeError, match="the caller's own error"), flatten_subgroups=True)
    with trio.fail_after(20), failed:
        await run_bench(BenchConfig(servers=(address,), clients=4, ops=20_000_000, keys=100), on_progress=fail_and_lose_the_node)


async def test_a_bench_spread_over_processes_joins_their_figures(nursery: trio.Nursery) -> None:
    """--processes: each process has its share of the tasks and operations and
    connections of its own; the figures are joined (percentiles over every
    request), and the bench still cleans up after itself."""
    from dcache.bench import run_bench

    address = await _node(nursery)
    config = BenchConfig(servers=(address,), clients=4, ops=400, sets=1, gets=1, keys=50, processes=2)
    seen: list[int] = []
    with trio.fail_after(60):
        result = await run_bench(config, on_progress=seen.append)
    assert result.ops == 400
    assert sum(s.count for s in result.summaries) == 400
    assert all(s.errors == 0 for s in result.summaries)
    assert result.as_dict()["processes"] == 2
    assert result.removed_keys > 0  # what the processes wrote, removed by the bench
    async with await dcache.Client.connect(address) as client:
        assert await client.mget([f"key:{i}" for i in range(50)], ns=config.ns) == [None] * 50
    with pytest.raises(ValueError, match="--processes"):
        BenchConfig(servers=(address,), clients=2, processes=3)
