"""The one-shot CLI against a real `dcache serve` subprocess."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import ServeProcess

DCACHE = [sys.executable, "-m", "dcache"]


@pytest.fixture(scope="module")
def server() -> Iterator[ServeProcess]:
    proc = ServeProcess()
    yield proc
    proc.stop()


def dcache(
    *args: str, server: ServeProcess | None = None, stdin: bytes | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    full_env = {**os.environ, **(env or {})}
    if server is not None:
        full_env["DCACHE_SERVER"] = server.client_address
    return subprocess.run([*DCACHE, *args], input=stdin, capture_output=True, timeout=20, env=full_env)


def test_set_get_delete_as_the_readme_shows(server: ServeProcess) -> None:
    r = dcache("set", "user:1001", "Alice", server=server)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"OK\n", b"")
    r = dcache("get", "user:1001", server=server)
    assert (r.returncode, r.stdout) == (0, b"Alice")
    started = time.monotonic()
    r = dcache("set", "session:abc", "active", "--ttl", "60", server=server)
    assert r.returncode == 0
    r = dcache("ttl", "session:abc", server=server)
    # As many seconds have gone as the two commands took, however busy the machine.
    elapsed = time.monotonic() - started
    assert r.returncode == 0 and re.fullmatch(rb"\d+ s\n", r.stdout), r.stdout
    assert 60 - elapsed - 1 <= int(r.stdout.split()[0]) <= 60
    r = dcache("delete", "user:1001", server=server)
    assert r.returncode == 0
    r = dcache("delete", "user:1001", server=server)
    assert r.returncode == 1
    r = dcache("get", "user:1001", server=server)
    assert (r.returncode, r.stdout) == (1, b"")
    assert b"not found" in r.stderr


def test_server_flag_beats_environment(server: ServeProcess) -> None:
    r = dcache("set", "k", "v", "--server", server.client_address, env={"DCACHE_SERVER": "127.0.0.1:1"})
    assert r.returncode == 0


def test_values_pipe_in_and_out_as_bytes(server: ServeProcess) -> None:
    blob = bytes(range(256)) * 40
    assert dcache("set", "blob", server=server, stdin=blob).returncode == 0
    assert dcache("get", "blob", server=server).stdout == blob
    assert dcache("set", "blob2", "-", server=server, stdin=b"from stdin\n").returncode == 0
    assert dcache("get", "blob2", server=server).stdout == b"from stdin\n"


def test_json_output(server: ServeProcess) -> None:
    dcache("set", "j", "héllo", server=server)
    r = dcache("get", "j", "--json", server=server)
    got = json.loads(r.stdout)
    assert got == {"key": "j", "found": True, "value": "héllo", "version": got["version"], "ttl": None}
    assert type(got["version"]) is int and got["version"] > 0
    dcache("set", "bin", server=server, stdin=b"\xff\x00")
    assert json.loads(dcache("get", "bin", "--json", server=server).stdout)["value_base64"] == "/wA="
    r = dcache("get", "absent", "--json", server=server)
    assert r.returncode == 1 and json.loads(r.stdout) == {"key": "absent", "found": False}
    r = dcache("stats", "--json", server=server)
    stats = json.loads(r.stdout)
    for field in ("hits", "misses", "keys", "sets", "deletes", "expired", "memory_bytes", "process_memory_bytes"):
        assert isinstance(stats[field], int), field
    r = dcache("delete", "j", "nope", "--json", server=server)
    assert json.loads(r.stdout) == {"keys": ["j", "nope"], "deleted": 1}


def test_stats_plain_when_piped(server: ServeProcess) -> None:
    dcache("get", "stats-miss", server=server)
    r = dcache("stats", server=server)
    assert r.returncode == 0
    lines = dict(line.split("\t") for line in r.stdout.decode().splitlines())
    assert int(lines["misses"]) >= 1 and "keys" in lines and "memory_bytes" in lines


def test_unreachable_server_is_one_line_and_exit_2() -> None:
    for args in (["get", "k"], ["set", "k", "v"], ["delete", "k"], ["stats"]):
        r = dcache(*args, "--server", "127.0.0.1:1")
        assert r.returncode == 2
        assert r.stdout == b""
        assert r.stderr.count(b"\n") == 1 and b"cannot connect" in r.stderr, r.stderr
        assert b"Traceback" not in r.stderr


def test_wrong_kind_of_server_is_one_line(server: ServeProcess) -> None:
    import socket
    import threading

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def answer_http() -> None:
            conn, _ = listener.accept()
            conn.recv(4096)
            conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
            conn.close()

        thread = threading.Thread(target=answer_http, daemon=True)
        thread.start()
        r = dcache("get", "k", "--server", f"127.0.0.1:{port}")
        thread.join(5)
    assert r.returncode == 2
    assert r.stderr.count(b"\n") == 1 and b"Traceback" not in r.stderr


def test_user_mistakes_get_usage_errors_not_tracebacks(server: ServeProcess) -> None:
    for args in (
        ["get"],
        ["set", "k", "v", "--ttl", "abc"],
        ["set", "k", "v", "--ttl", "-5"],
        ["nosuchcommand"],
        ["get", "k", "--server", "host:notaport"],
    ):
        r = dcache(*args, server=server)
        assert r.returncode == 2, args
        assert r.stderr.startswith(b"error: ") and r.stderr.count(b"\n") == 1, r.stderr
    r = dcache("get", "", server=server)
    assert r.returncode == 2 and b"Traceback" not in r.stderr
    r = dcache("serve", "--busy-poll-us", "-1")
    assert r.returncode == 2 and b"--busy-poll-us" in r.stderr and b"Traceback" not in r.stderr
    # A garbled setting in the environment is ignored with a warning, wherever it is read.
    r = dcache("get", "no-such-key", server=server, env={"DCACHE_BUSY_POLL_US": "fast"})
    assert r.returncode == 1 and b"ignoring DCACHE_BUSY_POLL_US" in r.stderr and b"Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["set", "k", "v", "--ttl", "inf"],
        ["set", "k", "v", "--ttl", "1e308"],
        ["get", "k", "--timeout", "inf"],
        ["shell", "--timeout", "1e308"],
        ["bench", "--ttl", "nan", "--ops", "10"],
        ["serve", "--lease-ttl", "inf"],
        ["serve", "--lease-ttl", "nan"],
        ["bench", "--time-limit", "nan"],
        ["serve", "--client-listen", "localhost:99999"],
        ["serve", "--listen", "localhost:x"],
        ["serve", "--advertise", "localhost:x"],
        ["serve", "--metrics-listen", ""],
        ["serve", "--etcd", "foo://bar", "--client-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"],
        ["serve", "--etcd", "http://127.0.0.1:abc", "--client-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"],
        ["cluster", "up", "--client-port", "70000"],
        ["cluster", "up", "--log-level", "bogus"],
        ["cluster", "up", "--nodes", "2", "--client-port", "38100", "--peer-port", "38101"],
    ],
)
def test_out_of_range_numbers_and_addresses_are_usage_errors(args: list[str], server: ServeProcess) -> None:
    r = dcache(*args, server=server)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(b"error: ") and r.stderr.count(b"\n") == 1, r.stderr


def start_bench(address: str) -> subprocess.Popen[bytes]:
    """A long `dcache bench` against ``address``, returned once it is under way."""
    import dcache

    with dcache.SyncClient(address) as client:
        before = client.stats()["misses"]
        bench = subprocess.Popen(
            [*DCACHE, "bench", "--server", address, "--ops", "10000000", "--clients", "5", "--ratio", "0:1", "--time-limit", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while client.stats()["misses"] < before + 1000:
            assert time.monotonic() < deadline and bench.poll() is None
            time.sleep(0.05)
    return bench


def test_bench_says_when_its_node_goes_away() -> None:
    node = ServeProcess()
    try:
        bench = start_bench(node.client_address)
        node.proc.kill()
        _, err = bench.communicate(timeout=30)
    finally:
        node.stop()
    assert bench.returncode == 2, err
    assert err.startswith(b"error: ") and b"Traceback" not in err


def test_bench_stops_on_ctrl_c(server: ServeProcess) -> None:
    bench = start_bench(server.client_address)
    bench.send_signal(signal.SIGINT)
    try:
        _, err = bench.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        bench.send_signal(signal.SIGABRT)  # with PYTHONFAULTHANDLER: where it hangs
        raise AssertionError(bench.communicate()[1].decode(errors="replace")[-5000:]) from None
    assert bench.returncode == 130
    assert b"Traceback" not in err


def test_too_large_value_is_refused_with_exit_3(server: ServeProcess) -> None:
    r = dcache("set", "big", server=server, stdin=b"x" * (16 * 1024 * 1024 + 1))
    assert r.returncode == 3
    assert r.stderr.startswith(b"error: value_too_large: value of ") and r.stderr.count(b"\n") == 1, r.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly_within_a_second(signum: int) -> None:
    node = ServeProcess()
    try:
        assert dcache("set", "k", "v", "--server", node.client_address).returncode == 0
        started = time.monotonic()
        node.proc.send_signal(signum)
        assert node.proc.wait(5) == 0
        assert time.monotonic() - started < 1.0
        log = node.output()
        assert "Traceback" not in log and "shutting down" in log
    finally:
        node.stop()


def test_serve_with_port_in_use_says_so() -> None:
    node = ServeProcess()
    try:
        host, port = node.client_address.rsplit(":", 1)
        r = subprocess.run(
            [*DCACHE, "serve", "--client-listen", node.client_address, "--listen", "127.0.0.1:0"], capture_output=True, timeout=20
        )
        assert r.returncode == 2
        assert b"already in use" in r.stderr and b"Traceback" not in r.stderr
    finally:
        node.stop()


def test_help_and_version() -> None:
    r = dcache("--help")
    assert r.returncode == 0
    for command in (b"get", b"set", b"delete", b"stats", b"serve"):
        assert command in r.stdout
    r = dcache("--version")
    assert r.returncode == 0 and r.stdout.startswith(b"dcache ")


def test_bench_reports_what_it_did(server: ServeProcess) -> None:
    r = dcache("bench", "--ops", "600", "--clients", "4", "--ratio", "1:2", "--keys", "50", "--prefill", "--json", server=server)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ops"] == 600
    by_op = report["by_op"]
    assert by_op["set"]["count"] + by_op["get"]["count"] == 600
    assert 100 < by_op["set"]["count"] < 300  # one in three, give or take
    assert by_op["get"]["misses"] == 0 and by_op["get"]["errors"] == 0  # prefilled
    for op in by_op.values():
        assert 0 < op["p50_ms"] <= op["p99_ms"] <= op["p99.9_ms"] <= op["max_ms"]
    r = dcache("bench", "--ops", "200", "--pipeline", "10", "--mget", "5", "--ratio", "0:1", "--json", server=server)
    report = json.loads(r.stdout)
    assert report["by_op"]["get"]["count"] == 200 and "set" not in report["by_op"]
    r = dcache("bench", "--ratio", "nonsense", server=server)
    assert r.returncode == 2 and b"--ratio" in r.stderr and b"Traceback" not in r.stderr


def test_cluster_stats_shows_an_unreachable_node_as_unknown_not_zero() -> None:
    from dcache import commands

    class Client:
        def members(self) -> dict:
            up = {
                "keys": 5,
                "hits": 3,
                "misses": 1,
                "sets": 5,
                "deletes": 0,
                "expired": 0,
                "data_bytes": 50,
                "memory_bytes": 2048,
            }
            return {
                "epoch": 7,
                "members": [
                    {"node": "a:1", "state": "up", "stats": up},
                    {"node": "b:1", "state": "unreachable", "stats": {}},
                ],
            }

    outcome = commands.cluster_stats(Client())  # type: ignore[arg-type]
    down = outcome.data["nodes"][1]
    assert down["keys"] is None and down["memory_bytes"] is None and down["hit_ratio"] is None
    assert outcome.data["total"]["keys"] == 5
    assert outcome.table is not None and outcome.table.rows[1][2:] == ("-",) * 9
    assert outcome.stdout is not None and "b:1\tunreachable\t-\t-" in outcome.stdout
    assert outcome.note == "unreachable: b:1"


def test_etcd_endpoints_are_checked_at_start() -> None:
    from dcache.membership import MembershipError, parse_endpoint

    assert parse_endpoint("http://127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert parse_endpoint("etcd.local") == ("etcd.local", 2379)
    assert parse_endpoint("https://127.0.0.1:2380") == ("127.0.0.1", 2380)
    for bad in ("foo://bar", "http://127.0.0.1:abc", "http://"):
        with pytest.raises(MembershipError):
            parse_endpoint(bad)


def test_serve_stops_at_once_while_etcd_keeps_it_waiting() -> None:
    import socket

    with socket.socket() as hole:  # takes connections, never answers: a hung etcd
        hole.bind(("127.0.0.1", 0))
        hole.listen()
        hole.settimeout(20)
        node = subprocess.Popen(
            [*DCACHE, "serve", "--client-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0", "--etcd", f"http://127.0.0.1:{hole.getsockname()[1]}"],
            stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            conn, _ = hole.accept()  # the node is asking etcd, and will wait 5 s for it
            node.send_signal(signal.SIGINT)
            assert node.wait(3) == 0
            conn.close()
        finally:
            if node.poll() is None:
                node.kill()
            _, err = node.communicate()
    assert b"shutting down" in err and b"Traceback" not in err


def test_output_errors_are_one_line(server: ServeProcess) -> None:
    r = dcache("get", "", "--json", server=server)
    assert r.returncode == 2 and json.loads(r.stdout)["error"] == "bad_input"
    assert dcache("set", "k", "v", server=server).returncode == 0
    with open("/dev/full", "wb") as full:
        r = subprocess.run(
            [*DCACHE, "get", "k", "--server", server.client_address], stdout=full, stderr=subprocess.PIPE, timeout=20
        )
    assert r.returncode == 2
    assert r.stderr.startswith(b"error: ") and b"Traceback" not in r.stderr


def test_a_binary_value_is_shown_escaped_on_a_terminal(server: ServeProcess) -> None:
    import pty

    assert dcache("set", "bin", server=server, stdin=b"\x00\xffraw").returncode == 0
    assert dcache("get", "bin", server=server).stdout == b"\x00\xffraw"  # piped: the raw bytes
    leader, follower = pty.openpty()
    try:
        r = subprocess.run(
            [*DCACHE, "get", "bin", "--server", server.client_address], stdout=follower, stderr=subprocess.PIPE, timeout=20
        )
        shown = os.read(leader, 1000)
    finally:
        os.close(leader)
        os.close(follower)
    assert r.returncode == 0
    assert shown.strip() == b"b'\\x00\\xffraw'"
    assert b"not text" in r.stderr
    # A big one shows its first KiB, escaped, and says how big it is.
    assert dcache("set", "big", server=server, stdin=b"\xff" * 100_000).returncode == 0
    leader, follower = pty.openpty()
    try:
        r = subprocess.run(
            [*DCACHE, "get", "big", "--server", server.client_address], stdout=follower, stderr=subprocess.PIPE, timeout=20
        )
        shown = b""
        while not shown.endswith(b"\n"):
            shown += os.read(leader, 65536)
    finally:
        os.close(leader)
        os.close(follower)
    assert shown.startswith(b"b'\\xff") and shown.rstrip().endswith(b"' \xe2\x80\xa6") and len(shown) < 5000
    assert b"100,000 bytes, not text" in r.stderr


def test_one_shot_commands_load_no_event_loop(server: ServeProcess) -> None:
    """`dcache get` runs on the blocking client: trio (and typer, pydantic and
    rich, which cost start-up time) are never imported."""
    probe = (
        "import atexit, sys; "
        "atexit.register(lambda: print('loaded:', sorted(m for m in ('trio', 'typer', 'pydantic', 'rich') if m in sys.modules), file=sys.stderr)); "
        "sys.argv = ['dcache', *sys.argv[1:]]; "
        "from dcache.cli import main; main()"
    )
    for args in (["set", "k", "v"], ["get", "k"], ["get", "absent"], ["delete", "k"], ["ttl", "k"], ["ping"], ["stats"]):
        r = subprocess.run(
            [sys.executable, "-c", probe, *args],
            capture_output=True,
            timeout=20,
            env={**os.environ, "DCACHE_SERVER": server.client_address},
        )
        assert b"loaded: []" in r.stderr, (args, r.stderr)


def test_keys_and_values_in_messages_cannot_break_the_line_or_drive_the_terminal(server: ServeProcess) -> None:
    for args in (
        ["get", "a\nb\x1b[31m"],
        ["ttl", "a\nb\x1b[31m"],
        ["set", "k", "v", "--ttl", "1\n\x1b[2J"],
        ["delete", "x\u202ey"],
    ):
        r = dcache(*args, server=server)
        assert r.returncode in (1, 2), r
        assert r.stderr.count(b"\n") == 1 and b"\x1b" not in r.stderr and "\u202e".encode() not in r.stderr, r.stderr
    r = dcache("get", "a\nb\x1b[31m", server=server)
    assert r.stderr == b"a\\nb\\x1b[31m: not found\n"


def test_help_reads_as_help() -> None:
    r = dcache("--help")
    assert r.returncode == 0 and b"<bool>" not in r.stdout
    r = dcache("set", "--help")
    text = r.stdout.decode()
    assert "Usage: dcache set [OPTIONS] KEY [VALUE]" in text
    assert "--json " in text and "--json <bool>" not in text and "<bool>" not in text
    assert "read from stdin" in text
    r = dcache("serve", "--help")
    text = r.stdout.decode()
    assert "[default: 1000;" in text and "1000.0" not in text
    r = dcache("bench", "--help")
    assert b"range>" not in r.stdout and b"<int" not in r.stdout
    r = dcache("set", "k", "v", "--ttl", "nan", "--server", "127.0.0.1:1")
    assert r.returncode == 2 and b"'nan' is not a number of seconds above 0 up to 100 years" in r.stderr, r.stderr


def test_completion_scripts_come_from_the_command(tmp_path: Path) -> None:
    r = dcache("completion", "bash")
    assert r.returncode == 0 and b"_DCACHE_COMPLETE" in r.stdout
    r = dcache("completion", "tcsh")
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1
    r = dcache("completion", "--write", str(tmp_path / "out"))
    assert r.returncode == 0 and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_dcache", "dcache.bash", "dcache.fish"]


def test_bench_leaves_your_keys_alone_and_nothing_behind(server: ServeProcess) -> None:
    assert dcache("set", "key:1", "mine", server=server).returncode == 0
    keys_before = json.loads(dcache("stats", "--json", server=server).stdout)["keys"]
    r = dcache("bench", "--ops", "300", "--clients", "3", "--keys", "20", "--ratio", "1:1", server=server)
    assert r.returncode == 0, r.stderr
    assert b"removed the" in r.stderr and b"'dcache-bench'" in r.stderr
    assert dcache("get", "key:1", server=server).stdout == b"mine"
    assert json.loads(dcache("stats", "--json", server=server).stdout)["keys"] == keys_before
    r = dcache("bench", "--ops", "50", "--keys", "5", "--ratio", "1:0", "--ns", "kept", "--keep", "--json", server=server)
    assert r.returncode == 0 and json.loads(r.stdout)["removed_keys"] == 0
    assert json.loads(dcache("stats", "--json", server=server).stdout)["keys"] > keys_before


def test_an_etcd_that_cannot_be_reached_says_why_in_its_own_time() -> None:
    """A name that does not resolve fails at once and says so; it does not
    claim to have waited the connect timeout."""
    started = time.monotonic()
    r = dcache("serve", "--etcd", "no-such-etcd.invalid", "--client-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0")
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1, r.stderr
    assert r.stderr.startswith(b"error: cannot reach etcd at no-such-etcd.invalid: ")
    if time.monotonic() - started < 4:  # (a resolver that hangs is told apart by the timeout instead)
        assert b"within" not in r.stderr, r.stderr


def test_set_with_stdin_closed_says_what_to_give(server: ServeProcess) -> None:
    r = subprocess.run(
        ["sh", "-c", f'exec "{sys.executable}" -m dcache set k --server {server.client_address} <&-'],
        capture_output=True,
        timeout=20,
    )
    assert r.returncode == 2 and r.stderr == b"error: give a VALUE, or pipe it on stdin\n", r.stderr


def test_bench_in_several_processes(server: ServeProcess) -> None:
    r = dcache("bench", "--processes", "2", "--clients", "4", "--ops", "2000", "--keys", "50", "--json", server=server)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["processes"] == 2 and report["ops"] == 2000 and report["removed_keys"] > 0
    # Ctrl-C stops the processes too, with no traceback from any of them.
    bench = subprocess.Popen(
        [*DCACHE, "bench", "--server", server.client_address, "--processes", "2", "--clients", "4", "--ops", "10000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    time.sleep(3)  # (the processes start; the load is under way)
    bench.send_signal(signal.SIGINT)
    _, err = bench.communicate(timeout=60)
    assert bench.returncode == 130 and b"Traceback" not in err, err


def test_where_names_no_leaving_node_as_the_owner() -> None:
    """A leaving node owns nothing (it hands its shards over): `where` names
    the owner among the others, as the nodes place keys."""
    from dcache import commands
    from dcache.shard import ShardMap, shard_of

    members = ["a:1", "b:1", "c:1"]
    key = next(f"k{i}" for i in range(10_000) if ShardMap.build(0, members).owner("", f"k{i}".encode()) == "c:1")

    class Client:
        def members(self) -> dict[str, object]:
            state = {"a:1": "ready", "b:1": "ready", "c:1": "leaving"}
            return {
                "epoch": 5,
                "members": [{"node": m, "client": m, "state": "up", "stats": {"state": state[m]}} for m in members],
            }

        def ttl(self, key: str, ns: str = "") -> None:
            return None

    outcome = commands.where(Client(), key=key)  # type: ignore[arg-type]
    assert outcome.data["owner"] == ShardMap.build(0, ["a:1", "b:1"]).owner("", key.encode())
    assert outcome.data["shard"] == shard_of("", key.encode())


def test_watch_prints_each_change_until_interrupted(server: ServeProcess) -> None:
    env = {**os.environ, "DCACHE_SERVER": server.client_address}
    watch = subprocess.Popen([*DCACHE, "watch", "wt:"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 15
        lines: list[bytes] = []
        assert watch.stdout is not None
        os.set_blocking(watch.stdout.fileno(), False)
        wanted = {b"set\twt:a\n", b"set\twt:b\n", b"delete\twt:b\n"}
        while not wanted <= set(lines):  # (the watch may start after the first writes: write until seen)
            assert time.monotonic() < deadline, lines
            dcache("set", "wt:a", "1", server=server)
            dcache("set", "other", "1", server=server)
            dcache("delete", "wt:b", server=server)
            dcache("set", "wt:b", "2", server=server)
            dcache("delete", "wt:b", server=server)
            time.sleep(0.2)
            lines.extend(line + b"\n" for line in (watch.stdout.read() or b"").splitlines())
        assert set(lines) == wanted  # not "other"
        watch.send_signal(signal.SIGINT)
        assert watch.wait(10) == 130
        assert watch.stderr is not None and b"Traceback" not in watch.stderr.read()
    finally:
        watch.kill()
        watch.wait()
