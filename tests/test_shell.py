"""`dcache shell`: the parser, the REPL on prompt-toolkit's pipe input, the script mode, completions."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio
from prompt_toolkit import PromptSession
from prompt_toolkit.application import create_app_session
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from support import node_address

from dcache import completion
from dcache.cli import app
from dcache.codec import Limits
from dcache.node import BoundAddresses
from dcache.shell import (
    EXIT,
    ShellCompleter,
    ShellSession,
    expand_shorthand,
    make_prompt_session,
    run_interactive,
    show_value,
    split_line,
)

TIMEOUT = 20
REPO = Path(__file__).resolve().parent.parent


def session_for(address: str = "127.0.0.1:1", *, interactive: bool = True) -> tuple[ShellSession, io.StringIO]:
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None)
    return ShellSession(address, console=console, interactive=interactive, timeout=5), out


# -- parsing and bad input: one clear line each, no node needed ------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("nosuchcommand", "unknown command 'nosuchcommand'"),
        ("get", "Missing argument 'KEY'"),
        ("set k", "Missing argument 'VALUE'"),
        ("set k v ttl=abc", "Invalid value for '--ttl'"),
        ("set k v --ttl -1", "--ttl"),
        ("get 'unclosed", "cannot parse the line"),
        ("serve", "not in the shell"),
        ("where", "Missing argument 'KEY'"),
        ("top --interval zero", "Invalid value for '--interval'"),
        ("get k --server localhost:1", "--server: not in the shell"),
        ("get k --timeout 3", "--timeout: not in the shell"),
    ],
)
def test_bad_input_is_one_clear_line(line: str, expected: str) -> None:
    session, out = session_for()
    status = session.execute(line)
    text = out.getvalue()
    assert status == 2
    assert expected in text
    assert text.count("error:") == 1 and "Traceback" not in text


def test_shorthand_options_and_aliases() -> None:
    session, _ = session_for()
    set_command = session.group.commands["set"]
    assert expand_shorthand(set_command, split_line("k a=b ttl=60 ns=x")) == ["k", "a=b", "--ttl", "60", "--ns", "x"]
    # Quoted, escaped or after --, a word is a value, whatever it looks like.
    assert expand_shorthand(set_command, split_line('k "json=yes" ttl=5')) == ["k", "json=yes", "--ttl", "5"]
    assert expand_shorthand(set_command, split_line("k 'ttl=5'")) == ["k", "ttl=5"]
    assert expand_shorthand(set_command, split_line(r"k ttl\=5")) == ["k", "ttl=5"]
    assert expand_shorthand(set_command, split_line('k "a \\"ttl=5\\""')) == ["k", 'a "ttl=5"']
    assert expand_shorthand(set_command, split_line("k -- ttl=5")) == ["k", "--", "ttl=5"]
    assert expand_shorthand(set_command, split_line("k v --ttl=5")) == ["k", "v", "--ttl=5"]
    assert session.execute("") is None
    assert session.execute("# a comment") is None
    assert session.execute("quit") is EXIT


def test_a_word_quoted_anywhere_is_a_value_and_a_hash_inside_a_word_is_kept() -> None:
    session, _ = session_for()
    set_command = session.group.commands["set"]  # type: ignore[attr-defined]
    assert expand_shorthand(set_command, split_line("k tt'l'=5")) == ["k", "ttl=5"]
    assert expand_shorthand(set_command, split_line('k v "ttl"=5 ns=x')) == ["k", "v", "ttl=5", "--ns", "x"]
    assert expand_shorthand(set_command, split_line("user#1 v#2 #3 ttl=5")) == ["user#1", "v#2"]
    assert expand_shorthand(set_command, split_line("k '--' ttl=5")) == ["k", "--", "ttl=5"]


def test_a_long_word_splits_in_linear_time() -> None:
    # Splitting with shlex took 2.7 s of CPU for a 400 KB word and grew with the
    # square of its length (minutes for 4 MiB); linear splitting takes well under 0.1 s.
    word = "a" * (4 << 20)
    for line, expected in [
        (f"get {word}", word),
        (f"set k '{word}'", word),
        (f'set k "{word}\\\\"', word + "\\"),
        (f"set k {word}\\ x", word + " x"),
    ]:
        started = time.process_time()
        words = split_line(line)
        assert time.process_time() - started < 5
        assert words[-1].text == expected


def test_help_comes_from_the_command_table() -> None:
    session, out = session_for()
    assert session.execute("help") == 0
    listing = out.getvalue()
    for name in ("get", "set", "delete", "ttl", "stats", "members", "where", "top", "exit"):
        assert name in listing
    assert "serve" not in listing
    assert session.execute("help set") == 0
    assert "--ttl" in out.getvalue()  # the command table's own help text
    assert session.execute("help nope") == 2


def test_values_are_shown_quoted() -> None:
    assert show_value(b"Alice") == '"Alice"'
    assert show_value(b"two words ") == '"two words "'
    assert show_value(b"tab\there") == '"tab\\there"'
    assert show_value(b"\x00\xff") == "b'\\x00\\xff'"
    big = show_value(b"\xff" * 100_000)  # a big binary value: its first KiB, not 400 KB of escapes
    assert big.startswith("b'\\xff") and big.endswith("' …") and len(big) < 5000


def test_completion_of_commands_options_and_seen_keys() -> None:
    session, _ = session_for()
    completer = ShellCompleter(session)

    def complete(text: str) -> list[str]:
        return [c.text for c in completer.get_completions(Document(text), None)]

    assert "set" in complete("se") and "serve" not in complete("se")
    assert complete("set k v --t") == ["--ttl"]  # the shell keeps its own connection: no --timeout
    assert complete("where k --") == ["--ns"]
    session.seen_keys.update({"user:1001", "user:1002", "session:abc"})
    assert complete("get us") == ["user:1001", "user:1002"]
    assert "stats" in complete("help st")
    session.seen_keys.update({"ns=x", "it's"})
    assert complete("get ns") == ["'ns=x'"]  # bare, it would be read as --ns x
    assert complete("get it") == ["'it'\"'\"'s'"]


def test_tab_completes_at_once_when_keys_arrive_together() -> None:
    session, _ = session_for()
    lines: list[str] = []
    session.execute = lines.append  # type: ignore[method-assign,assignment]
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        pipe.send_text("pi\t")  # in one write, as a paste or a fast typist sends it
        pipe.send_text("\r")
        pipe.send_text("ge\t\r")  # two candidates (get, getdel): their common part
        pipe.send_text("ge\t\t\t\r")  # the second Tab selects the first, the third the next
        pipe.close()
        prompt = make_prompt_session(session, input=pipe, output=DummyOutput())
        assert prompt.default_buffer.complete_while_typing()
        assert run_interactive(session, prompt) == 0
    assert lines == ["ping", "get", "getdel"]


# -- the REPL against a real node ---------------------------------------------------


async def test_repl_session(nursery: trio.Nursery) -> None:
    bound = await node_address(nursery)
    session, out = session_for(bound.client_address)
    script = "\n".join(
        [
            "set user:1001 Alice",
            'set session:abc "active now" ttl=60',
            "get user:1001",
            "get session:abc",
            "ttl session:abc",
            "del user:1001",
            "get user:1001",
            "where session:abc",
            "stats",
            "members",
            "get session:abc --json",
            "top --iterations 1",
            "",
        ]
    )

    def run() -> int:
        with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
            pipe.send_text(script)
            pipe.close()
            assert session.connect()
            return run_interactive(session, PromptSession(input=pipe, output=DummyOutput()))

    with trio.fail_after(TIMEOUT):
        assert await trio.to_thread.run_sync(run) == 0
    text = out.getvalue()
    assert text.count("OK") >= 2
    assert '"Alice"' in text and '"active now"' in text
    assert "60 s" in text or "59 s" in text
    assert "(deleted 1)" in text
    assert "user:1001: not found" in text
    assert "shard" in text and "of 8192" in text and "owner" in text
    assert "hits" in text and "misses" in text
    assert bound.peer_address in text  # members and top list the node
    assert '"found": true' in text
    assert "Traceback" not in text
    assert session.failures == 1  # the get of a deleted key
    assert session.seen_keys >= {"user:1001", "session:abc"}


async def test_quoted_values_are_stored_as_typed(nursery: trio.Nursery) -> None:
    bound = await node_address(nursery)
    session, out = session_for(bound.client_address)
    with trio.fail_after(TIMEOUT):
        assert await trio.to_thread.run_sync(session.connect)
        for line in ('set cfg "json=yes"', "set ttl5 -- ttl=5", "set quoted 'ttl=5'"):
            assert await trio.to_thread.run_sync(session.execute, line) == 0
        client = session.client
        assert client is not None
        stored = await trio.to_thread.run_sync(lambda: [client.get(k) for k in ("cfg", "ttl5", "quoted")])
        assert stored == [b"json=yes", b"ttl=5", b"ttl=5"]
        assert await trio.to_thread.run_sync(client.ttl, "quoted") == float("inf")
        # A key the node would refuse is one clear line, and the shell goes on.
        for line in ("where ''", "where 'k\udcff'"):
            assert await trio.to_thread.run_sync(session.execute, line) == 2
        assert await trio.to_thread.run_sync(session.execute, "get cfg") == 0
    assert "error: key must not be empty" in out.getvalue()
    assert "error: key 'k\\udcff' is not valid text" in out.getvalue()


async def test_a_word_no_node_would_take_is_refused_before_sending(nursery: trio.Nursery) -> None:
    bound = await node_address(nursery, limits=Limits(max_key_bytes=100, max_value_bytes=1000))
    session, out = session_for(bound.client_address)
    with trio.fail_after(TIMEOUT):
        assert await trio.to_thread.run_sync(session.connect)
        assert await trio.to_thread.run_sync(session.execute, "set k " + "v" * 1000) == 0
        assert await trio.to_thread.run_sync(session.execute, "set k " + "v" * 1001) == 2
    assert (
        "error: cannot parse the line: a word of 1,001 characters is longer than any key or value a node takes" in out.getvalue()
    )


async def test_a_key_too_large_piped_to_the_shell_is_refused_at_once(nursery: trio.Nursery) -> None:
    bound = await node_address(nursery)
    script = f"get {'a' * (1 << 20)}\nset small ok\n".encode()
    # Before splitting was linear, this line alone took about 60 s of CPU.
    with trio.fail_after(30):
        r = await trio.run_process(
            [sys.executable, "-m", "dcache", "shell", bound.client_address],
            stdin=script,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert r.returncode == 3  # the worst status: a refused request
    assert r.stdout.decode().splitlines() == ["OK"]  # the shell went on
    assert r.stderr.decode().splitlines() == ["error: key_too_large: key of 1048576 bytes exceeds the limit of 65536"]


def test_ctrl_c_during_a_command_returns_to_the_prompt() -> None:
    session, out = session_for()
    ran = []

    def interrupted(line: str) -> object:
        ran.append(line)
        if line == "get slow":
            raise KeyboardInterrupt
        return 0

    session.execute = interrupted  # type: ignore[method-assign]
    with create_pipe_input() as pipe, create_app_session(input=pipe, output=DummyOutput()):
        pipe.send_text("get slow\nget next\n")
        pipe.close()
        assert run_interactive(session, PromptSession(input=pipe, output=DummyOutput())) == 0
    assert ran == ["get slow", "get next"]  # the session went on after the interrupted command
    assert "cancelled" in out.getvalue()


async def test_reconnects_to_another_member_when_its_node_goes(nursery: trio.Nursery) -> None:
    first_scope = trio.CancelScope()

    async def run_first(task_status: trio.TaskStatus[BoundAddresses]) -> None:
        with first_scope:
            async with trio.open_nursery() as inner:
                task_status.started(await node_address(inner))

    first = await nursery.start(run_first)
    second = await node_address(nursery)
    session, out = session_for(first.client_address)
    with trio.fail_after(TIMEOUT):
        assert await trio.to_thread.run_sync(session.connect)
        session.known_addresses.append(second.client_address)
        assert await trio.to_thread.run_sync(session.execute, "set k v") == 0
        first_scope.cancel()
        await trio.sleep(0.2)
        assert await trio.to_thread.run_sync(session.execute, "get k") == 2
        assert session.address == second.client_address
        assert await trio.to_thread.run_sync(session.execute, "set k w") == 0
    text = out.getvalue()
    assert "lost the connection" in text and f"reconnected to {second.client_address}" in text


# -- script mode ---------------------------------------------------------------------


def test_script_mode_over_a_pipe() -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "dcache", "serve", "--client-listen", "127.0.0.1:0", "--listen", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        while "ready" not in line:
            line = server.stderr.readline()
        address = line.split("clients on ")[1].split(",")[0]

        def shell(script: str) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(
                [sys.executable, "-m", "dcache", "shell", address], input=script.encode(), capture_output=True, timeout=20
            )

        r = shell("set a 1\nget a\nset b 'two words'\nget b\ndel a\n")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().splitlines() == ["OK", "1", "OK", "two words", "deleted 1"]
        r = shell("get a\nset c 3\nnosuch\n")
        assert r.returncode == 2
        assert r.stdout.decode().splitlines() == ["OK"]
        assert r.stderr.decode().splitlines() == ["a: not found", "error: unknown command 'nosuch'; `help` lists them"]
        r = shell("get a\n")
        assert r.returncode == 1
        r = subprocess.run(
            [sys.executable, "-m", "dcache", "shell", "127.0.0.1:1"], input=b"get a\n", capture_output=True, timeout=20
        )
        assert r.returncode == 2 and b"Traceback" not in r.stderr
        assert r.stderr == b"error: cannot connect to 127.0.0.1:1: Connection refused\n"  # said once
    finally:
        server.kill()
        server.wait()


# -- completion scripts -------------------------------------------------------------------


def test_checked_in_completion_scripts_are_current() -> None:
    for shell_name, filename in completion.FILES.items():
        checked_in = (REPO / "completions" / filename).read_text()
        assert checked_in == completion.script(shell_name, app), (
            f"regenerate: dcache completion --write completions/ ({filename})"
        )


def test_completion_protocol_answers_from_the_app() -> None:
    env = {**os.environ, "_DCACHE_COMPLETE": "bash_complete", "COMP_WORDS": "dcache set k v --t", "COMP_CWORD": "4"}
    r = subprocess.run([sys.executable, "-m", "dcache"], env=env, capture_output=True, timeout=20)
    assert set(r.stdout.decode().split()) == {"plain,--ttl", "plain,--timeout", "plain,--token-file"}


def test_help_in_the_shell_speaks_of_the_shell() -> None:
    session, out = session_for()
    assert session.execute("help set") == 0
    text = out.getvalue()
    assert "Usage: set [OPTIONS] KEY VALUE" in text and "--ttl" in text
    assert "--server" not in text and "--timeout" not in text and "stdin" not in text


def test_tables_align_text_left_and_numbers_right() -> None:
    from dcache import commands

    class Node:
        server_info = {"node": "n"}

        def members(self) -> dict:
            stats = {
                "keys": 5,
                "hits": 1,
                "misses": 1,
                "sets": 5,
                "deletes": 0,
                "expired": 0,
                "data_bytes": 9,
                "memory_bytes": 99,
            }
            return {"epoch": 7, "members": [{"node": "a:1", "client": "a:2", "state": "up", "shards": 8192, "stats": stats}]}

        def ttl(self, key: str, *, ns: str = "") -> float:
            return 30.0

    cluster = commands.rich_table(commands.cluster_stats(Node()).table)  # type: ignore[arg-type,union-attr]
    assert [c.justify for c in cluster.columns] == ["left", "left", *["right"] * 9]  # node, state, then counts
    where = commands.rich_table(commands.where(Node(), key="k").table)  # type: ignore[arg-type,union-attr]
    assert [c.justify for c in where.columns] == ["left", "left"]  # labels and values, as the README shows them
    stats = commands.rich_table(commands.TableData([("keys", "5")], numeric=(1,)))
    assert [c.justify for c in stats.columns] == ["left", "right"]


async def test_use_sets_the_namespace_of_commands_that_name_none(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    bound = await node_address(nursery)
    session, _ = session_for(bound.client_address, interactive=False)

    def run(line: str) -> int:
        return session.execute(line)  # type: ignore[return-value]

    with trio.fail_after(TIMEOUT):
        assert await trio.to_thread.run_sync(session.connect)
        for line in ("set d default", "use app", "set a in-app", "get a", "get d --ns ''", "get d --ns=", "get a --ns other"):
            await trio.to_thread.run_sync(run, line)
        assert await trio.to_thread.run_sync(run, "flush --ns '' --yes") == 0  # the default namespace, as asked
        await trio.to_thread.run_sync(run, "use")
        assert await trio.to_thread.run_sync(run, "get a --ns app") == 0
        assert await trio.to_thread.run_sync(run, "get d") == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        "OK",
        "OK",
        "in-app",
        "default",
        "default",
        "flushed 1 key(s) from the default namespace",
        "in-app",
    ]
    assert captured.err.splitlines() == ["a: not found", "d: not found"]  # (--ns other; d flushed)
