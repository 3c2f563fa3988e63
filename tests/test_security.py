"""Who may connect: client, read-only and peer tokens, TLS and mutual TLS,
connection limits and the hello deadline.

Real components throughout: nodes in this process (trio) and as `dcache serve`
processes, the one-shot CLI, certificates made at run time with trustme, and a
real etcd for the two-node clusters.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cbor2
import pytest
import trio
import trustme
from support import LEASE_TTL, ServeProcess, http_get, start_node

import dcache
from dcache import codec, transport, wsframe
from dcache.codec import ErrorCode
from dcache.localcluster import EtcdServer
from dcache.node import BoundAddresses, Node

TIMEOUT = 15  # bounds every I/O test; nothing here should take more than a few seconds
T = TypeVar("T")

# Fresh for each run, so that finding one in a log means it was written there.
CLIENT_TOKEN = f"client-{secrets.token_hex(16)}"
READ_TOKEN = f"read-{secrets.token_hex(16)}"
PEER_TOKEN = f"peer-{secrets.token_hex(16)}"
WRONG_TOKEN = f"wrong-{secrets.token_hex(16)}"
ALL_TOKENS = (CLIENT_TOKEN, READ_TOKEN, PEER_TOKEN, WRONG_TOKEN)

# Options a runner's environment might hold that would change what a command does.
_ACCESS_ENV = ("DCACHE_SERVER", "DCACHE_TOKEN", "DCACHE_TOKEN_FILE", "DCACHE_CA", "DCACHE_CLIENT_CERT", "DCACHE_CLIENT_KEY")


# -- helpers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Files made by trustme: a CA, the nodes' certificate chain and key
    (for 127.0.0.1 and localhost), a client certificate from the same CA, and
    another CA with a client certificate of its own."""

    ca: str
    cert: str
    key: str
    client_cert: str
    client_key: str
    other_ca: str
    other_cert: str
    other_key: str

    def node_options(self) -> list[str]:
        return ["--tls-cert", self.cert, "--tls-key", self.key]

    def node_config(self) -> dict[str, Any]:
        return {"tls_cert": self.cert, "tls_key": self.key}

    def context(self) -> ssl.SSLContext:
        return dcache.tls_context(ca=self.ca)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")

    def path(name: str) -> str:
        return str(folder / name)

    ca = trustme.CA()
    ca.cert_pem.write_to_path(path("ca.pem"))
    node = ca.issue_cert("127.0.0.1", "localhost")
    Path(path("chain.pem")).write_bytes(b"".join(pem.bytes() for pem in node.cert_chain_pems))
    node.private_key_pem.write_to_path(path("key.pem"))
    client = ca.issue_cert("client@example.org")
    client.cert_chain_pems[0].write_to_path(path("client.pem"))
    client.private_key_pem.write_to_path(path("client-key.pem"))
    other = trustme.CA()
    other.cert_pem.write_to_path(path("other-ca.pem"))
    stranger = other.issue_cert("client@example.org")
    stranger.cert_chain_pems[0].write_to_path(path("other.pem"))
    stranger.private_key_pem.write_to_path(path("other-key.pem"))
    return Pki(
        ca=path("ca.pem"),
        cert=path("chain.pem"),
        key=path("key.pem"),
        client_cert=path("client.pem"),
        client_key=path("client-key.pem"),
        other_ca=path("other-ca.pem"),
        other_cert=path("other.pem"),
        other_key=path("other-key.pem"),
    )


@dataclass(frozen=True)
class TokenFiles:
    client: str
    read: str
    peer: str
    wrong: str  # a well-formed token no node accepts


@pytest.fixture(scope="module")
def token_files(tmp_path_factory: pytest.TempPathFactory) -> TokenFiles:
    folder = tmp_path_factory.mktemp("tokens")
    files = {}
    for name, token in (("client", CLIENT_TOKEN), ("read", READ_TOKEN), ("peer", PEER_TOKEN), ("wrong", WRONG_TOKEN)):
        (folder / name).write_text(f"# {name} token\n{token}\n")
        files[name] = str(folder / name)
    return TokenFiles(**files)


def cli(server: str, *args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """A `dcache` command against ``server`` (--server), with none of the
    runner's access settings."""
    full_env = {k: v for k, v in os.environ.items() if k not in _ACCESS_ENV}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "dcache", *args, "--server", server],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
    )


def eventually(attempt: Callable[[], T | None], *, within: float = TIMEOUT, what: str = "") -> T:
    """Call ``attempt`` until it returns something other than None (a blocking poll with a deadline)."""
    deadline = time.monotonic() + within
    while True:
        result = attempt()
        if result is not None:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.1)


async def raw_connection(address: str, tls: ssl.SSLContext | None = None) -> transport.Connection:
    """A WebSocket connection that has said nothing yet."""
    return await transport.connect(address, max_message=1 << 26, default_port=0, tls=tls)


async def everything_until_closed(
    conn: transport.Connection, *, patience: float = math.inf
) -> tuple[list[list[Any]], int | None]:
    """Read the socket to its end (or for ``patience`` seconds): the replies
    that came, and the code of the node's close frame (None if none came).
    Read under the protocol layer, so that a reply that comes with the close
    frame counts."""
    parser = wsframe.FrameParser(expect_masked=False, max_message=1 << 26)
    replies: list[list[Any]] = [reply for payload in conn.take_ready() for reply in cbor2.loads(payload)]
    code = None
    while True:
        data = b""
        with trio.move_on_after(patience):
            try:
                data = await conn.stream.receive_some(65536)
            except trio.BrokenResourceError:
                pass
        if not data:
            break
        for item in parser.feed(bytes(data)):
            if isinstance(item, bytes):
                replies.extend(cbor2.loads(item))
            elif item.opcode == wsframe.OP_CLOSE:
                code = item.close_info()[0]
    return replies, code


async def call(conn: transport.Connection, messages: list[Any]) -> list[Any]:
    await conn.send(codec.encode_frame(messages))
    replies: list[Any] = []
    while len(replies) < len(messages):
        for payload in await conn.receive():
            replies.extend(cbor2.loads(payload))
    return replies


def hello(token: str | None = None, **more: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"version": codec.PROTOCOL_VERSION, "client": "test", **more}
    if token is not None:
        args["token"] = token
    return args


async def wait_until_ready(nodes: list[Node], members: int) -> None:
    """Until each node sees ``members`` members and serves its own shards."""
    while not all(
        len(n.router.shard_map.members) == members
        and n.readiness()[0] == "ready"
        and not (n.placement.outgoing or n.placement.sending)
        for n in nodes
    ):
        await trio.sleep(0.05)


def key_owned_by(node: Node, owner: str) -> str:
    """A key that ``node``'s shard map places on ``owner``."""
    for i in range(10_000):
        if node.router.shard_map.owner("", f"key:{i}".encode()) == owner:
            return f"key:{i}"
    raise AssertionError(f"{node.node_id} places no key on {owner}")


# == 1. tokens through `dcache serve` and the CLI ========================================


@pytest.fixture(scope="module")
def guarded_serve(token_files: TokenFiles) -> Iterator[ServeProcess]:
    """A `dcache serve` that wants client tokens, has read-only ones, and a peer
    token; it logs at debug level, so that a token logged anywhere is found."""
    with ServeProcess(
        "--auth-token-file",
        token_files.client,
        "--read-token-file",
        token_files.read,
        "--peer-token-file",
        token_files.peer,
        "--log-level",
        "debug",
    ) as node:
        yield node


def test_cli_without_the_right_token_is_refused(guarded_serve: ServeProcess, token_files: TokenFiles) -> None:
    server = guarded_serve.client_address
    assert cli(server, "set", "guarded", "secret", "--token-file", token_files.client).returncode == 0
    for refused in (
        cli(server, "get", "guarded"),
        cli(server, "get", "guarded", "--token-file", token_files.wrong),
        cli(server, "get", "guarded", env={"DCACHE_TOKEN": WRONG_TOKEN}),
    ):
        assert refused.returncode != 0 and refused.stdout == "", refused
        assert "unauthorized" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_cli_refused_for_its_token_exits_3_with_the_nodes_reason(guarded_serve: ServeProcess, token_files: TokenFiles) -> None:
    server = guarded_serve.client_address
    # Several tries: whether the reply and the close frame are read together is a race the client should not lose.
    for _ in range(3):
        missing = cli(server, "get", "guarded")
        assert (missing.returncode, missing.stdout) == (3, ""), missing
        assert missing.stderr.startswith("error: unauthorized: this node needs a token"), missing.stderr
        wrong = cli(server, "get", "guarded", "--token-file", token_files.wrong)
        assert (wrong.returncode, wrong.stderr) == (3, "error: unauthorized: the token was not accepted\n"), wrong


def test_cli_with_the_right_token_from_a_file_or_the_environment(guarded_serve: ServeProcess, token_files: TokenFiles) -> None:
    server = guarded_serve.client_address
    r = cli(server, "set", "from-file", "v1", "--token-file", token_files.client)
    assert (r.returncode, r.stdout, r.stderr) == (0, "OK\n", ""), r
    r = cli(server, "get", "from-file", env={"DCACHE_TOKEN": CLIENT_TOKEN})
    assert (r.returncode, r.stdout) == (0, "v1"), r
    r = cli(server, "set", "from-file", "v2", env={"DCACHE_TOKEN_FILE": token_files.client})
    assert r.returncode == 0, r
    # --token-file is what counts when both are given.
    r = cli(server, "get", "from-file", "--token-file", token_files.client, env={"DCACHE_TOKEN": WRONG_TOKEN})
    assert (r.returncode, r.stdout) == (0, "v2"), r


def test_a_read_only_token_reads_and_may_not_write(guarded_serve: ServeProcess, token_files: TokenFiles) -> None:
    server = guarded_serve.client_address

    def read_only_refusals() -> int:
        r = cli(server, "stats", "--json", "--token-file", token_files.read)
        assert r.returncode == 0, r
        return int(json.loads(r.stdout)["refused"].get("read_only", 0))

    refused_before = read_only_refusals()
    assert cli(server, "set", "ro", "original", "--token-file", token_files.client).returncode == 0
    assert cli(server, "set", "counter", "5", "--token-file", token_files.client).returncode == 0
    read = ["--token-file", token_files.read]
    r = cli(server, "get", "ro", *read)
    assert (r.returncode, r.stdout) == (0, "original"), r
    assert cli(server, "mget", "ro", "counter", *read).returncode == 0
    r = cli(server, "scan", *read)
    assert r.returncode == 0 and "ro" in r.stdout, r
    for write in (
        ["set", "ro", "changed"],
        ["delete", "ro"],
        ["incr", "counter"],
        ["mset", "ro", "a", "counter", "b"],
        ["flush", "--all", "--yes"],
        ["getdel", "ro"],
    ):
        r = cli(server, *write, *read)
        assert r.returncode == 3 and r.stderr.startswith(f"error: forbidden: {write[0]}: "), (write, r)
    r = cli(server, "mget", "ro", "counter", "--json", *read)
    assert '"original"' in r.stdout and '"5"' in r.stdout, r.stdout  # nothing was written
    # drain takes the node out of its cluster: not for a read-only token either.
    r = subprocess.run([sys.executable, "-m", "dcache", "drain", server, *read], capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and "forbidden" in r.stderr, r
    assert read_only_refusals() == refused_before + 7


def test_tokens_never_reach_the_nodes_log_or_the_error_output(guarded_serve: ServeProcess, token_files: TokenFiles) -> None:
    server = guarded_serve.client_address
    outputs = [
        cli(server, "get", "k", "--token-file", token_files.wrong),
        cli(server, "get", "k", env={"DCACHE_TOKEN": WRONG_TOKEN}),
        cli(server, "set", "k", "v", "--token-file", token_files.read),
        cli(server, "set", "k", "v", "--token-file", token_files.client),
        cli(server, "stats", "--token-file", token_files.client),
        cli(server, "stats", "--json", "--token-file", token_files.client),
        cli(server, "get", "k", "--token-file", token_files.peer),  # a peer token on the client port
    ]
    for r in outputs:
        for token in ALL_TOKENS:
            assert token not in r.stdout + r.stderr, (token, r)
    log = "".join(guarded_serve.log)
    assert "ready: clients on" in log and "client tokens" in log
    for token in ALL_TOKENS:
        assert token not in log, token


def test_the_shell_takes_the_token_options(guarded_serve: ServeProcess, token_files: TokenFiles) -> None:
    server = guarded_serve.client_address
    r = cli(server, "shell", "--token-file", token_files.client, stdin="set shell-key from-the-shell\nget shell-key\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, "OK\nfrom-the-shell\n", ""), r
    r = cli(server, "shell", env={"DCACHE_TOKEN": READ_TOKEN}, stdin="get shell-key\nset shell-key changed\n")
    assert r.returncode == 3 and r.stdout == "from-the-shell\n", r
    assert r.stderr.startswith("error: forbidden: set: "), r
    r = cli(server, "shell", "--token-file", token_files.wrong, stdin="get shell-key\n")
    assert r.returncode != 0 and r.stdout == "" and "unauthorized" in r.stderr, r


def test_the_shell_refused_for_its_token_exits_3(guarded_serve: ServeProcess, token_files: TokenFiles) -> None:
    r = cli(guarded_serve.client_address, "shell", "--token-file", token_files.wrong, stdin="get shell-key\n")
    assert r.returncode == 3, r


# == 2. rotation ==========================================================================


def _connects_with(address: str, token: str) -> dcache.SyncClient | None:
    try:
        return dcache.SyncClient(address, token=token, timeout=5)
    except dcache.DcacheError as exc:
        assert "unauthorized" in str(exc), exc
        return None


def _refuses(address: str, token: str) -> bool | None:
    client = _connects_with(address, token)
    if client is None:
        return True
    client.close()
    return None


def test_tokens_rotate_without_a_restart(tmp_path: Path) -> None:
    """Add the new token, move the clients, remove the old: each step takes
    effect within seconds, and connections let in before stay in."""
    old, new = f"old-{secrets.token_hex(16)}", f"new-{secrets.token_hex(16)}"
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{old}\n")
    with ServeProcess("--auth-token-file", str(token_file)) as node:
        address = node.client_address
        before = dcache.SyncClient(address, token=old, timeout=5)
        before.set("k", "before")
        assert _connects_with(address, new) is None
        token_file.write_text(f"# rolling out a new token\n{old}\n{new}\n")  # rewritten in place, as an editor would
        with eventually(lambda: _connects_with(address, new), what="the new token accepted") as moved:
            assert moved.get("k") == b"before"
            with dcache.SyncClient(address, token=old, timeout=5) as still:  # both, for now
                assert still.get("k") == b"before"
            replacement = tmp_path / "tokens.new"
            replacement.write_text(f"{new}\n")
            os.replace(replacement, token_file)  # rewritten atomically, as a secret manager would
            eventually(lambda: _refuses(address, old), what="the old token refused")
            moved.set("k", "after")
            # Let in before the old token was taken away: still in.
            assert before.get("k") == b"after"
            before.set("k", "from before")
            assert moved.get("k") == b"from before"
            # A rewrite the node cannot use keeps the tokens in force.
            token_file.write_text("too-short\n")
            eventually(lambda: True if "keeping the tokens in force" in "".join(node.log) else None, what="the bad file seen")
            assert _refuses(address, old)
            with dcache.SyncClient(address, token=new, timeout=5) as again:
                assert again.get("k") == b"from before"
        before.close()
    for token in (old, new):
        assert token not in node.output()


async def test_a_token_removed_is_refused_on_connections_opened_before(
    nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dcache import node as node_module

    monkeypatch.setattr(node_module, "TOKEN_RELOAD_INTERVAL", 0.05)  # the node looks at the file often
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{CLIENT_TOKEN}\n")
    node, bound = await start_node(nursery, auth_token_file=str(token_file))
    with trio.fail_after(TIMEOUT):
        opened_early = await raw_connection(bound.client_address)  # its handshake done, no hello yet
        token_file.write_text(f"{READ_TOKEN}\n")  # (as a client token: any other one will do)
        while node.tokens.client != (READ_TOKEN.encode(),):
            await trio.sleep(0.05)
        with pytest.raises(dcache.DcacheError):
            await dcache.Client.connect(bound.client_address, token=CLIENT_TOKEN)
        await opened_early.send(codec.encode_frame([[1, "hello", hello(CLIENT_TOKEN)]]))
        replies, code = await everything_until_closed(opened_early, patience=0.5)
        assert [r[:2] for r in replies] == [[1, 1]] and replies[0][2][0] == ErrorCode.UNAUTHORIZED
        assert code == wsframe.CLOSE_POLICY_VIOLATION


# == 3. the raw protocol =================================================================


@pytest.fixture(params=["plain", "tls", "tls-tasks"])
async def guarded(
    request: pytest.FixtureRequest, nursery: trio.Nursery, token_files: TokenFiles, pki: Pki
) -> tuple[Node, BoundAddresses, ssl.SSLContext | None]:
    """An in-process node that wants client tokens: plain, over TLS (run by
    the reactor around the socket), and over TLS with a task per connection
    (trio's SSLStream: how a node serves where the reactor is not used)."""
    tls = request.param != "plain"
    node, bound = await start_node(
        nursery,
        auth_token_file=token_files.client,
        read_token_file=token_files.read,
        reactor=request.param != "tls-tasks",
        **(pki.node_config() if tls else {}),
    )
    return node, bound, pki.context() if tls else None


async def test_a_refused_hello_is_answered_then_the_connection_closed_and_nothing_after_it_runs(
    guarded: tuple[Node, BoundAddresses, ssl.SSLContext | None],
) -> None:
    node, bound, tls = guarded
    refusals = {
        "token_missing": hello(),
        "token_wrong": hello(WRONG_TOKEN),
        "peer_on_client_port": hello(CLIENT_TOKEN, peer=bound.peer_address),  # a node's hello, on the client port
    }
    with trio.fail_after(TIMEOUT):
        for n, (reason, args) in enumerate(refusals.items()):
            key = f"pipelined-{n}".encode()
            conn = await raw_connection(bound.client_address, tls)
            # The hello and a write in the same frame.
            await conn.send(codec.encode_frame([[1, "hello", args], [2, "set", {"key": key, "value": b"x"}]]))
            replies, code = await everything_until_closed(conn)
            assert len(replies) == 1 and replies[0][:2] == [1, 1], (reason, replies)
            assert replies[0][2][0] == ErrorCode.UNAUTHORIZED, (reason, replies)
            assert code == wsframe.CLOSE_POLICY_VIOLATION, reason
            # The hello and a write in two WebSocket messages written together.
            conn = await raw_connection(bound.client_address, tls)
            await conn.send_raw(
                conn.frame(codec.encode_frame([[3, "hello", args]]))
                + conn.frame(codec.encode_frame([[4, "set", {"key": key + b"-2", "value": b"x"}]]))
            )
            replies, code = await everything_until_closed(conn)
            assert [r[:2] for r in replies] == [[3, 1]] and code == wsframe.CLOSE_POLICY_VIOLATION, (reason, replies)
        async with dcache.connect(bound.client_address, token=CLIENT_TOKEN, tls=tls) as client:
            assert await client.mget([f"pipelined-{n}{suffix}" for n in range(3) for suffix in ("", "-2")]) == [None] * 6
            refused = (await client.stats())["refused"]
    assert refused == {reason: 2 for reason in refusals}


async def test_until_its_hello_a_connection_may_send_only_small_messages(
    guarded: tuple[Node, BoundAddresses, ssl.SSLContext | None],
) -> None:
    """On a node that wants tokens, a stranger cannot make the node decode a
    large frame (a megabyte of small CBOR items takes it about a second);
    after its hello a client sends large values as usual. (A node that wants
    no token lets anyone say hello, so it takes a large first message: see
    test_ws_conformance.)"""
    from dcache.security import MAX_HELLO_MESSAGE

    node, bound, tls = guarded
    with trio.fail_after(TIMEOUT):
        conn = await raw_connection(bound.client_address, tls)
        await conn.send(cbor2.dumps([[]] * (MAX_HELLO_MESSAGE + 1)))
        replies, code = await everything_until_closed(conn)
        assert replies == [] and code == wsframe.CLOSE_TOO_BIG
        async with dcache.connect(bound.client_address, token=CLIENT_TOKEN, tls=tls) as client:
            await client.set("big", b"x" * (4 * MAX_HELLO_MESSAGE))
            assert await client.get("big") == b"x" * (4 * MAX_HELLO_MESSAGE)
            assert (await client.stats())["refused"] == {"frame_too_large": 1}


async def test_a_stranger_that_does_not_begin_with_hello_gets_one_answer_and_is_closed(
    guarded: tuple[Node, BoundAddresses, ssl.SSLContext | None],
) -> None:
    """On a node that wants tokens: one `hello_required` for a frame of many
    requests, not one each, and the connection closed."""
    node, bound, tls = guarded
    with trio.fail_after(TIMEOUT):
        conn = await raw_connection(bound.client_address, tls)
        await conn.send(codec.encode_frame([[i, "get", {"key": b"k"}] for i in range(1, 1001)]))
        replies, code = await everything_until_closed(conn)
    assert [r[:2] for r in replies] == [[1, 1]] and replies[0][2][0] == ErrorCode.HELLO_REQUIRED
    assert code == wsframe.CLOSE_POLICY_VIOLATION


async def test_a_tls_close_notify_ends_the_connection_at_once(
    guarded: tuple[Node, BoundAddresses, ssl.SSLContext | None],
) -> None:
    node, bound, tls = guarded
    if tls is None:
        pytest.skip("TLS only")
    with trio.fail_after(TIMEOUT):
        conn = await raw_connection(bound.client_address, tls)
        await call(conn, [[1, "hello", hello(CLIENT_TOKEN)]])
        assert node.connections == 1
        assert isinstance(conn.stream, trio.SSLStream)
        with contextlib.suppress(trio.BrokenResourceError):  # (the node hangs up rather than answer it)
            await conn.stream.unwrap()  # close_notify, the TCP connection left open
        while node.connections:  # (it was kept until the idle timeout)
            await trio.sleep(0.01)


async def test_node_to_node_ops_are_forbidden_to_clients(guarded: tuple[Node, BoundAddresses, ssl.SSLContext | None]) -> None:
    node, bound, tls = guarded
    peer_ops = [
        ["handoff", {"entries": [["", b"planted", b"v", 0, 7]], "begin": [5], "done": [5], "epoch": 9}],
        ["claim", {"shards": [1]}],
        ["replicate", {"entries": [["", b"planted", b"v", 0, 7]], "begin": [], "done": [], "epoch": 2}],
        ["copies", {}],
        ["events", {"incarnation": None, "after": 0, "limit": 5}],
        ["scanshards", {"shards": [1, 5], "after": None, "limit": 3}],
    ]
    with trio.fail_after(TIMEOUT):
        conn = await raw_connection(bound.client_address, tls)
        [welcome] = await call(conn, [[0, "hello", hello(CLIENT_TOKEN)]])
        assert welcome[1] == 0 and welcome[2]["role"] == "client"
        for rid, (op, args) in enumerate(peer_ops, start=1):
            [reply] = await call(conn, [[rid, op, args]])  # alone in its frame
            assert reply[:2] == [rid, 1] and reply[2][0] == ErrorCode.FORBIDDEN, (op, reply)
        replies = await call(conn, [[rid + 100, op, args] for rid, (op, args) in enumerate(peer_ops)] + [[99, "ping", {}]])
        assert [r[2][0] for r in replies[:-1]] == [ErrorCode.FORBIDDEN] * len(peer_ops)
        assert replies[-1][:2] == [99, 0]  # the connection serves on
        [reply] = await call(conn, [[200, "get", {"key": b"planted"}]])
        assert reply == [200, 0, None]
        await conn.aclose()
    assert node.router.counters.refused == {"peer_op": 2 * len(peer_ops)}


async def test_a_read_only_connection_on_the_wire(guarded: tuple[Node, BoundAddresses, ssl.SSLContext | None]) -> None:
    node, bound, tls = guarded
    with trio.fail_after(TIMEOUT):
        conn = await raw_connection(bound.client_address, tls)
        [welcome] = await call(conn, [[0, "hello", hello(READ_TOKEN)]])
        assert welcome[2]["role"] == "read"
        [reply] = await call(conn, [[1, "set", {"key": b"k", "value": b"v"}]])  # alone: the node's short way
        assert reply[2][0] == ErrorCode.FORBIDDEN
        replies = await call(conn, [[2, "set", {"key": b"k", "value": b"v"}], [3, "get", {"key": b"k"}], [4, "drain", {}]])
        assert [r[1] if r[1] == 0 else r[2][0] for r in replies] == [ErrorCode.FORBIDDEN, 0, ErrorCode.FORBIDDEN]
        assert replies[1][2] is None
        # A second hello cannot raise its rights without a token that gives them.
        await conn.send(codec.encode_frame([[5, "hello", hello(WRONG_TOKEN)], [6, "set", {"key": b"k", "value": b"v"}]]))
        replies, code = await everything_until_closed(conn)
        assert [r[:2] for r in replies] == [[5, 1]] and code == wsframe.CLOSE_POLICY_VIOLATION
    assert len(node.store) == 0


async def test_a_client_refused_at_its_hello_is_told_why(nursery: trio.Nursery, token_files: TokenFiles) -> None:
    _, bound = await start_node(nursery, auth_token_file=token_files.client)
    with trio.fail_after(TIMEOUT):
        for token, why in ((None, "this node needs a token"), (WRONG_TOKEN, "the token was not accepted")):
            with pytest.raises(dcache.RequestError) as refused:
                await dcache.Client.connect(bound.client_address, token=token)
            assert refused.value.code == ErrorCode.UNAUTHORIZED and why in str(refused.value)


# == 4. peer tokens in a real cluster =====================================================


async def test_nothing_hidden_after_a_relayed_request_runs_on_its_owner(
    nursery: trio.Nursery, etcd_server: EtcdServer, token_files: TokenFiles
) -> None:
    """A lone keyed request is relayed to its owner as it came. A read-only
    client hides a write (and a node's op) after its checked get, in the same
    frame, from two connections at once so that the link joins both: the
    owner must run neither."""
    config = {
        "etcd": etcd_server.endpoint,
        "lease_ttl": LEASE_TTL,
        "auth_token_file": token_files.client,
        "read_token_file": token_files.read,
        "peer_token_file": token_files.peer,
    }
    a, bound_a = await start_node(nursery, **config)
    b, _ = await start_node(nursery, **config)
    with trio.fail_after(TIMEOUT):
        await wait_until_ready([a, b], 2)
        on_b = key_owned_by(a, b.node_id).encode()
        target = next(f"t:{i}".encode() for i in range(10_000) if a.router.shard_map.owner("", f"t:{i}".encode()) == b.node_id)
        hidden = [
            [7777, "set", {"key": target, "value": b"written with a read-only token"}],
            [7778, "handoff", {"entries": [["", b"planted", b"v", 0, 7]], "begin": [], "done": [], "epoch": 1}],
        ]
        for smuggled in hidden:
            first, second = await raw_connection(bound_a.client_address), await raw_connection(bound_a.client_address)
            for conn in (first, second):
                [welcome] = await call(conn, [[0, "hello", hello(READ_TOKEN)]])
                assert welcome[2]["role"] == "read"
            both = first.frame(codec.encode_frame([[2, "get", {"key": on_b}]]) + cbor2.dumps(smuggled))
            assert first.send_nowait(both) is None
            assert second.send_nowait(second.frame(codec.encode_frame([[3, "get", {"key": on_b}]]))) is None
            for conn in (first, second):
                [reply] = [r for payload in await conn.receive() for r in cbor2.loads(payload)]
                assert reply[1] == 0, reply  # the get itself is answered
        await trio.sleep(0.2)  # (anything that ran would have by now)
    assert b.store.get("", target) is None and b.store.get("", b"planted") is None
    assert not any(op == "set" for op, _ in b.router.counters.ops)


# == 4b. peer tokens in a real cluster ====================================================


async def test_nodes_sharing_a_peer_token_forward_to_each_other_and_strangers_are_refused(
    nursery: trio.Nursery, etcd_server: EtcdServer, token_files: TokenFiles
) -> None:
    config = {"etcd": etcd_server.endpoint, "lease_ttl": LEASE_TTL, "peer_token_file": token_files.peer}
    a, bound_a = await start_node(nursery, **config)
    b, bound_b = await start_node(nursery, **config)
    with trio.fail_after(TIMEOUT):
        await wait_until_ready([a, b], 2)
        on_a, on_b = key_owned_by(a, a.node_id), key_owned_by(a, b.node_id)
        async with dcache.connect(bound_a.client_address) as via_a, dcache.connect(bound_b.client_address) as via_b:
            await via_a.set(on_b, "written through a")
            await via_b.set(on_a, "written through b")
            assert await via_b.get(on_b) == b"written through a"
            assert await via_a.get(on_a) == b"written through b"
            assert await via_a.get(on_b) == b"written through a"
            assert await via_b.get(on_a) == b"written through b"
        assert a.router.counters.forwarded >= 2 and b.router.counters.forwarded >= 2
        # Strangers on the peer port: a node's hello without the token, or with a wrong one; a handoff right after.
        for args in (hello(peer="stranger:1"), hello(WRONG_TOKEN, peer="stranger:1"), hello(CLIENT_TOKEN)):
            conn = await raw_connection(bound_a.peer_address)
            await conn.send(
                codec.encode_frame(
                    [
                        [1, "hello", args],
                        [2, "handoff", {"entries": [["", b"planted", b"v", 0, 7]], "begin": [], "done": [], "epoch": 1}],
                    ]
                )
            )
            replies, code = await everything_until_closed(conn)
            assert [r[:2] for r in replies] == [[1, 1]] and replies[0][2][0] == ErrorCode.UNAUTHORIZED, replies
            assert code == wsframe.CLOSE_POLICY_VIOLATION
        assert a.router.counters.refused.get("peer_token") == 3
        assert len(a.store) + len(b.store) == 2  # nothing planted


async def test_a_node_with_another_peer_token_cannot_reach_its_peer(
    nursery: trio.Nursery, etcd_server: EtcdServer, token_files: TokenFiles, tmp_path: Path
) -> None:
    other_token = tmp_path / "other-peer-token"
    other_token.write_text(f"{WRONG_TOKEN}\n")
    config = {"etcd": etcd_server.endpoint, "lease_ttl": LEASE_TTL}
    a, _ = await start_node(nursery, peer_token_file=token_files.peer, **config)
    b, bound_b = await start_node(nursery, peer_token_file=str(other_token), **config)
    with trio.fail_after(TIMEOUT):
        while not all(len(n.router.shard_map.members) == 2 for n in (a, b)):
            await trio.sleep(0.05)
        key = key_owned_by(b, a.node_id)
        async with dcache.connect(bound_b.client_address) as client:
            with pytest.raises(dcache.RequestError) as failed:
                await client.get(key)
            assert failed.value.code == ErrorCode.UNAVAILABLE
        while not a.router.counters.refused.get("peer_token"):  # a refused b's hello
            await trio.sleep(0.05)
        assert b.router.counters.refused.get("peer_token")  # and b refused a's


async def test_a_node_alone_counts_no_refusal(nursery: trio.Nursery, etcd_server: EtcdServer) -> None:
    node, _ = await start_node(nursery, etcd=etcd_server.endpoint, lease_ttl=LEASE_TTL)
    with trio.fail_after(TIMEOUT):
        await wait_until_ready([node], 1)
        with trio.move_on_after(2):  # its own check of its address is done within this
            while not node.router.counters.refused:
                await trio.sleep(0.05)
    assert node.router.counters.refused == {}


# == 5. TLS ===============================================================================


@pytest.fixture(scope="module")
def tls_serve(pki: Pki) -> Iterator[ServeProcess]:
    with ServeProcess(*pki.node_options()) as node:
        yield node


def test_cli_over_tls(tls_serve: ServeProcess, pki: Pki) -> None:
    address = tls_serve.client_address  # host:port
    r = cli(address, "set", "tls", "over TLS", "--ca", pki.ca)
    assert (r.returncode, r.stdout, r.stderr) == (0, "OK\n", ""), r
    r = cli(f"wss://{address}", "get", "tls", "--ca", pki.ca)
    assert (r.returncode, r.stdout) == (0, "over TLS"), r
    r = cli(f"wss://localhost:{address.rsplit(':', 1)[1]}", "get", "tls", "--ca", pki.ca)
    assert (r.returncode, r.stdout) == (0, "over TLS"), r
    # The node's certificate cannot be checked: against the system's CAs, or another CA.
    for r in (cli(f"wss://{address}", "get", "tls"), cli(f"wss://{address}", "get", "tls", "--ca", pki.other_ca)):
        assert r.returncode == 2 and r.stdout == "", r
        assert "certificate" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    # Plain WebSocket to a node that speaks TLS only.
    for r in (cli(address, "get", "tls"), cli(f"ws://{address}", "get", "tls")):
        assert r.returncode == 2 and r.stdout == "", r
        assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    r = cli(f"ws://{address}", "get", "tls", "--ca", pki.ca)  # a CA, yet ws://: a contradiction
    assert r.returncode == 2 and "ws://" in r.stderr, r


async def test_async_client_over_tls_big_values_and_many_requests(tls_serve: ServeProcess, pki: Pki) -> None:
    big = secrets.token_bytes(1 << 20)  # a TLS record holds 16 KiB: this one spans many, and many reads
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(f"wss://{tls_serve.client_address}", tls=pki.context()) as client:
            await client.set("big-async", big)
            assert await client.get("big-async") == big
            async with trio.open_nursery() as nursery:
                for i in range(300):
                    nursery.start_soon(client.set, f"small-async:{i}", f"value {i}")
            keys = [f"small-async:{i}" for i in range(300)]
            assert await client.mget(keys) == [f"value {i}".encode() for i in range(300)]
            got: dict[int, bytes | None] = {}

            async def get(i: int) -> None:
                got[i] = await client.get(keys[i])

            async with trio.open_nursery() as nursery:
                for i in range(300):
                    nursery.start_soon(get, i)
            assert got == {i: f"value {i}".encode() for i in range(300)}
            assert await client.get("big-async") == big


def test_sync_client_over_tls_big_values_and_many_requests(tls_serve: ServeProcess, pki: Pki) -> None:
    big = secrets.token_bytes(1 << 20)
    with dcache.SyncClient(f"wss://{tls_serve.client_address}", tls=pki.context(), timeout=TIMEOUT) as client:
        client.set("big-sync", big)
        assert client.get("big-sync") == big
        for i in range(300):
            client.set(f"small-sync:{i}", f"value {i}")
        for i in range(300):
            assert client.get(f"small-sync:{i}") == f"value {i}".encode()
        assert client.mget([f"small-sync:{i}" for i in range(300)]) == [f"value {i}".encode() for i in range(300)]
        assert client.get("big-sync") == big
    # The address without a scheme and a TLS context: TLS too.
    with dcache.SyncClient(tls_serve.client_address, tls=pki.context(), timeout=TIMEOUT) as client:
        assert client.get("big-sync") == big


async def test_cluster_client_over_tls_with_mutual_tls_between_nodes(
    nursery: trio.Nursery, etcd_server: EtcdServer, pki: Pki
) -> None:
    config = {"etcd": etcd_server.endpoint, "lease_ttl": LEASE_TTL, "tls_ca": pki.ca, **pki.node_config()}
    a, bound_a = await start_node(nursery, **config)
    b, bound_b = await start_node(nursery, **config)
    with trio.fail_after(TIMEOUT):
        await wait_until_ready([a, b], 2)  # the shards moved over the peer links: they work
        key = key_owned_by(a, b.node_id)
        async with dcache.connect(f"wss://{bound_a.client_address}", tls=pki.context()) as client:
            forwarded = a.router.counters.forwarded
            await client.set(key, "on b, through a")
            assert await client.get(key) == b"on b, through a"
            assert a.router.counters.forwarded >= forwarded + 2  # over the TLS link a to b
        cluster = await dcache.ClusterClient.connect(f"wss://{bound_a.client_address}", tls=pki.context())
        try:
            forwarded = a.router.counters.forwarded
            assert await cluster.get(key) == b"on b, through a"
            await cluster.set(key, "straight to b")
            assert await cluster.get(key) == b"straight to b"
            assert a.router.counters.forwarded == forwarded  # it went to b itself, over TLS
        finally:
            await cluster.aclose()
        # The peer port wants a certificate the CA signed: a client without one cannot even open a WebSocket.
        for tls in (pki.context(), dcache.tls_context(ca=pki.ca, cert=pki.other_cert, key=pki.other_key)):
            with pytest.raises(dcache.ConnectError):
                await raw_connection(bound_a.peer_address, tls)
        assert len(b.store) == 1 and len(a.store) == 0


@pytest.fixture(scope="module")
def mutual_tls_serve(pki: Pki) -> Iterator[ServeProcess]:
    with ServeProcess(*pki.node_options(), "--tls-client-ca", pki.ca, "--tls-ca", pki.ca) as node:
        yield node


def test_client_certificates(mutual_tls_serve: ServeProcess, pki: Pki) -> None:
    address = mutual_tls_serve.client_address
    r = cli(address, "set", "mtls", "v", "--ca", pki.ca, "--client-cert", pki.client_cert, "--client-key", pki.client_key)
    assert (r.returncode, r.stdout) == (0, "OK\n"), r
    r = cli(address, "get", "mtls", "--ca", pki.ca, "--client-cert", pki.client_cert, "--client-key", pki.client_key)
    assert (r.returncode, r.stdout) == (0, "v"), r
    for refused in (
        cli(address, "get", "mtls", "--ca", pki.ca),  # no certificate
        cli(address, "get", "mtls", "--ca", pki.ca, "--client-cert", pki.other_cert, "--client-key", pki.other_key),
    ):
        assert refused.returncode == 2 and refused.stdout == "", refused
        assert "Traceback" not in refused.stderr and len(refused.stderr.splitlines()) == 1, refused.stderr
    r = cli(address, "get", "mtls", "--ca", pki.ca, "--client-cert", pki.client_cert)  # no key
    assert r.returncode == 2 and "key" in r.stderr, r
    with dcache.SyncClient(
        address, tls=dcache.tls_context(ca=pki.ca, cert=pki.client_cert, key=pki.client_key), timeout=TIMEOUT
    ) as client:
        assert client.get("mtls") == b"v"


def test_a_missing_client_certificate_is_named_in_the_error(mutual_tls_serve: ServeProcess, pki: Pki) -> None:
    r = cli(mutual_tls_serve.client_address, "get", "mtls", "--ca", pki.ca)
    assert r.returncode == 2 and "certificate" in r.stderr, r


# == 6. limits ============================================================================


async def test_connections_per_address(nursery: trio.Nursery) -> None:
    limit = 3
    node, bound = await start_node(nursery, max_connections_per_address=limit)
    host, port = bound.client
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(bound.client_address) as client:
            await client.set("k", "v")
            held = []
            while len(held) < limit - 1:  # the limit, with the client; one by one, each seen by the node
                held.append(await trio.open_tcp_stream(host, port))
                while node.connections < len(held) + 1:
                    await trio.sleep(0.01)
            extra = await trio.open_tcp_stream(host, port)
            try:
                assert await extra.receive_some(100) == b""  # closed at once, before any handshake
            except trio.BrokenResourceError:
                pass
            await extra.aclose()
            assert (await client.stats())["refused"] == {"max_connections_per_address": 1}
            assert await client.get("k") == b"v"  # the others carry on
            await held.pop().aclose()
            while True:  # the node sees that one go; then there is room for another
                try:
                    async with dcache.connect(bound.client_address) as another:
                        assert await another.get("k") == b"v"
                    break
                except dcache.DcacheError:
                    await trio.sleep(0.05)
            for stream in held:
                await stream.aclose()


SLOW_HANDSHAKE = (
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def _client_hello(context: ssl.SSLContext) -> bytes:
    """The first bytes a TLS client sends."""
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("how", ["plain", "tls", "tls-tasks"])
async def test_connections_that_do_not_say_hello_in_time_are_closed(nursery: trio.Nursery, pki: Pki, how: str) -> None:
    hello_timeout = 1.0
    tls = how != "plain"
    node, bound = await start_node(
        nursery,
        hello_timeout=hello_timeout,
        metrics_listen="127.0.0.1:0",
        reactor=how != "tls-tasks",
        **(pki.node_config() if tls else {}),
    )
    context = pki.context() if tls else None
    host, port = bound.client
    closed_after: dict[str, float] = {}
    served = 0
    with trio.fail_after(TIMEOUT):
        async with dcache.connect(bound.client_address, tls=context) as good:
            started = trio.current_time()

            async def until_closed(name: str, stream: trio.abc.Stream) -> None:
                try:
                    while await stream.receive_some(65536):
                        pass
                except trio.BrokenResourceError:
                    pass
                closed_after[name] = trio.current_time() - started

            async def slowly(stream: trio.abc.Stream, data: bytes) -> None:
                """One byte at a time, with pauses: it would take far longer than the deadline."""
                try:
                    for i in range(len(data)):
                        await stream.send_all(data[i : i + 1])
                        await trio.sleep(0.2)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

            async with trio.open_nursery() as watchers:
                silent = await trio.open_tcp_stream(host, port)  # says nothing at all
                watchers.start_soon(until_closed, "silent", silent)
                loris = await trio.open_tcp_stream(host, port)
                watchers.start_soon(until_closed, "slow handshake", loris)
                watchers.start_soon(slowly, loris, _client_hello(context) if context else SLOW_HANDSHAKE)
                if context is not None:
                    tls_only = trio.SSLStream(await trio.open_tcp_stream(host, port), context, server_hostname=host)
                    await tls_only.do_handshake()  # TLS done, no WebSocket handshake
                    watchers.start_soon(until_closed, "TLS only", tls_only)
                mute = await raw_connection(bound.client_address, context)  # WebSocket done, no hello
                watchers.start_soon(until_closed, "no hello", mute.stream)
                while len(closed_after) < (4 if tls else 3):  # meanwhile a client that said hello is served
                    await good.set("k", f"{served}")
                    assert await good.get("k") == f"{served}".encode()
                    served += 1
                    await trio.sleep(0.02)
            # Not before the deadline; and well before anything else would have closed them (a loose bound).
            assert all(hello_timeout <= after < hello_timeout + 5 for after in closed_after.values()), closed_after
            assert served > 0
            assert await good.get("k") == f"{served - 1}".encode()
            refused = (await good.stats())["refused"]
        # Each ran out of time: counted alike, whichever handshake it had not finished.
        assert refused == {"hello_timeout": 4 if tls else 3}
        assert bound.metrics is not None
        status, body = await http_get(bound.metrics, "/metrics")
        metrics = body.decode()
    assert status == 200
    assert f'dcache_refused_total{{reason="hello_timeout"}} {4.0 if tls else 3.0}' in metrics


# == 7. bad configuration =================================================================


def _bad_config_cases() -> list[Any]:
    return [
        pytest.param(lambda d, p: ["--tls-cert", p.cert], "--tls-key", id="cert-without-key"),
        pytest.param(lambda d, p: ["--tls-key", p.key], "--tls-cert", id="key-without-cert"),
        pytest.param(
            lambda d, p: ["--tls-cert", f"{d}/absent.pem", "--tls-key", p.key],
            "absent.pem",
            id="missing-cert-file",
        ),
        pytest.param(
            lambda d, p: [*p.node_options(), "--tls-ca", f"{d}/absent-ca.pem"],
            "absent-ca.pem",
            id="missing-ca-file",
        ),
        pytest.param(lambda d, p: ["--tls-cert", p.key, "--tls-key", p.cert], "not a PEM certificate", id="cert-and-key-swapped"),
        pytest.param(lambda d, p: ["--tls-ca", p.ca], "--tls-cert", id="tls-ca-without-cert"),
        pytest.param(lambda d, p: ["--tls-client-ca", p.ca], "--tls-cert", id="tls-client-ca-without-cert"),
        # (the peer port would let clients in without a certificate)
        pytest.param(lambda d, p: [*p.node_options(), "--tls-client-ca", p.ca], "--tls-ca", id="tls-client-ca-peer-port-open"),
        pytest.param(lambda d, p: ["--auth-token-file", f"{d}/short"], "at least 16", id="short-token"),
        pytest.param(lambda d, p: ["--auth-token-file", f"{d}/empty"], "holds no token", id="empty-token-file"),
        pytest.param(lambda d, p: ["--read-token-file", f"{d}/comments"], "holds no token", id="comments-only"),
        pytest.param(lambda d, p: ["--peer-token-file", f"{d}/absent"], "absent", id="missing-token-file"),
    ]


@pytest.mark.parametrize(("options", "expected"), _bad_config_cases())
def test_bad_security_options_stop_serve_at_once_with_one_line(
    tmp_path: Path, pki: Pki, options: Callable[[Path, Pki], list[str]], expected: str
) -> None:
    (tmp_path / "short").write_text("short-token\n")
    (tmp_path / "empty").write_text("")
    (tmp_path / "comments").write_text("# the token goes here\n\n")
    serve = [sys.executable, "-m", "dcache", "serve", "--client-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"]
    r = subprocess.run([*serve, *options(tmp_path, pki)], capture_output=True, text=True, timeout=30)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines
    assert "None" not in lines[0], lines


# == 8. all of it at once, as the README promises ==========================================


def test_nodes_with_tokens_and_tls_join_a_tls_etcd_with_auth_and_refuse_strangers(
    pki: Pki, token_files: TokenFiles, tmp_path: Path
) -> None:
    """Two `dcache serve` nodes with client and peer tokens and TLS on both
    ports join an etcd that serves TLS with authentication on: strangers and
    plaintext are refused, and a client with the token is served over wss
    by either node, forwarding over TLS between them included."""
    from dcache.localcluster import EtcdTLS

    password = secrets.token_hex(16)
    password_file = tmp_path / "etcd-password"
    password_file.write_text(f"{password}\n")
    etcd = EtcdServer(tls=EtcdTLS(cert=pki.cert, key=pki.key, ca=pki.ca), root_password=password)
    etcd.start()
    secured = [
        *pki.node_options(),
        "--tls-ca", pki.ca,
        "--auth-token-file", token_files.client,
        "--peer-token-file", token_files.peer,
        "--etcd", etcd.endpoint,
        "--etcd-ca", pki.ca,
        "--etcd-user", "root",
        "--etcd-password-file", str(password_file),
        "--lease-ttl", str(LEASE_TTL),
    ]  # fmt: skip
    try:
        with ServeProcess(*secured) as first, ServeProcess(*secured) as second:
            assert etcd.endpoint.startswith("https://")
            token = ["--token-file", token_files.client, "--ca", pki.ca]
            servers = [f"wss://{first.client_address}", f"wss://{second.client_address}"]

            def both_members() -> bool | None:
                done = cli(servers[0], "members", "--json", *token)
                return True if done.returncode == 0 and len(json.loads(done.stdout)["members"]) == 2 else None

            eventually(both_members, what="both nodes in the view")
            for i in range(20):  # keys on both nodes: about half are forwarded, over TLS, with the peer token
                assert cli(servers[i % 2], "set", f"k{i}", f"v{i}", *token).returncode == 0
            for i in range(20):
                done = cli(servers[(i + 1) % 2], "get", f"k{i}", *token)
                assert (done.returncode, done.stdout) == (0, f"v{i}"), done.stderr
            stranger = cli(servers[0], "get", "k0", "--ca", pki.ca)
            assert stranger.returncode == 3 and "unauthorized" in stranger.stderr
            plaintext = cli(first.client_address, "get", "k0", "--token-file", token_files.client)
            assert plaintext.returncode == 2
            output = first.output() if first.proc.poll() is not None else "".join(first.log)
            assert password not in output and CLIENT_TOKEN not in output and PEER_TOKEN not in output
    finally:
        etcd.close()
