"""The ``dcache`` command line: ``serve``, the one-shot commands, ``shell``,
``cluster up`` and ``bench``.

This typer app is the one command table: ``dcache shell`` parses its lines
with it too. Parsing is typer's; what a command does is in
:mod:`dcache.commands`.
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
from typing import Annotated, Any, Callable, NoReturn, Optional

import trio
import typer
from rich.console import Console
from rich.table import Table

from . import __version__, commands, transport
from .client import DEFAULT_ADDRESS, DEFAULT_TIMEOUT, MAX_TIMEOUT, MAX_TTL, SyncClient
from .commands import Outcome
from .errors import DcacheError

app = typer.Typer(
    name="dcache",
    help="dcache: a distributed in-memory key-value cache.",
    no_args_is_help=True,
    add_completion=True,
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
    typer.Option(
        "--timeout", envvar="DCACHE_TIMEOUT", min=0.001, max=MAX_TIMEOUT, metavar="SECONDS", help="Give up after this long."
    ),
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
        Console().print(rich_table(outcome.table))
    elif isinstance(outcome.stdout, bytes):
        shown = commands.show_value(outcome.stdout) if sys.stdout.isatty() else ""
        if shown.startswith("b"):  # binary, on a terminal: escaped, not raw
            print(shown)
            print(f"({len(outcome.stdout):,} bytes, not text: redirect the output for the raw bytes)", file=sys.stderr)
        else:
            sys.stdout.buffer.write(outcome.stdout)
            if sys.stdout.isatty() and not outcome.stdout.endswith(b"\n"):
                sys.stdout.buffer.write(b"\n")
            sys.stdout.flush()
    elif outcome.stdout is not None:
        print(outcome.stdout)
    if outcome.note:
        print(outcome.note, file=sys.stderr)
    return outcome.exit_code


def rich_table(data: commands.TableData) -> Table:
    if not data.columns:
        table = Table(show_header=False, box=None, pad_edge=False, title=data.title)
        table.add_column(style="bold cyan")
        table.add_column(justify="right")
    else:
        table = Table(title=data.title, title_justify="left")
        for i, column in enumerate(data.columns):
            table.add_column(column, style="bold cyan" if i == 0 else None, justify="left" if i < 3 else "right")
    for row in data.rows:
        table.add_row(*row)
    return table


def _run(ctx: typer.Context, server: str, timeout: float, as_json: bool, command: Callable[..., Outcome], **args: Any) -> None:
    """Run a command against ``server`` and exit with its status.

    Inside ``dcache shell`` the context carries the shell's session, which
    runs the command on its open connection and prints it its own way.
    """
    if ctx.obj is not None:
        given = [f"--{name}" for name in ("server", "timeout") if _from_command_line(ctx, name)]
        if given:
            message = f"{' and '.join(given)}: not in the shell, which keeps its connection; `dcache shell HOST:PORT --timeout S` sets both"
            raise typer.Exit(ctx.obj.error(message))
        raise typer.Exit(ctx.obj.run(command, as_json=as_json, **args))
    try:
        with SyncClient(server, timeout=timeout) as client:
            outcome = command(client, **args)
    except DcacheError as exc:
        outcome = commands.failure(exc)
    except ValueError as exc:  # bad address, bad ttl
        if as_json:
            print(json.dumps({"error": "bad_input", "message": str(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(commands.EXIT_UNAVAILABLE) from None
    raise typer.Exit(render(outcome, as_json=as_json))


def _from_command_line(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


# -- one-shot commands ----------------------------------------------------------


def _keyed_command(name: str, command: Callable[..., Outcome], doc: str) -> None:
    def run(
        ctx: typer.Context,
        key: KeyArgument,
        server: ServerOption = DEFAULT_ADDRESS,
        ns: NsOption = "",
        as_json: JsonOption = False,
        timeout: TimeoutOption = DEFAULT_TIMEOUT,
    ) -> None:
        _run(ctx, server, timeout, as_json, command, key=key, ns=ns)

    run.__doc__ = doc
    app.command(name)(run)


def _node_command(name: str, command: Callable[..., Outcome], doc: str) -> None:
    def run(
        ctx: typer.Context,
        server: ServerOption = DEFAULT_ADDRESS,
        as_json: JsonOption = False,
        timeout: TimeoutOption = DEFAULT_TIMEOUT,
    ) -> None:
        _run(ctx, server, timeout, as_json, command)

    run.__doc__ = doc
    app.command(name)(run)


_keyed_command("get", commands.get, "Print the value of KEY (raw bytes, so it pipes); exit 1 if it is missing.")


@app.command("set")
def set_(
    ctx: typer.Context,
    key: KeyArgument,
    value: Annotated[
        Optional[str],
        typer.Argument(metavar="[VALUE]", help="The value; '-' or omitted reads it from stdin.", show_default=False),
    ] = None,
    ttl: Annotated[
        Optional[float],
        typer.Option("--ttl", min=0.001, max=MAX_TTL, metavar="SECONDS", help="Expire the entry after this many seconds."),
    ] = None,
    server: ServerOption = DEFAULT_ADDRESS,
    ns: NsOption = "",
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Store VALUE under KEY, optionally with a TTL."""
    if ctx.obj is not None:  # in the shell, stdin carries commands, not values
        if value is None:
            raise typer.BadParameter("give a VALUE", param_hint="VALUE")
        data = os.fsencode(value)
    elif value is None or value == "-":
        if sys.stdin.isatty():
            print("error: give a VALUE, or pipe it on stdin", file=sys.stderr)
            raise typer.Exit(commands.EXIT_UNAVAILABLE)
        data = sys.stdin.buffer.read()
    else:
        data = os.fsencode(value)
    _run(ctx, server, timeout, as_json, commands.set_, key=key, value=data, ttl=ttl, ns=ns)


@app.command()
def delete(
    ctx: typer.Context,
    keys: Annotated[list[str], typer.Argument(metavar="KEY...", help="Keys to delete.", show_default=False)],
    server: ServerOption = DEFAULT_ADDRESS,
    ns: NsOption = "",
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Delete keys; exit 1 if none of them existed."""
    _run(ctx, server, timeout, as_json, commands.delete, keys=keys, ns=ns)


_keyed_command("ttl", commands.ttl, "Show how long KEY has left to live; exit 1 if it is missing.")


@app.command()
def stats(
    ctx: typer.Context,
    cluster: Annotated[bool, typer.Option("--cluster", help="One row per node and a cluster total.")] = False,
    server: ServerOption = DEFAULT_ADDRESS,
    as_json: JsonOption = False,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Show the node's counters: hits, misses, keys, sets, deletes, expired, memory."""
    _run(ctx, server, timeout, as_json, commands.cluster_stats if cluster else commands.stats)


_node_command("members", commands.members, "List the cluster's nodes: address, state, shards owned, keys, uptime.")
_node_command("ping", commands.ping, "Check that the node answers.")


@app.command()
def shell(
    address: Annotated[
        Optional[str],
        typer.Argument(metavar="[HOST:PORT]", help="Node to connect to (default: --server).", show_default=False),
    ] = None,
    server: ServerOption = DEFAULT_ADDRESS,
    timeout: TimeoutOption = DEFAULT_TIMEOUT,
) -> None:
    """Open an interactive shell on a node; with commands on stdin, run them as a script."""
    from .shell import main as shell_main

    raise typer.Exit(shell_main(address or server, timeout=timeout))


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
        typer.Option("--advertise", metavar="HOST:PORT", help="Peer address other nodes dial, and the node id (default: the --listen address)."),
    ] = None,
    etcd: Annotated[
        Optional[str],
        typer.Option(
            "--etcd", envvar="DCACHE_ETCD", metavar="URL", help="etcd endpoint to join a cluster through (default: run standalone)."
        ),
    ] = None,
    cluster: Annotated[
        str, typer.Option("--cluster", envvar="DCACHE_CLUSTER", metavar="NAME", help="Cluster name, to share one etcd.")
    ] = "default",
    metrics_listen: Annotated[
        Optional[str],
        typer.Option("--metrics-listen", metavar="HOST:PORT", help="Serve Prometheus metrics at /metrics here."),
    ] = None,
    lease_ttl: Annotated[
        float,
        typer.Option("--lease-ttl", min=1.0, max=3600.0, metavar="SECONDS", help="How soon peers notice this node is gone."),
    ] = 5.0,
    log_level: Annotated[
        str, typer.Option("--log-level", metavar="LEVEL", help="debug, info, warning or error.")
    ] = "info",
    busy_poll_us: Annotated[
        float,
        typer.Option(
            "--busy-poll-us",
            envvar="DCACHE_BUSY_POLL_US",
            min=0,
            max=transport.MAX_BUSY_POLL_US,
            metavar="MICROSECONDS",
            help="Longest spin on a socket before sleeping: lower latency for CPU time; 0 turns it off.",
        ),
    ] = transport.DEFAULT_BUSY_POLL_US,
) -> None:
    """Run a node: standalone by default, or part of a cluster with --etcd."""
    from .node import Node, NodeConfig, NodeStartError

    transport.BUSY_POLL = busy_poll_us / 1e6

    level = _log_level(log_level)
    addresses = {"--client-listen": client_listen, "--listen": listen, "--advertise": advertise, "--metrics-listen": metrics_listen}
    for flag, address in addresses.items():
        if address is None:
            continue
        try:
            if not address:
                raise ValueError("give HOST:PORT")
            transport.split_address(address, 0)
        except ValueError as exc:
            _exit_start_error(f"{flag}: {exc}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = NodeConfig(
            client_listen=client_listen,
            listen=listen,
            advertise=advertise,
            etcd=etcd,
            cluster=cluster,
            metrics_listen=metrics_listen,
            lease_ttl=lease_ttl,
        )
        trio.run(_serve_until_signalled, Node(config))
    except (NodeStartError, ValueError) as exc:
        _exit_start_error(exc)
    except BaseExceptionGroup as group:
        start_errors = group.subgroup(lambda e: isinstance(e, NodeStartError))
        if start_errors is None:
            raise
        _exit_start_error(_first_leaf(start_errors))


def _log_level(name: str) -> int:
    level = logging.getLevelName(name.upper())
    if not isinstance(level, int):
        _exit_start_error(f"unknown --log-level {name!r}; use debug, info, warning or error")
    return level


def _only(group: BaseExceptionGroup, kind: type[BaseException]) -> BaseException | None:
    """The group's first exception if all of them are ``kind``s, else None."""
    match, rest = group.split(kind)
    return None if match is None or rest is not None else _first_leaf(match)


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


def _exit_start_error(exc: BaseException | str) -> NoReturn:
    print(f"error: {exc}", file=sys.stderr)
    raise typer.Exit(commands.EXIT_UNAVAILABLE) from None


LEAVE_TIMEOUT = 0.6  # seconds: leaving the cluster must fit in the second a stop may take


async def _serve_until_signalled(node: Any) -> None:
    log = logging.getLogger("dcache.node")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("%s received, shutting down", signal.Signals(signum).name)
                    # Leave the cluster first, so that a rolling restart costs
                    # no request an error; a second signal stops at once.
                    with trio.move_on_after(LEAVE_TIMEOUT):
                        async with trio.open_nursery() as leaving:

                            async def on_second_signal() -> None:
                                await signals.__anext__()
                                leaving.cancel_scope.cancel()

                            leaving.start_soon(on_second_signal)
                            await node.leave()
                            leaving.cancel_scope.cancel()
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)  # first: a signal may come while etcd is slow to answer
            await nursery.start(node.run)
    log.info("stopped")


# -- cluster up -------------------------------------------------------------------

cluster_app = typer.Typer(help="Run a local cluster to try dcache out.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
def cluster_up(
    nodes: Annotated[int, typer.Option("--nodes", "-n", min=1, max=64, help="How many nodes.")] = 3,
    client_port: Annotated[int, typer.Option("--client-port", help="First node's client port; the others count up.")] = 48000,
    peer_port: Annotated[int, typer.Option("--peer-port", help="First node's peer port.")] = 47000,
    metrics_port: Annotated[int, typer.Option("--metrics-port", help="First node's metrics port; 0 for none.")] = 9100,
    etcd: Annotated[
        Optional[str],
        typer.Option("--etcd", envvar="DCACHE_ETCD", metavar="URL", help="Use this etcd instead of starting one."),
    ] = None,
    cluster: Annotated[str, typer.Option("--cluster", metavar="NAME", help="Cluster name.")] = "default",
    log_level: Annotated[str, typer.Option("--log-level", metavar="LEVEL", help="The nodes' log level.")] = "warning",
) -> None:
    """Start etcd and NODES nodes on this machine; Ctrl-C stops them all."""
    from . import localcluster

    _log_level(log_level)  # the nodes would refuse it, one by one
    raise typer.Exit(
        localcluster.up(
            nodes, client_port=client_port, peer_port=peer_port, metrics_port=metrics_port or None,
            etcd=etcd, cluster=cluster, log_level=log_level,
        )  # fmt: skip
    )


# -- bench ------------------------------------------------------------------------


@app.command()
def bench(
    server: ServerOption = DEFAULT_ADDRESS,
    clients: Annotated[int, typer.Option("--clients", "-c", min=1, max=10_000, help="Concurrent client tasks.")] = 50,
    connections: Annotated[int, typer.Option("--connections", min=1, max=1000, help="Connections per node, shared by the tasks.")] = 1,
    pipeline: Annotated[int, typer.Option("--pipeline", "-P", min=1, max=10_000, help="Requests each task sends per round trip.")] = 1,
    ops: Annotated[int, typer.Option("--ops", "-n", min=1, help="Total operations.")] = 100_000,
    ratio: Annotated[str, typer.Option("--ratio", metavar="SETS:GETS", help="Mix of sets to gets.")] = "1:10",
    value_size: Annotated[int, typer.Option("--value-size", "-d", min=0, help="Bytes per value.")] = 100,
    keys: Annotated[int, typer.Option("--keys", min=1, help="Distinct keys (key:0 … key:N-1).")] = 100_000,
    ttl: Annotated[float, typer.Option("--ttl", min=0, max=MAX_TTL, metavar="SECONDS", help="TTL of the entries set; 0 for none.")] = 0,
    mget: Annotated[int, typer.Option("--mget", min=0, help="Make each get an mget of this many keys.")] = 0,
    prefill: Annotated[bool, typer.Option("--prefill", help="Set every key once before measuring.")] = False,
    cluster: Annotated[
        bool, typer.Option("--cluster", help="Use the cluster-aware client: each key goes straight to its owner.")
    ] = False,
    time_limit: Annotated[float, typer.Option("--time-limit", min=0.1, metavar="SECONDS", help="Stop after this long.")] = 300.0,
    as_json: JsonOption = False,
) -> None:
    """Load-test a node or a cluster and report ops/s and latency percentiles."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .bench import BenchConfig, parse_ratio, run_bench

    try:
        sets, gets = parse_ratio(ratio)
        config = BenchConfig(
            servers=(server,),
            cluster=cluster, clients=clients, connections=connections, pipeline=pipeline, ops=ops, sets=sets,
            gets=gets, value_size=value_size, keys=keys, ttl=ttl or None, prefill=prefill, mget=mget,
            time_limit=time_limit,
        )  # fmt: skip
        console = Console(stderr=True)
        with Progress(
            TextColumn("bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True, disable=as_json or not console.is_terminal,
        ) as progress:  # fmt: skip
            task = progress.add_task("ops", total=ops)
            result = trio.run(lambda: run_bench(config, on_progress=lambda done: progress.update(task, completed=done)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(commands.EXIT_UNAVAILABLE) from None
    except DcacheError as exc:
        raise typer.Exit(render(commands.failure(exc), as_json=as_json)) from None
    except ExceptionGroup as group:  # from the client tasks: a lost node, say
        error = _only(group, DcacheError)
        if error is None:
            raise
        raise typer.Exit(render(commands.failure(error), as_json=as_json)) from None  # type: ignore[arg-type]
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    c = result.config
    table = Table(
        title=(
            f"{result.ops:,} ops in {result.elapsed_s:.2f} s = {result.ops_per_s:,.0f} ops/s · "
            f"{c.clients} clients × {c.connections} conn{' (cluster-aware)' if c.cluster else ''}, pipeline {c.pipeline}, "
            f"ratio {c.sets}:{c.gets}, {c.value_size} B values"
        ),
        title_justify="left",
    )
    for column in ("op", "count", "ops/s", "p50 ms", "p99 ms", "p99.9 ms", "max ms", "misses", "errors"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for s in result.summaries:
        table.add_row(
            s.op, f"{s.count:,}", f"{s.ops_per_s:,.0f}", f"{s.p50_ms:.3f}", f"{s.p99_ms:.3f}", f"{s.p999_ms:.3f}",
            f"{s.max_ms:.3f}", f"{s.misses:,}", f"{s.errors:,}",
        )  # fmt: skip
    Console().print(table)
    for s in result.summaries:
        if s.first_error:
            print(f"{s.op}: {s.errors:,} errors; the first: {s.first_error}", file=sys.stderr)


def main() -> None:
    try:
        status = app(prog_name="dcache", standalone_mode=False)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseExceptionGroup as group:  # Ctrl-C inside trio's task groups
        if _only(group, KeyboardInterrupt) is None:
            raise
        sys.exit(130)
    except OSError as exc:  # writing the output failed: a full disk, say
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(commands.EXIT_UNAVAILABLE)
    except Exception as exc:  # click's usage errors, in typer's vendored copy: one line, as ours
        message = getattr(exc, "format_message", None)
        if message is None:
            raise
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        if text := message():  # empty after the help a bare `dcache` prints
            print(f"error: {text}{hint}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", commands.EXIT_UNAVAILABLE))
    sys.exit(status if isinstance(status, int) else 0)
