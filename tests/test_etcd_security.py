"""Membership against a real etcd that serves TLS and has authentication
enabled: joining, leases, watches, logging in again, and a clear error for
each way of getting it wrong. Certificates are made at run time (trustme)."""

from __future__ import annotations

import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trustme
from cryptography.hazmat.primitives import serialization

from dcache import membership as membership_module
from dcache.localcluster import EtcdServer, EtcdTLS, free_port
from dcache.membership import EtcdMembership, EtcdSecurity, MembershipError, View

TIMEOUT = 20
LEASE_TTL = 2  # seconds: kept alive every 2/3 s, so a few seconds see many keep-alives
PASSWORD = "s3cret-pa55word"  # etcd's root, in the etcd with authentication


@dataclass(frozen=True)
class Files:
    ca: str  # signed etcd's certificate and the good client certificate
    server: EtcdTLS
    client_cert: str
    client_key: str
    other_ca: str  # signed nothing etcd knows
    stranger_cert: str  # a client certificate other_ca signed
    stranger_key: str
    jwt_public_key: str  # of etcd's key, for etcd to check the tokens it signs


def issue(ca: trustme.CA, folder: Path, name: str, *hosts: str) -> tuple[str, str]:
    cert = ca.issue_cert(*hosts)
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Files:
    folder = tmp_path_factory.mktemp("certs")
    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    other.cert_pem.write_to_path(str(folder / "other-ca.pem"))
    server_cert, server_key = issue(ca, folder, "etcd", "127.0.0.1", "localhost")
    client_cert, client_key = issue(ca, folder, "client", "dcache-node")
    stranger_cert, stranger_key = issue(other, folder, "stranger", "dcache-node")
    key = serialization.load_pem_private_key(Path(server_key).read_bytes(), None)
    public_key = folder / "etcd-public.pem"
    public_key.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return Files(
        ca=str(folder / "ca.pem"),
        server=EtcdTLS(cert=server_cert, key=server_key, ca=str(folder / "ca.pem")),
        client_cert=client_cert,
        client_key=client_key,
        other_ca=str(folder / "other-ca.pem"),
        stranger_cert=stranger_cert,
        stranger_key=stranger_key,
        jwt_public_key=str(public_key),
    )


@pytest.fixture(scope="module")
def secure_etcd(files: Files) -> Iterator[EtcdServer]:
    """TLS, and authentication on with a root user; shared by the tests of this module (each its own cluster)."""
    server = EtcdServer(tls=files.server, root_password=PASSWORD)
    server.start()
    yield server
    server.close()


@pytest.fixture
def mutual_tls_etcd(files: Files) -> Iterator[EtcdServer]:
    """TLS that takes only clients with a certificate our CA signed."""
    server = EtcdServer(tls=EtcdTLS(cert=files.server.cert, key=files.server.key, ca=files.ca, client_cert_auth=True))
    server.start()
    yield server
    server.close()


def root(files: Files) -> EtcdSecurity:
    return EtcdSecurity(ca=files.ca, user="root", password=PASSWORD)


def member(etcd: EtcdServer, cluster: str, name: str, security: EtcdSecurity | None, **options: Any) -> EtcdMembership:
    return EtcdMembership(
        endpoint=etcd.endpoint,
        cluster=cluster,
        node_id=f"{name}:1",
        client_address=f"{name}:2",
        lease_ttl=LEASE_TTL,
        connect_timeout=5,
        security=security,
        **options,
    )


async def next_view(views: trio.MemoryReceiveChannel[View], ids: tuple[str, ...]) -> View:
    async for view in views:
        if view.ids() == ids:
            return view
    raise AssertionError("the views ended")


async def refused(membership: EtcdMembership) -> str:
    """The one-line error ``membership.run`` stops with."""
    with trio.fail_after(TIMEOUT), pytest.raises(MembershipError) as caught:
        await membership.run()  # (runs until the timeout if it starts)
    message = str(caught.value)
    assert "\n" not in message and PASSWORD not in message
    return message


# -- joining ----------------------------------------------------------------------


@pytest.fixture
async def only_watches(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """Views come only from watch events: no re-reading every second."""
    monkeypatch.setattr(membership_module, "RESYNC_INTERVAL", 3600.0)
    yield


async def test_a_node_joins_through_tls_and_auth_keeps_its_lease_and_watches(
    nursery: trio.Nursery, secure_etcd: EtcdServer, files: Files, only_watches: None
) -> None:
    lapses: list[float] = []
    a = member(secure_etcd, "joins", "a", root(files), on_lapse=lambda: lapses.append(trio.current_time()))
    with trio.fail_after(TIMEOUT):
        view = await nursery.start(a.run)
        assert view.ids() == ("a:1",)
        views = a.subscribe()

        # The lease outlives its TTL twice over: keep-alives pass etcd's auth.
        bound = a._lease_bound
        await trio.sleep(2 * LEASE_TTL + 0.5)
        assert not lapses
        assert a._lease_bound > bound + LEASE_TTL and a.vouched_until > trio.current_time()
        assert a.current().ids() == ("a:1",)

        # Another member comes and goes; the watch (no re-reads) shows both.
        async with trio.open_nursery() as inner:
            b = member(secure_etcd, "joins", "b", root(files))
            await inner.start(b.run)
            await next_view(views, ("a:1", "b:1"))
            inner.cancel_scope.cancel()
        await next_view(views, ("a:1",))
    nursery.cancel_scope.cancel()


async def test_an_etcd_restart_costs_nothing(nursery: trio.Nursery, secure_etcd: EtcdServer, files: Files) -> None:
    """Over TLS, a lease keep-alive sent as etcd goes down can hang in grpc
    for good (grpc/grpc#20562); the node gives it up and goes on."""
    a = member(secure_etcd, "restart", "a", root(files))
    with trio.fail_after(TIMEOUT):
        await nursery.start(a.run)
        views = a.subscribe()
        await trio.to_thread.run_sync(secure_etcd.stop)
        await trio.to_thread.run_sync(secure_etcd.start)
        restarted = trio.current_time()
        while a._lease_bound < restarted + LEASE_TTL:  # a keep-alive sent since
            await trio.sleep(0.05)
        async with trio.open_nursery() as inner:
            b = member(secure_etcd, "restart", "b", root(files))
            await inner.start(b.run)
            await next_view(views, ("a:1", "b:1"))
            inner.cancel_scope.cancel()
    nursery.cancel_scope.cancel()


async def test_a_call_that_outlives_its_deadline_is_given_up() -> None:
    """What the node does with such a keep-alive, made to happen: the call is
    given up as timed out, and its stuck thread costs no limiter token."""
    import etcd3.exceptions

    membership = EtcdMembership(endpoint="http://127.0.0.1:2379", cluster="c", node_id="a:1", client_address="a:2")
    membership._client = SimpleNamespace(timeout=0.1)
    stuck = threading.Event()
    tokens = membership._limiter.total_tokens
    try:
        with trio.fail_after(TIMEOUT), pytest.raises(etcd3.exceptions.ConnectionTimeoutError):
            await membership._call(stuck.wait)
        assert membership._limiter.total_tokens == tokens + 1
    finally:
        stuck.set()


@pytest.fixture
def expiring_tokens_etcd(files: Files) -> Iterator[EtcdServer]:
    """Authentication with tokens that expire a second after etcd hands them out (JWT)."""
    jwt = f"jwt,pub-key={files.jwt_public_key},priv-key={files.server.key},sign-method=ES256,ttl=1s"
    server = EtcdServer(tls=files.server, root_password=PASSWORD, auth_token=jwt)
    server.start()
    yield server
    server.close()


async def test_the_node_logs_in_again_when_its_token_expires(
    nursery: trio.Nursery, expiring_tokens_etcd: EtcdServer, files: Files
) -> None:
    """python3-etcd3 keeps the token it got at the start: a second later etcd
    would refuse every read (this etcd checks no token on lease keep-alives)."""
    lapses: list[float] = []
    a = member(expiring_tokens_etcd, "expiry", "a", root(files), on_lapse=lambda: lapses.append(trio.current_time()))
    with trio.fail_after(TIMEOUT):
        await nursery.start(a.run)
        assert a._token is not None
        tokens = {a._token.value}
        views = a.subscribe()
        started = trio.current_time()
        while trio.current_time() < started + 2 * LEASE_TTL + 0.5:
            tokens.add(a._token.value)
            await trio.sleep(0.05)
        assert len(tokens) >= 3  # logged in again at least twice
        assert not lapses and a.healthy
        assert a._lease_bound > started + 2 * LEASE_TTL
        async with trio.open_nursery() as inner:
            b = member(expiring_tokens_etcd, "expiry", "b", root(files))
            await inner.start(b.run)
            await next_view(views, ("a:1", "b:1"))
            inner.cancel_scope.cancel()
        await next_view(views, ("a:1",))
    nursery.cancel_scope.cancel()


async def test_mutual_tls(nursery: trio.Nursery, mutual_tls_etcd: EtcdServer, files: Files) -> None:
    a = member(mutual_tls_etcd, "mtls", "a", EtcdSecurity(ca=files.ca, cert=files.client_cert, key=files.client_key))
    with trio.fail_after(TIMEOUT):
        view = await nursery.start(a.run)
        assert view.ids() == ("a:1",)

    for security in (
        EtcdSecurity(ca=files.ca),
        EtcdSecurity(ca=files.ca, cert=files.stranger_cert, key=files.stranger_key),
    ):
        message = await refused(member(mutual_tls_etcd, "mtls", "b", security))
        assert message.startswith(f"TLS to etcd at {mutual_tls_etcd.endpoint} failed: etcd did not accept our client certificate")
    nursery.cancel_scope.cancel()


async def test_without_a_ca_the_systems_trust_is_used(
    nursery: trio.Nursery, secure_etcd: EtcdServer, files: Files, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL's system bundle, here named by SSL_CERT_FILE as an administrator may."""
    security = EtcdSecurity(user="root", password=PASSWORD)
    monkeypatch.setenv("SSL_CERT_FILE", files.other_ca)
    message = await refused(member(secure_etcd, "system", "a", security))
    assert message.startswith(
        f"TLS to etcd at {secure_etcd.endpoint} failed: etcd's certificate is not signed by the CA we trust"
    )

    monkeypatch.setenv("SSL_CERT_FILE", files.ca)
    with trio.fail_after(TIMEOUT):
        view = await nursery.start(member(secure_etcd, "system", "a", security).run)
        assert view.ids() == ("a:1",)
    nursery.cancel_scope.cancel()


# -- refused ------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["root", "nobody"])
async def test_a_wrong_password_or_unknown_user(secure_etcd: EtcdServer, files: Files, user: str) -> None:
    security = EtcdSecurity(ca=files.ca, user=user, password="wrong-" + PASSWORD)
    message = await refused(member(secure_etcd, "refused", "a", security))
    assert message == f"etcd refused user {user}: authentication failed"
    assert "wrong-" not in message and PASSWORD not in repr(security)


async def test_no_user_where_etcd_wants_one(secure_etcd: EtcdServer, files: Files) -> None:
    message = await refused(member(secure_etcd, "refused", "a", EtcdSecurity(ca=files.ca)))
    assert message == f"etcd at {secure_etcd.endpoint} has authentication enabled: give a user and password (--etcd-user)"


async def test_a_user_without_rights_on_the_clusters_keys(secure_etcd: EtcdServer, files: Files) -> None:
    import etcd3
    from etcd3 import etcdrpc

    def add_user() -> None:
        etcd = etcd3.client("127.0.0.1", secure_etcd.client_port, ca_cert=files.ca, user="root", password=PASSWORD)
        try:
            request = etcdrpc.AuthUserAddRequest(name="nobody-much", password="its-password")
            etcd.authstub.UserAdd(request, 5, credentials=etcd.call_credentials)
        finally:
            etcd.close()

    with trio.fail_after(TIMEOUT):
        await trio.to_thread.run_sync(add_user)
    security = EtcdSecurity(ca=files.ca, user="nobody-much", password="its-password")
    message = await refused(member(secure_etcd, "refused", "a", security))
    assert message == "etcd denied user nobody-much access to /dcache/refused/: permission denied"


async def test_a_ca_that_did_not_sign_etcds_certificate(secure_etcd: EtcdServer, files: Files) -> None:
    security = EtcdSecurity(ca=files.other_ca, user="root", password=PASSWORD)
    message = await refused(member(secure_etcd, "refused", "a", security))
    assert message.startswith(
        f"TLS to etcd at {secure_etcd.endpoint} failed: etcd's certificate is not signed by the CA we trust"
    )
    assert "CERTIFICATE_VERIFY_FAILED" in message


async def test_tls_to_an_etcd_that_speaks_plain_http(etcd_server: EtcdServer, files: Files) -> None:
    endpoint = etcd_server.endpoint.replace("http://", "https://")
    membership = EtcdMembership(
        endpoint=endpoint, cluster="c", node_id="a:1", client_address="a:2", security=EtcdSecurity(ca=files.ca)
    )
    assert (await refused(membership)).startswith(f"TLS to etcd at {endpoint} failed: does etcd serve TLS there?")


def test_options_that_do_not_go_together_are_refused_at_once(files: Files) -> None:
    https, http = f"https://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
    cases = [
        (http, EtcdSecurity(ca=files.ca), f"--etcd-ca needs an https:// endpoint (--etcd is {http})"),
        ("127.0.0.1:2379", EtcdSecurity(cert=files.client_cert, key=files.client_key), "--etcd-cert needs an https:// endpoint"),
        (https, EtcdSecurity(cert=files.client_cert), "--etcd-cert needs --etcd-key"),
        (https, EtcdSecurity(key=files.client_key), "--etcd-key needs --etcd-cert"),
        (https, EtcdSecurity(user="root"), "--etcd-user root needs a password"),
        (https, EtcdSecurity(password=PASSWORD), "an etcd password needs a user name (--etcd-user)"),
        (https, EtcdSecurity(user="", password=PASSWORD), "--etcd-user is empty"),
        (http, EtcdSecurity(user="root", password=PASSWORD), "--etcd-user needs an https:// endpoint"),
    ]
    for endpoint, security, expected in cases:
        with pytest.raises(MembershipError) as caught:
            EtcdMembership(endpoint=endpoint, cluster="c", node_id="a:1", client_address="a:2", security=security)
        assert str(caught.value).startswith(expected), (security, str(caught.value))
        assert PASSWORD not in str(caught.value)


async def test_files_that_cannot_be_used(files: Files, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found before any connection: nothing listens at the endpoint."""
    https = f"https://127.0.0.1:{free_port()}"
    (tmp_path / "not-pem").write_text("hello\n")
    missing = str(tmp_path / "missing.pem")
    cases = [
        (EtcdSecurity(ca=missing), f"cannot read --etcd-ca {missing}: No such file or directory"),
        (EtcdSecurity(ca=str(tmp_path)), f"cannot read --etcd-ca {tmp_path}: Is a directory"),
        (EtcdSecurity(ca=str(tmp_path / "not-pem")), f"cannot use --etcd-ca {tmp_path / 'not-pem'}: "),
        (EtcdSecurity(ca=files.ca, cert=missing, key=files.client_key), f"cannot read --etcd-cert {missing}: "),
        (EtcdSecurity(ca=files.ca, cert=files.client_cert, key=missing), f"cannot read --etcd-key {missing}: "),
        (
            EtcdSecurity(ca=files.ca, cert=files.client_cert, key=files.stranger_key),
            f"cannot use --etcd-cert {files.client_cert}: ",
        ),
    ]
    for security, expected in cases:
        membership = EtcdMembership(endpoint=https, cluster="c", node_id="a:1", client_address="a:2", security=security)
        assert (await refused(membership)).startswith(expected), security

    # No CA given and no system bundle to fall back on.
    nowhere = ssl.DefaultVerifyPaths("", "", "SSL_CERT_FILE", str(tmp_path / "no-bundle.pem"), "SSL_CERT_DIR", "")
    monkeypatch.setattr(ssl, "get_default_verify_paths", lambda: nowhere)
    membership = EtcdMembership(endpoint=https, cluster="c", node_id="a:1", client_address="a:2", security=EtcdSecurity())
    assert (await refused(membership)).startswith("no CA to check etcd's certificate at")


def test_the_password_is_not_in_the_repr() -> None:
    assert PASSWORD not in repr(EtcdSecurity(user="root", password=PASSWORD))
