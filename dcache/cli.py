"""The ``dcache`` command line: ``serve`` and the one-shot commands.

Parsing is typer's; what a command does is in :mod:`dcache.commands`.
Output rules: stdout carries only the result (raw values pipe cleanly),
stderr carries notes and errors, ``--json`` prints one JSON object, and the
exit status is 0 on success, 1 for "not found", 2 when the node cannot be
reached (or the command line is wrong), 3 when the node refused the request.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from typing import Annotated, Any, Callable, Optional

import trio
import typer
from rich.console import Console
from rich.table import Table

from . import __version__, commands
from .client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, SyncClient
from .commands import Outcome
from .errors import DcacheError

app = typer.Typer(
    name="dcache",
    help="dcache: a distributed in-memory key-value cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

ServerOption = Annotated[
    str,
    typer.Option("--server", "-s", envvar="DCACHE_SERVER", metavar="HOST:PORT", help="Node to talk to."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object (for scripts).")]
NsOption = Annotated[str, typer.Option("--ns", metavar="NAME", help="Namespace of the key.")]
TimeoutOption = Annotated[
    float,
    typer.Option("--timeout", envvar="DCACHE_TIMEOUT", min=0.001, metavar="SECONDS", help="Give up after this long."),
]
KeyArgument = Annotated[str, typer.Argument(metavar="KEY", help="The key.", show_default=False)]


def _version_callback(value: bool) -> None:
    if value:
        print(f"dcache {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """dcache: a distributed in-memory key-value cache.

    Run a node with `dcache serve`, then use `dcache set/get/delete/stats`.
    """


# -- output -------------------------------------------------------------------


def render(outcome: Outcome, *, as_json: bool) -> int:
    """Print an outcome the way scripts and people expect; return the exit status."""
    if as_json:
        print(json.dumps(outcome.data, default=str))
        return outcome.exit_code
    if outcome.table is not None and sys.stdout.isatty():
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold cyan")
        table.add_column(justify="right")
        for label, value in outcome.table:
            table.add_row(label, value)
        Console().print(table)
    elif isinstance(outcome.stdout, bytes):
        sys.stdout.buffer.write(outcome.stdout)
        if sys.stdout.isatty() and not outcome.stdout.endswith(b"\n"):
            sys.stdout.buffer.write(b"\n")
        sys.stdout.flush()
    elif outcome.stdout is not None:
        print(outcome.stdout)
    if outcome.note:
        print(outcome.note, file=sys.stderr)
    return outcome.exit_code


def _run(server: str, timeout: float, as_json: bool, command: Callable[..., Outcome], **args: Any) -> None:
    try:
        with SyncClient(server, timeout=timeout) as client:
            outcome = command(client, **args)
    except DcacheError as exc:
        outcome = commands.failure(exc)
    except ValueError as exc:  # bad address, bad ttl
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(commands.EXIT_UNAVAILABLE) from None
    raise typer.Exit(render(outcome, as_json=as_json))


# -- one-shot commands ----------------------------------------------------------


@app.command()
def get(
    key: KeyArgument,
    server: ServerOption = DEFAULT_ADDRESS,
    ns: NsOption = "",
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Print the value of KEY (raw bytes, so it pipes); exit 1 if it is missing."""
    _run(server, timeout, as_json, commands.get, key=key, ns=ns)


@app.command("set")
def set_(
    key: KeyArgument,
    value: Annotated[
        Optional[str],
        typer.Argument(metavar="[VALUE]", help="The value; '-' or omitted reads it from stdin.", show_default=False),
    ] = None,
    ttl: Annotated[
        Optional[float],
        typer.Option("--ttl", min=0.001, metavar="SECONDS", help="Expire the entry after this many seconds."),
    ] = None,
    server: ServerOption = DEFAULT_ADDRESS,
    ns: NsOption = "",
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Store VALUE under KEY, optionally with a TTL."""
    if value is None or value == "-":
        if sys.stdin.isatty():
            print("error: give a VALUE, or pipe it on stdin", file=sys.stderr)
            raise typer.Exit(commands.EXIT_UNAVAILABLE)
        data = sys.stdin.buffer.read()
    else:
        data = os.fsencode(value)
    _run(server, timeout, as_json, commands.set_, key=key, value=data, ttl=ttl, ns=ns)


@app.command()
def delete(
    keys: Annotated[list[str], typer.Argument(metavar="KEY...", help="Keys to delete.", show_default=False)],
    server: ServerOption = DEFAULT_ADDRESS,
    ns: NsOption = "",
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Delete keys; exit 1 if none of them existed."""
    _run(server, timeout, as_json, commands.delete, keys=keys, ns=ns)


@app.command()
def ttl(
    key: KeyArgument,
    server: ServerOption = DEFAULT_ADDRESS,
    ns: NsOption = "",
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Show how long KEY has left to live; exit 1 if it is missing."""
    _run(server, timeout, as_json, commands.ttl, key=key, ns=ns)


@app.command()
def stats(
    server: ServerOption = DEFAULT_ADDRESS,
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Show the node's counters: hits, misses, keys, sets, deletes, expired, memory."""
    _run(server, timeout, as_json, commands.stats)


@app.command()
def ping(
    server: ServerOption = DEFAULT_ADDRESS,
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Check that the node answers."""
    _run(server, timeout, as_json, commands.ping)


# -- serve ----------------------------------------------------------------------


@app.command()
def serve(
    client_listen: Annotated[
        str, typer.Option("--client-listen", metavar="HOST:PORT", help="Where clients connect.")
    ] = "localhost:48000",
    listen: Annotated[
        str, typer.Option("--listen", metavar="HOST:PORT", help="Where peer nodes connect.")
    ] = "localhost:47000",
    advertise: Annotated[
        Optional[str],
        typer.Option("--advertise", metavar="HOST:PORT", help="Peer address other nodes use [default: --listen]."),
    ] = None,
    log_level: Annotated[
        str, typer.Option("--log-level", metavar="LEVEL", help="debug, info, warning or error.")
    ] = "info",
) -> None:
    """Run a node (standalone: nothing else needs to be installed)."""
    from .node import Node, NodeConfig, NodeStartError

    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        print(f"error: unknown --log-level {log_level!r}", file=sys.stderr)
        raise typer.Exit(commands.EXIT_UNAVAILABLE)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = NodeConfig(client_listen=client_listen, listen=listen, advertise=advertise)
        trio.run(_serve_until_signalled, Node(config))
    except (NodeStartError, ValueError) as exc:
        _exit_start_error(exc)
    except BaseExceptionGroup as group:
        start_errors = group.subgroup(lambda e: isinstance(e, NodeStartError))
        if start_errors is None:
            raise
        _exit_start_error(_first_leaf(start_errors))


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def _exit_start_error(exc: BaseException) -> None:
    print(f"error: {exc}", file=sys.stderr)
    raise typer.Exit(commands.EXIT_UNAVAILABLE) from None


async def _serve_until_signalled(node: Any) -> None:
    log = logging.getLogger("dcache.node")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("%s received, shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
    log.info("stopped")


def main() -> None:
    try:
        app(prog_name="dcache")
    except KeyboardInterrupt:
        sys.exit(130)
