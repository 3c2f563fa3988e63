"""The ``dcache`` command line: ``serve``, the one-shot commands, ``shell``,
``cluster up``, ``bench`` and ``completion``.

The one-shot commands come from the command table in :mod:`dcache.commands`
(the shell parses with it too) and run on the blocking client: a one-shot
command never imports trio. Everything a command needs beyond that is
imported when the command runs, so ``dcache get k`` starts quickly.

Output rules: stdout carries only the result (raw values pipe cleanly),
stderr carries notes and errors, ``--json`` prints one JSON object, and the
exit status is 0 on success, 1 for "not found", 2 when the node cannot be
reached (or the command line is wrong), 3 when the node refused the request.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Any, NoReturn

import click

from . import __version__, commands
from .client import MAX_TTL
from .commands import CONTEXT_SETTINGS, EXIT_UNAVAILABLE, Command, Outcome, printable
from .errors import DcacheError
from .net import DEFAULT_BUSY_POLL_US, MAX_BUSY_POLL_US, split_address
from .security import HELLO_TIMEOUT, IDLE_TIMEOUT, MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS, MAX_IN_FLIGHT

MIN_MAX_MEMORY = 2**20  # a node's shards take a few MB of dicts once filled; below this a limit means little


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        print(f"dcache {__version__}")
        ctx.exit()


@click.group(
    name="dcache",
    context_settings=CONTEXT_SETTINGS,
    no_args_is_help=True,
    epilog="Run a node with `dcache serve`, then use `dcache set/get/delete/stats`. `dcache COMMAND --help` tells more.",
)
@click.option(
    "--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version, help="Show the version and exit."
)
def app() -> None:
    """dcache: a distributed in-memory key-value cache."""


# -- one-shot commands ------------------------------------------------------------


def _error(message: str, *, as_json: bool = False, kind: str = "bad_input") -> NoReturn:
    """A one-line error on stderr (and one JSON object with --json); exit 2."""
    if as_json:
        print(json.dumps({"error": kind, "message": message}))
    print(f"error: {printable(message)}", file=sys.stderr)
    sys.exit(EXIT_UNAVAILABLE)


def _confirmed(command: Command, args: dict[str, Any], *, as_json: bool) -> bool:
    """Whether the user wants ``command`` run: asked on a terminal; --yes elsewhere."""
    assert command.confirm is not None
    try:
        question = command.confirm(args)
    except click.UsageError as exc:
        _error(f"{command.name}: {exc.format_message()}", as_json=as_json)
    if question is None or args["yes"]:
        return True
    if sys.stdin is None or not sys.stdin.isatty():
        _error(f"{command.name}: add --yes to do it when not on a terminal", as_json=as_json)
    return click.confirm(question, default=False, err=True)


def _one_shot(command: Command) -> click.Command:
    def run(*, server: str, timeout: float, as_json: bool, **args: Any) -> NoReturn:
        if command.stdin is not None and args[command.stdin] in (None, b"-"):
            if sys.stdin is None or sys.stdin.isatty():  # (None: stdin closed, as by <&-)
                _error(f"give a {command.stdin.upper()}, or pipe it on stdin", as_json=as_json)
            args[command.stdin] = sys.stdin.buffer.read()
        from .client import SyncClient

        if command.confirm is not None and not _confirmed(command, args, as_json=as_json):
            print("not done", file=sys.stderr)
            sys.exit(commands.EXIT_NOT_FOUND)
        if command.json_arg:
            args["as_json"] = as_json
        assert command.action is not None
        try:
            access = commands.AccessOptions.take(args).client_args()
            with SyncClient(server, timeout=timeout, **access) as client:
                outcome: Outcome = command.action(client, **args)
        except DcacheError as exc:
            outcome = commands.failure(exc)
        except ValueError as exc:  # a bad address, an empty key
            outcome = commands.bad_input(exc)
        sys.exit(commands.render(outcome, as_json=as_json))

    return commands.click_command(command, for_shell=False, callback=run)


def _watch(command: Command) -> click.Command:
    def run(*, server: str, timeout: float, as_json: bool, prefix: str, ns: str, **options: Any) -> NoReturn:
        from .client import SyncClient

        try:
            access = commands.AccessOptions.take(options).client_args()
            with SyncClient(server, timeout=timeout, **access) as client:
                for event in client.watch(prefix, ns=ns):
                    line, notice = commands.watch_line(event, as_json=as_json)
                    print(line, file=sys.stderr if notice else sys.stdout, flush=True)
        except KeyboardInterrupt:
            sys.exit(130)
        except BrokenPipeError:  # (piped into head, say)
            sys.stderr.close()
            sys.exit(0)
        except DcacheError as exc:
            sys.exit(commands.render(commands.failure(exc), as_json=as_json))
        except ValueError as exc:
            sys.exit(commands.render(commands.bad_input(exc), as_json=as_json))
        raise AssertionError("a watch ends only by an error or an interrupt")

    return commands.click_command(command, for_shell=False, callback=run)


for _command in commands.COMMANDS.values():
    if _command.name == "watch":
        app.add_command(_watch(_command))
    elif not _command.shell_only:
        app.add_command(_one_shot(_command))


def _access_options(function: Any) -> Any:
    """The --token-file, --ca, --client-cert and --client-key options, on a command that defines its own."""
    function.__click_params__ = [*getattr(function, "__click_params__", []), *reversed(commands.access_params())]
    return function


@app.command(context_settings=CONTEXT_SETTINGS)
@click.argument("address", metavar="[HOST:PORT]", required=False)
@click.option("--server", "-s", help="Node to connect to, when no HOST:PORT is given.", **commands.SERVER_OPTION)
@click.option("--timeout", help="Give up on a request after this long.", **commands.TIMEOUT_OPTION)
@_access_options
def shell(address: str | None, server: str, timeout: float, **options: Any) -> NoReturn:
    """Open an interactive shell on a node; with commands on stdin, run them as a script."""
    from .shell import main as shell_main

    try:
        access = commands.AccessOptions.take(options).client_args()
    except ValueError as exc:
        _error(str(exc), as_json=False)
    sys.exit(shell_main(address or server, timeout=timeout, access=access))


MAX_REPLICAS = 9
DRAIN_CLIENT_TIMEOUT = 60.0  # seconds: the node's default --drain-timeout (30 s) and its goodbyes


@app.command(context_settings=CONTEXT_SETTINGS)
@click.argument("address", metavar="HOST:PORT")
@click.option(
    "--timeout",
    help="Give up waiting after this long (longer than the node's --drain-timeout).",
    **{**commands.TIMEOUT_OPTION, "default": DRAIN_CLIENT_TIMEOUT, "envvar": None},
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@_access_options
def drain(address: str, timeout: float, as_json: bool, **options: Any) -> NoReturn:
    """Take the node at HOST:PORT (its client address) out of its cluster: it hands every shard with its
    entries to the other nodes, leaves, and stops. Exit 0 when everything moved, 3 if entries were left behind."""
    from .client import SyncClient

    try:
        access = commands.AccessOptions.take(options).client_args()
        with SyncClient(address, timeout=timeout, **access) as client:
            node = client.server_info.get("node", address)
            report = client.drain()
        moved = f"{node}: handed {report['shards_moved']:,} shard(s) with {report['entries_moved']:,} entries to other nodes"
        left = report.get("entries_left_behind", 0)
        outcome = Outcome(
            {"node": node, **report},
            stdout=f"{moved}; it has left the cluster and stops",
            note=f"{left:,} entries could not be handed over and are lost" if left else None,
            exit_code=commands.EXIT_REFUSED if left else commands.EXIT_OK,
        )
    except DcacheError as exc:
        outcome = commands.failure(exc)
    except ValueError as exc:
        outcome = commands.bad_input(exc)
    sys.exit(commands.render(outcome, as_json=as_json))


@app.command(context_settings=CONTEXT_SETTINGS)
@click.argument("shell_name", metavar="[bash|zsh|fish]", required=False, type=click.Choice(["bash", "zsh", "fish"]))
@click.option("--write", "directory", metavar="DIR", help="Write the scripts for all three shells into DIR instead.")
def completion(shell_name: str | None, directory: str | None) -> None:
    """Print the completion script for your shell (default: from $SHELL).

    Load it with `eval "$(dcache completion bash)"` in ~/.bashrc, or source
    the file for your shell from the completions/ folder.
    """
    import os
    from pathlib import Path

    from .completion import script, write_all

    if directory is not None:
        for path in write_all(Path(directory), app):
            print(path)
        return
    name = shell_name or os.path.basename(os.environ.get("SHELL", "")) or "bash"
    try:
        print(script(name, app), end="")
    except ValueError as exc:
        _error(str(exc))


# -- serve ------------------------------------------------------------------------


@app.command(context_settings=CONTEXT_SETTINGS)
@click.option("--client-listen", default="localhost:48000", metavar="HOST:PORT", show_default=True, help="Where clients connect.")
@click.option("--listen", default="localhost:47000", metavar="HOST:PORT", show_default=True, help="Where peer nodes connect.")
@click.option(
    "--advertise", metavar="HOST:PORT", help="Peer address other nodes dial, and the node id (default: the --listen address)."
)
@click.option(
    "--etcd",
    envvar="DCACHE_ETCD",
    metavar="URL",
    help="etcd endpoint to join a cluster through (also DCACHE_ETCD; default: run standalone).",
)
@click.option(
    "--cluster",
    envvar="DCACHE_CLUSTER",
    default="default",
    metavar="NAME",
    show_default=True,
    help="Cluster name, to share one etcd.",
)
@click.option(
    "--etcd-ca",
    envvar="DCACHE_ETCD_CA",
    metavar="FILE",
    help="Check an https:// etcd's certificate against this CA (default: the system's CAs).",
)
@click.option(
    "--etcd-cert",
    envvar="DCACHE_ETCD_CERT",
    metavar="FILE",
    help="Client certificate for an etcd that asks for one (with --etcd-key).",
)
@click.option("--etcd-key", envvar="DCACHE_ETCD_KEY", metavar="FILE", help="The unencrypted key of --etcd-cert.")
@click.option(
    "--etcd-user",
    envvar="DCACHE_ETCD_USER",
    metavar="NAME",
    help="etcd user, for an etcd with authentication on (also DCACHE_ETCD_USER).",
)
@click.option(
    "--etcd-password-file", metavar="FILE",
    help="The --etcd-user's password, the file's first line (or the password itself in DCACHE_ETCD_PASSWORD).",
)  # fmt: skip
@click.option("--metrics-listen", metavar="HOST:PORT", help="Serve Prometheus metrics at /metrics here.")
@click.option(
    "--lease-ttl",
    type=commands.Seconds(3600, "an hour", minimum=1),
    default=5.0,
    metavar="SECONDS",
    show_default=True,
    help="How soon peers notice this node is gone.",
)
@click.option(
    "--drain-timeout",
    type=commands.Seconds(3600, "an hour", minimum=0),
    default=30.0,
    metavar="SECONDS",
    show_default=True,
    help="On SIGTERM or Ctrl-C, how long the node may take to hand its entries to the other nodes before it stops.",
)
@click.option(
    "--replicas",
    type=click.IntRange(1, MAX_REPLICAS),
    default=1,
    metavar="N",
    show_default=True,
    help="Copies of each entry in the cluster, on N nodes: a crash of N-1 nodes loses none. Cluster-wide: "
    "the first node records it in etcd, and a node started with another value refuses to join.",
)
@click.option(
    "--replication",
    type=click.Choice(["sync", "async"]),
    default="sync",
    show_default=True,
    help="sync: a write is answered once every replica has it; async: at once, and a crash may lose "
    "what was still on its way to the replicas.",
)
@click.option(
    "--max-memory",
    envvar="DCACHE_MAX_MEMORY",
    type=commands.ByteSize(minimum=MIN_MAX_MEMORY),
    default="0",
    metavar="SIZE",
    help="Memory the entries may take (512MB, 2GiB; also DCACHE_MAX_MEMORY). At the limit a write evicts "
    "others, as --eviction says. The process takes more than this: see the README. [default: no limit]",
)
@click.option(
    "--eviction",
    type=click.Choice(["lru", "lfu", "noeviction"]),
    default="lru",
    show_default=True,
    help="At --max-memory: evict the least recently (lru) or least frequently (lfu) used entries, "
    "or evict nothing and refuse writes with out_of_memory (noeviction).",
)
@click.option(
    "--compress-min",
    type=commands.ByteSize(),
    default="1KiB",
    metavar="SIZE",
    show_default=True,
    help="Keep values of this size or more compressed (zstd) when that saves space; 0 turns it off.",
)
@click.option("--log-level", default="info", metavar="LEVEL", show_default=True, help="debug, info, warning or error.")
@click.option(
    "--busy-poll-us", envvar="DCACHE_BUSY_POLL_US", type=click.IntRange(0, MAX_BUSY_POLL_US), default=int(DEFAULT_BUSY_POLL_US),
    metavar="MICROSECONDS", show_default=True,
    help="Longest spin on a socket before sleeping: lower latency for CPU time; 0 turns it off.",
)  # fmt: skip
@click.option(
    "--auth-token-file", envvar="DCACHE_AUTH_TOKEN_FILE", metavar="FILE",
    help="Clients must say hello with one of the tokens in FILE (one per line; several for rotation; "
    "read again when the file changes). Also DCACHE_AUTH_TOKEN_FILE.",
)  # fmt: skip
@click.option(
    "--read-token-file", envvar="DCACHE_READ_TOKEN_FILE", metavar="FILE",
    help="Tokens that may read, scan and watch, but not write (also DCACHE_READ_TOKEN_FILE).",
)  # fmt: skip
@click.option(
    "--peer-token-file", envvar="DCACHE_PEER_TOKEN_FILE", metavar="FILE",
    help="Tokens for node-to-node links: the peer port accepts only nodes with one, and this node sends "
    "the first (also DCACHE_PEER_TOKEN_FILE).",
)  # fmt: skip
@click.option(
    "--tls-cert",
    envvar="DCACHE_TLS_CERT",
    metavar="FILE",
    help="Serve TLS (wss://) on both ports with this certificate chain (PEM).",
)
@click.option("--tls-key", envvar="DCACHE_TLS_KEY", metavar="FILE", help="The private key of --tls-cert (PEM).")
@click.option(
    "--tls-ca", envvar="DCACHE_TLS_CA", metavar="FILE",
    help="CA that signs the nodes' certificates: peer links check each other against it, both ways (default: the system's CAs, one way).",
)  # fmt: skip
@click.option(
    "--tls-client-ca", envvar="DCACHE_TLS_CLIENT_CA", metavar="FILE",
    help="Clients must show a certificate this CA signed (mutual TLS).",
)  # fmt: skip
@click.option(
    "--max-connections", type=click.IntRange(1, 1_000_000), default=MAX_CONNECTIONS, metavar="N", show_default=True,
    help="Open connections at most, clients and peers together; more are closed at once.",
)  # fmt: skip
@click.option(
    "--max-connections-per-address", type=click.IntRange(1, 1_000_000), default=MAX_CONNECTIONS_PER_ADDRESS, metavar="N",
    show_default=True, help="Open connections at most from one remote address.",
)  # fmt: skip
@click.option(
    "--max-in-flight", type=click.IntRange(1, 100_000), default=MAX_IN_FLIGHT, metavar="FRAMES", show_default=True,
    help="Frames of one connection waiting for other nodes at once; past this it is read no more until replies go out.",
)  # fmt: skip
@click.option(
    "--idle-timeout", type=commands.Seconds(86400, "a day", minimum=1), default=IDLE_TIMEOUT, metavar="SECONDS",
    show_default=True, help="A connection silent this long gets a ping, and is closed if another passes without a pong.",
)  # fmt: skip
@click.option(
    "--hello-timeout", type=commands.Seconds(3600, "an hour", minimum=0.1), default=HELLO_TIMEOUT, metavar="SECONDS",
    show_default=True, help="A new connection must finish its handshakes and say hello within this long.",
)  # fmt: skip
def serve(
    client_listen: str,
    listen: str,
    advertise: str | None,
    etcd: str | None,
    cluster: str,
    etcd_ca: str | None,
    etcd_cert: str | None,
    etcd_key: str | None,
    etcd_user: str | None,
    etcd_password_file: str | None,
    metrics_listen: str | None,
    lease_ttl: float,
    drain_timeout: float,
    replicas: int,
    replication: str,
    max_memory: int,
    eviction: str,
    compress_min: int,
    log_level: str,
    busy_poll_us: int,
    auth_token_file: str | None,
    read_token_file: str | None,
    peer_token_file: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    tls_client_ca: str | None,
    max_connections: int,
    max_connections_per_address: int,
    max_in_flight: int,
    idle_timeout: float,
    hello_timeout: float,
) -> None:
    """Run a node: standalone by default, or part of a cluster with --etcd."""
    import logging

    import trio

    from .node import Node, NodeConfig, NodeStartError

    level = _log_level(log_level)
    addresses = {
        "--client-listen": client_listen,
        "--listen": listen,
        "--advertise": advertise,
        "--metrics-listen": metrics_listen,
    }
    for flag, address in addresses.items():
        if address is None:
            continue
        try:
            if not address:
                raise ValueError("give HOST:PORT")
            split_address(address, 0)
        except ValueError as exc:
            _error(f"{flag}: {exc}")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        etcd_security = _etcd_security(etcd_ca, etcd_cert, etcd_key, etcd_user, etcd_password_file)
        config = NodeConfig(
            client_listen=client_listen,
            listen=listen,
            advertise=advertise,
            etcd=etcd,
            cluster=cluster,
            metrics_listen=metrics_listen,
            lease_ttl=lease_ttl,
            drain_timeout=drain_timeout,
            replicas=replicas,
            replication=replication,
            max_memory=max_memory,
            eviction=eviction,
            compress_min=compress_min,
            busy_poll=busy_poll_us / 1e6,
            auth_token_file=auth_token_file,
            read_token_file=read_token_file,
            peer_token_file=peer_token_file,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
            tls_client_ca=tls_client_ca,
            max_connections=max_connections,
            max_connections_per_address=max_connections_per_address,
            max_in_flight=max_in_flight,
            idle_timeout=idle_timeout,
            hello_timeout=hello_timeout,
            etcd_security=etcd_security,
        )
        trio.run(_serve_until_signalled, Node(config))
    except (NodeStartError, ValueError) as exc:
        _error(str(exc))
    except BaseExceptionGroup as group:
        start_errors = group.subgroup(lambda e: isinstance(e, NodeStartError))
        if start_errors is None:
            raise
        _error(str(_first_leaf(start_errors)))


def _etcd_security(ca: str | None, cert: str | None, key: str | None, user: str | None, password_file: str | None) -> Any:
    """The etcd options as an EtcdSecurity (None if none was given); the
    password from its file's first line, else DCACHE_ETCD_PASSWORD."""
    import os

    from .membership import EtcdSecurity

    password = os.environ.get("DCACHE_ETCD_PASSWORD") or None
    if password_file:
        try:
            with open(password_file, encoding="utf-8") as f:
                password = f.readline().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--etcd-password-file {password_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not password:
            raise ValueError(f"--etcd-password-file {password_file}: its first line is empty")
    if not any((ca, cert, key, user, password)):
        return None
    return EtcdSecurity(ca=ca, cert=cert, key=key, user=user, password=password)


def _log_level(name: str) -> int:
    import logging

    level = logging.getLevelName(name.upper())
    if not isinstance(level, int):
        _error(f"unknown --log-level {name!r}; use debug, info, warning or error")
    return level


def _only(group: BaseExceptionGroup, kind: type[BaseException]) -> BaseException | None:
    """The group's first exception if all of them are ``kind``s, else None."""
    match, rest = group.split(kind)
    return None if match is None or rest is not None else _first_leaf(match)


def _first_leaf(group: BaseException) -> BaseException:
    while isinstance(group, BaseExceptionGroup):
        group = group.exceptions[0]
    return group


MAX_BENCH_KEYS = 10_000_000  # the cleanup sweeps them all: about 30 s at this size
LEAVE_SLACK = 3.0  # seconds for telling etcd, besides handing entries over (--drain-timeout)


async def _serve_until_signalled(node: Any) -> None:
    import logging

    import trio

    log = logging.getLogger("dcache.node")
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("%s received, shutting down", signal.Signals(signum).name)
                    # Leave the cluster first, so that a rolling restart costs
                    # no request an error; a second signal stops at once.
                    with trio.move_on_after(node.config.drain_timeout + LEAVE_SLACK):
                        async with trio.open_nursery() as leaving:

                            async def on_second_signal() -> None:
                                await signals.__anext__()
                                leaving.cancel_scope.cancel()

                            leaving.start_soon(on_second_signal)
                            await node.leave()
                            leaving.cancel_scope.cancel()
                    nursery.cancel_scope.cancel()
                    return

            async def run_node(*, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
                await node.run(task_status=task_status)
                nursery.cancel_scope.cancel()  # it stopped by itself (drained)

            nursery.start_soon(stop_on_signal)  # first: a signal may come while etcd is slow to answer
            await nursery.start(run_node)
    log.info("stopped")


# -- cluster up -------------------------------------------------------------------


@app.group(context_settings=CONTEXT_SETTINGS, no_args_is_help=True)
def cluster() -> None:
    """Run a local cluster to try dcache out."""


@cluster.command("up", context_settings=CONTEXT_SETTINGS)
@click.option("--nodes", "-n", type=click.IntRange(1, 64), default=3, metavar="N", show_default=True, help="How many nodes.")
@click.option(
    "--client-port",
    type=int,
    default=48000,
    metavar="PORT",
    show_default=True,
    help="First node's client port; the others count up.",
)
@click.option("--peer-port", type=int, default=47000, metavar="PORT", show_default=True, help="First node's peer port.")
@click.option(
    "--metrics-port", type=int, default=9100, metavar="PORT", show_default=True, help="First node's metrics port; 0 for none."
)
@click.option("--etcd", envvar="DCACHE_ETCD", metavar="URL", help="Use this etcd instead of starting one (also DCACHE_ETCD).")
@click.option("--cluster", "cluster_name", default="default", metavar="NAME", show_default=True, help="Cluster name.")
@click.option(
    "--replicas",
    type=click.IntRange(1, MAX_REPLICAS),
    default=1,
    metavar="N",
    show_default=True,
    help="Copies of each entry, on N nodes (see dcache serve --help).",
)
@click.option("--log-level", default="warning", metavar="LEVEL", show_default=True, help="The nodes' log level.")
@click.option(
    "--token-file", envvar="DCACHE_TOKEN_FILE", metavar="FILE",
    help="The nodes want the token in FILE from clients and from each other (or the token itself in DCACHE_TOKEN).",
)  # fmt: skip
def cluster_up(
    nodes: int,
    client_port: int,
    peer_port: int,
    metrics_port: int,
    etcd: str | None,
    cluster_name: str,
    replicas: int,
    log_level: str,
    token_file: str | None,
) -> NoReturn:
    """Start etcd and N nodes on this machine; Ctrl-C stops them all."""
    from . import localcluster
    from .security import check_token

    _log_level(log_level)  # the nodes would refuse it, one by one
    try:
        token = commands.AccessOptions.take({"token_file": token_file}).token
        if token is not None:
            check_token(token, "--token-file" if token_file else "DCACHE_TOKEN")
    except ValueError as exc:  # (TokenError included)
        _error(str(exc))
    sys.exit(
        localcluster.up(
            nodes,
            client_port=client_port,
            peer_port=peer_port,
            metrics_port=metrics_port or None,
            etcd=etcd,
            cluster=cluster_name,
            replicas=replicas,
            log_level=log_level,
            token=token,
        )  # fmt: skip
    )


# -- bench ------------------------------------------------------------------------


@app.command(context_settings=CONTEXT_SETTINGS)
@click.option("--server", "-s", help="Node to load (also DCACHE_SERVER).", **commands.SERVER_OPTION)
@click.option(
    "--clients", "-c", type=click.IntRange(1, 10_000), default=50, metavar="N", show_default=True, help="Concurrent client tasks."
)
@click.option(
    "--connections",
    type=click.IntRange(1, 1000),
    default=1,
    metavar="N",
    show_default=True,
    help="Connections per node (per process with --processes), shared by the tasks.",
)
@click.option(
    "--pipeline",
    "-P",
    type=click.IntRange(1, 10_000),
    default=1,
    metavar="N",
    show_default=True,
    help="Requests each task sends per round trip.",
)
@click.option(
    "--ops", "-n", type=click.IntRange(min=1), default=100_000, metavar="N", show_default=True, help="Total operations."
)
@click.option("--ratio", default="1:10", metavar="SETS:GETS", show_default=True, help="Mix of sets to gets.")
@click.option(
    "--value-size", "-d", type=click.IntRange(min=0), default=100, metavar="BYTES", show_default=True, help="Bytes per value."
)
@click.option(
    "--keys",
    type=click.IntRange(1, MAX_BENCH_KEYS),
    default=100_000,
    metavar="N",
    show_default=True,
    help="Distinct keys (key:0 … key:N-1).",
)
@click.option(
    "--ns", default="dcache-bench", metavar="NAME", show_default=True, help="Namespace to write the keys in, apart from your own."
)
@click.option("--keep", is_flag=True, help="Leave the keys written, instead of deleting them at the end.")
@click.option(
    "--ttl",
    type=commands.Seconds(MAX_TTL, "100 years", zero="none"),
    default=0,
    metavar="SECONDS",
    help="TTL of the entries set; 0 for none.",
)
@click.option("--mget", type=click.IntRange(min=0), default=0, metavar="N", help="Make each get an mget of this many keys.")
@click.option("--prefill", is_flag=True, help="Set every key once before measuring.")
@click.option("--cluster", is_flag=True, help="Use the cluster-aware client: each key goes straight to its owner.")
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=1,
    metavar="N",
    show_default=True,
    help="Spread the client tasks over N processes (about one per spare core), so that the bench itself is not what limits the figures.",
)
@click.option(
    "--time-limit",
    type=commands.Seconds(30 * 86400, "30 days", minimum=0.1),
    default=300.0,
    metavar="SECONDS",
    show_default=True,
    help="Stop after this long.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@_access_options
def bench(
    server: str, clients: int, connections: int, pipeline: int, ops: int, ratio: str, value_size: int, keys: int,
    ns: str, keep: bool, ttl: float, mget: int, prefill: bool, cluster: bool, processes: int, time_limit: float, as_json: bool,
    **options: Any,
) -> None:  # fmt: skip
    """Load-test a node or a cluster and report ops/s and latency percentiles."""
    import trio
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table

    from .bench import BenchConfig, parse_ratio, run_bench

    try:
        sets, gets = parse_ratio(ratio)
        config = BenchConfig(
            servers=(server,),
            cluster=cluster, clients=clients, connections=connections, pipeline=pipeline, ops=ops, sets=sets,
            gets=gets, value_size=value_size, keys=keys, ttl=ttl or None, prefill=prefill, mget=mget,
            time_limit=time_limit, ns=ns, keep=keep, processes=processes, access=commands.AccessOptions.take(options),
        )  # fmt: skip
        console = Console(stderr=True)
        with Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, transient=True, disable=as_json or not console.is_terminal,
        ) as progress:  # fmt: skip
            task = progress.add_task("bench", total=ops)
            cleanup = progress.add_task("cleaning up", total=None, visible=False)
            result = trio.run(
                lambda: run_bench(
                    config,
                    on_progress=lambda done: progress.update(task, completed=done),
                    on_cleanup_progress=lambda swept, total: progress.update(cleanup, completed=swept, total=total, visible=True),
                )
            )
    except ValueError as exc:
        _error(str(exc), as_json=as_json)
    except DcacheError as exc:
        sys.exit(commands.render(commands.failure(exc), as_json=as_json))
    except ExceptionGroup as group:  # from the client tasks: a lost node, say
        error = _only(group, DcacheError)
        if error is None:
            raise
        sys.exit(commands.render(commands.failure(error), as_json=as_json))  # type: ignore[arg-type]
    left = f"cleanup stopped: {result.cleanup_error}; keys may be left in namespace {ns!r}" if result.cleanup_error else None
    if as_json:
        print(json.dumps(result.as_dict()))
        if left:
            print(f"warning: {printable(left)}", file=sys.stderr)
        return
    c = result.config
    table = Table(
        title=(
            f"{result.ops:,} ops in {result.elapsed_s:.2f} s = {result.ops_per_s:,.0f} ops/s · "
            f"{c.clients} clients × {c.connections} conn{' (cluster-aware)' if c.cluster else ''}"
            f"{f' in {c.processes} processes' if c.processes > 1 else ''}, pipeline {c.pipeline}, "
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
            print(printable(f"{s.op}: {s.errors:,} errors; the first: {s.first_error}"), file=sys.stderr)
    if left:
        print(f"warning: {printable(left)}", file=sys.stderr)
    elif not c.keep and result.removed_keys:
        print(f"removed the {result.removed_keys:,} keys it wrote in namespace {c.ns!r} (--keep leaves them)", file=sys.stderr)


def main() -> None:
    try:
        status = app.main(prog_name="dcache", standalone_mode=False)
    except click.exceptions.Exit as exc:  # --help, --version
        sys.exit(exc.exit_code)
    except click.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: one line, as ours
        ctx = getattr(exc, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"error: {printable(exc.format_message())}{hint}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BaseExceptionGroup as group:  # Ctrl-C inside trio's task groups
        if _only(group, KeyboardInterrupt) is None:
            raise
        sys.exit(130)
    except OSError as exc:  # writing the output failed: a full disk, say
        print(f"error: {exc.strerror or exc}", file=sys.stderr)
        sys.exit(EXIT_UNAVAILABLE)
    sys.exit(status if isinstance(status, int) else 0)
