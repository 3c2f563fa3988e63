"""`dcache cluster up` and EtcdServer never leave etcd, nodes or data folders behind:
not when their terminal closes, not when they are killed with -9."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import subprocess
import sys
import tempfile
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import alive, children, consecutive_free_ports

from dcache import localcluster
from dcache.localcluster import EtcdServer, port_is_free, wait_until_serving

NODES = 2
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc; PR_SET_PDEATHSIG is Linux's")


class ClusterUp:
    """A `python -m dcache cluster up` with NODES nodes on free ports, and what it started."""

    def __init__(self, **popen: object) -> None:
        self.client, self.peer = consecutive_free_ports(NODES), consecutive_free_ports(NODES)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dcache", "cluster", "up", "--nodes", str(NODES), "--client-port", str(self.client),
             "--peer-port", str(self.peer), "--metrics-port", "0"],
            **popen,  # type: ignore[call-overload]
        )  # fmt: skip
        self.started: dict[int, bytes] = {}

    def wait_until_serving(self) -> None:
        for i in range(NODES):
            assert wait_until_serving(f"localhost:{self.client + i}", START_TIMEOUT)
        self.started = children(self.proc.pid)
        assert len(self.started) == NODES + 1  # and etcd

    def etcd_argument(self, flag: str) -> str:
        [etcd] = [cmdline.split(b"\0") for cmdline in self.started.values() if b"--data-dir" in cmdline]
        return etcd[etcd.index(flag.encode()) + 1].decode()

    def ports(self) -> list[int]:
        etcd = [int(self.etcd_argument(flag).rsplit(":", 1)[1]) for flag in ("--listen-client-urls", "--listen-peer-urls")]
        return [*etcd, *(self.client + i for i in range(NODES)), *(self.peer + i for i in range(NODES))]

    def left(self) -> list[int]:
        return [pid for pid, cmdline in self.started.items() if alive(pid, cmdline)]

    def wait_until_gone(self) -> list[int]:
        """What it started and is still alive after a generous while."""
        deadline = time.monotonic() + STOP_TIMEOUT
        while (left := self.left()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def kill_what_is_left(self) -> None:
        """Never leave a process behind, even when the test fails."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in self.left():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def cluster_up(**popen: object) -> Iterator[ClusterUp]:
    up = ClusterUp(**popen)
    try:
        yield up
    finally:
        up.kill_what_is_left()


def test_sighup_stops_the_cluster_like_ctrl_c_even_twice() -> None:
    """A closed terminal's SIGHUP often comes twice (the kernel's, the
    shell's): unlike a second Ctrl-C, the second does not kill at once."""
    with cluster_up(stdout=subprocess.PIPE, stderr=subprocess.PIPE) as up:
        up.wait_until_serving()
        data_dir = up.etcd_argument("--data-dir")
        [stuck] = [pid for pid, cmdline in up.started.items() if f"localhost:{up.client}".encode() in cmdline.split(b"\0")]
        os.kill(stuck, signal.SIGSTOP)  # deaf to SIGTERM: the stop gives it STOP_TIMEOUT, then kills it
        hung_up = time.monotonic()
        up.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        up.proc.send_signal(signal.SIGHUP)
        status = up.proc.wait(STOP_TIMEOUT)
        assert time.monotonic() - hung_up >= localcluster.STOP_TIMEOUT
        assert up.wait_until_gone() == []
        _, err = up.proc.communicate(timeout=STOP_TIMEOUT)  # what it started had its pipes too
        assert status == 0, err
        assert b"cluster stopped" in err and b"Traceback" not in err
        assert all(port_is_free(port) for port in up.ports())
        assert not os.path.exists(data_dir)


class Terminal:
    """A pseudo-terminal; what is written to it is read and kept, so that writers never block."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.output = bytearray()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closing.is_set():
            if select.select([self.master], [], [], 0.1)[0]:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: no process has the terminal open
                    time.sleep(0.1)
                    continue
                self.output += chunk

    def wait_for(self, text: bytes) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while text not in self.output:
            assert time.monotonic() < deadline, bytes(self.output)[-2000:]
            time.sleep(0.05)

    def controlling(self) -> None:
        """preexec_fn of a session leader whose standard streams are this terminal: make it its controlling terminal."""
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def close(self) -> None:
        """As when its window closes: its session gets SIGHUP and writes fail (EIO)."""
        self._closing.set()
        self._reader.join(5)
        for fd in (self.slave, self.master):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_closing_its_terminal_stops_the_cluster() -> None:
    terminal = Terminal()
    try:
        with cluster_up(
            stdin=terminal.slave,
            stdout=terminal.slave,
            stderr=terminal.slave,
            start_new_session=True,
            preexec_fn=terminal.controlling,
        ) as up:
            os.close(terminal.slave)
            up.wait_until_serving()
            terminal.wait_for(b"Ctrl-C stops the cluster.")
            data_dir = up.etcd_argument("--data-dir")
            terminal.close()
            assert up.proc.wait(STOP_TIMEOUT) == 0, bytes(terminal.output)[-2000:]
            assert up.left() == []
            assert all(port_is_free(port) for port in up.ports())
            assert not os.path.exists(data_dir)
    finally:
        terminal.close()


def test_kill_9_takes_etcd_and_the_nodes_with_it_and_the_next_start_removes_its_folder() -> None:
    with cluster_up(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as up:
        up.wait_until_serving()
        data_dir = up.etcd_argument("--data-dir")
        up.proc.kill()
        up.proc.wait(STOP_TIMEOUT)
        assert up.wait_until_gone() == []
        assert all(port_is_free(port) for port in up.ports())
        # Nothing could remove etcd's folder at once; the next EtcdServer does.
        assert os.path.exists(data_dir)
        EtcdServer().close()
        assert not os.path.exists(data_dir)


def _owner(*, killed: bool) -> tuple[subprocess.Popen[bytes], Path]:
    """A process that made an EtcdServer (its data folder); killed with -9 if ``killed``."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dcache.localcluster import EtcdServer\n"
         "print(EtcdServer().data_dir, flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
    assert ready, "the owner did not start"
    data_dir = Path(proc.stdout.readline().decode().strip())
    assert data_dir.is_dir()
    if killed:
        proc.kill()
        proc.wait(STOP_TIMEOUT)
    return proc, data_dir


def test_a_new_etcd_server_removes_the_folders_of_dead_owners_only() -> None:
    owners: list[subprocess.Popen[bytes]] = []
    try:
        living, living_dir = _owner(killed=False)
        owners.append(living)
        dead, dead_dir = _owner(killed=True)
        owners.append(dead)
        assert dead_dir.is_dir()
        server = EtcdServer()
        try:
            assert not dead_dir.exists()
            assert living_dir.is_dir()  # its owner is alive: untouched
            given = Path(tempfile.gettempdir()) / f"dcache-etcd-given-{os.getpid()}"
            given.mkdir()
            try:
                EtcdServer(data_dir=str(given)).close()
                EtcdServer().close()
                assert given.is_dir()  # a folder the caller named is never removed
            finally:
                given.rmdir()
        finally:
            server.close()
        assert not Path(server.data_dir).exists()
    finally:
        for proc in owners:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    # The living owner's folder is its own to remove; it was killed here, so the next start does.
    EtcdServer().close()
    assert not living_dir.exists()


def test_cluster_up_with_a_token_wants_it_from_clients_and_between_nodes() -> None:
    token = "cluster-" + os.urandom(16).hex()
    env = {**os.environ, "DCACHE_TOKEN": token}
    env.pop("DCACHE_TOKEN_FILE", None)
    with cluster_up(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as up:
        for i in range(NODES):
            assert wait_until_serving(f"localhost:{up.client + i}", START_TIMEOUT, token=token)
        assert not wait_until_serving(f"localhost:{up.client}", 1.0)  # without the token
        up.started = children(up.proc.pid)
        nodes = [cmdline for cmdline in up.started.values() if b"serve" in cmdline]
        assert len(nodes) == NODES and all(b"--peer-token-file" in cmdline for cmdline in nodes)
        assert all(token.encode() not in cmdline for cmdline in nodes)  # a file, never a command-line value
        from dcache import SyncClient

        with SyncClient(f"localhost:{up.client}", token=token) as first:
            first.mset({f"k{i}": str(i) for i in range(20)})  # owned by both nodes: half forwarded, with the peer token
        with SyncClient(f"localhost:{up.client + 1}", token=token) as second:
            assert second.mget([f"k{i}" for i in range(20)]) == [str(i).encode() for i in range(20)]
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(STOP_TIMEOUT) == 0
        assert up.wait_until_gone() == []
