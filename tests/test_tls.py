"""TLS migration channels (tls-creds, tls-hostname, tls-authz) and file: target safety.

Certificates are made at test time (a throw-away CA, ``livemig.migration.transport.tls_certs``).
Migrations run between two machines in this process over real loopback sockets.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import socket
import ssl
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from waiting import waiter

from livemig.control.qmp_server import QMPError
from livemig.control.vm_controller import VMController
from livemig.guest.workload import WorkloadConfig
from livemig.machine import Machine, MachineConfig, VirtioMemConfig
from livemig.migration.channels import Listener, MigrationURI, connect
from livemig.migration.core.params import SUPPORTED_CAPABILITIES, Parameters
from livemig.migration.transport import tls
from livemig.migration.transport.tls_channel import TLSChannel
from livemig.migration.transport.tls_errors import TLSConfigError, TLSError

tls_certs = pytest.importorskip("livemig.migration.transport.tls_certs")

MiB, GiB = 1 << 20, 1 << 30
TIMEOUT = 30


# -- credentials ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Creds:
    good: str  # CA A: destination cert for localhost/127.0.0.1/::1, source cert "livemig-source"
    foreign: str  # CA B for everything: trusts only B, presents certificates signed by B
    foreign_client: str  # trusts A, but presents a client certificate signed by B
    ca: Any  # CA A itself (tls_certs.CA), to issue more certificates


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    root = tmp_path_factory.mktemp("tls")
    ca_a, ca_b = tls_certs.make_ca("livemig test CA A"), tls_certs.make_ca("livemig test CA B")
    good = tls_certs.write_creds(root / "good", ca_a)
    foreign = tls_certs.write_creds(root / "foreign", ca_b)
    mixed = tls_certs.write_creds(root / "foreign-client", ca_b, trust=ca_a)
    return Creds(str(good), str(foreign), str(mixed), ca_a)


# -- machines ---------------------------------------------------------------------------------


def machine(incoming: bool, dirty_rate: int = 4 * MiB) -> Machine:
    return Machine(
        MachineConfig(
            memory=32 * MiB,
            virtio_mem=VirtioMemConfig(size=256 * MiB),
            incoming=incoming,
            workload=WorkloadConfig(vcpus=1, dirty_rate=dirty_rate, content="mixed"),
        )
    )


wait_for = waiter(TIMEOUT)


def boot(m: Machine, plugged: int = 32 * MiB) -> None:
    m.start()
    assert m.vmem is not None and m.driver is not None
    m.vmem.set_requested_size(plugged)
    wait_for(lambda: m.driver.plugged_size == plugged and m.workload.fill_done.is_set(), what="plug")


@pytest.fixture
def pair() -> Iterator[tuple[Machine, Machine, VMController, VMController]]:
    src, dst = machine(False), machine(True)
    try:
        boot(src)
        yield src, dst, VMController(src), VMController(dst, autostart=False)
    finally:
        src.close()
        dst.close()


def set_tls(ctl: VMController, creds: str = "", hostname: str = "", authz: str = "") -> None:
    ctl.migrate_set_parameters(tls_creds=creds, tls_hostname=hostname, tls_authz=authz)


def migrate(cs: VMController, cd: VMController, uri: str = "tcp:127.0.0.1:0") -> tuple[dict, dict]:
    """Run one migration; return (source info, destination info) once both ended."""
    cd.migrate_incoming(uri)
    assert cd.incoming is not None
    cs.migrate(str(cd.incoming.uri))
    assert cs.outgoing is not None
    assert cs.outgoing.wait(TIMEOUT), "source did not finish"
    assert cd.incoming.wait(TIMEOUT), "destination did not finish"  # refusals end it too
    return cs.query_migrate(), cd.query_migrate()


def migrate_ok(src: Machine, dst: Machine, cs: VMController, cd: VMController, uri: str = "tcp:127.0.0.1:0") -> None:
    s, d = migrate(cs, cd, uri)
    assert s["status"] == "completed", s
    assert d["status"] == "completed", d
    assert src.runstate == "postmigrate" and dst.runstate == "paused"
    assert src.checksum() == dst.checksum()


# -- parameters -------------------------------------------------------------------------------


def test_parameters_are_set_and_queried_on_both_sides(creds: Creds, tmp_path: Path) -> None:
    p = Parameters()
    q = p.query()
    assert (q["tls-creds"], q["tls-hostname"], q["tls-authz"], q["x-file-overwrite"]) == ("", "", "", False)
    p.set({"tls-creds": creds.good, "tls-hostname": "dst.example", "tls-authz": "a, b",
           "x-file-overwrite": True})
    q = p.query()
    assert q["tls-creds"] == creds.good and q["tls-hostname"] == "dst.example"
    assert q["tls-authz"] == "a, b" and q["x-file-overwrite"] is True
    assert tls.parse_authz(q["tls-authz"]) == {"a", "b"}
    from livemig.migration.core.params import MigrationConfigError

    with pytest.raises(MigrationConfigError, match="is not a directory"):
        p.set({"tls-creds": str(tmp_path / "missing")})
    with pytest.raises(MigrationConfigError, match="expected: string"):
        p.set({"tls-hostname": 5})
    with pytest.raises(MigrationConfigError, match="expected: boolean"):
        p.set({"x-file-overwrite": 1})
    assert p.query()["tls-creds"] == creds.good  # a bad set changes nothing
    p.set({"tls-creds": ""})
    assert p.query()["tls-creds"] == ""


def test_qmp_migrate_set_parameters_takes_the_tls_names(creds: Creds) -> None:
    m = machine(True)
    try:
        ctl = VMController(m)
        ctl.migrate_set_parameters(tls_creds=creds.good, tls_authz="livemig-source")
        out = ctl.query_migrate_parameters()
        assert out["tls-creds"] == creds.good and out["tls-authz"] == "livemig-source"
        with pytest.raises(QMPError, match="not a directory"):
            ctl.migrate_set_parameters(tls_creds="/nonexistent/creds")
    finally:
        m.close()


def test_credential_problems_are_reported_before_the_migration_starts(creds: Creds, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TLSConfigError, match="client-cert.pem is missing"):
        (empty / "ca-cert.pem").write_bytes(Path(creds.good, "ca-cert.pem").read_bytes())
        tls.TLSClient.from_creds(str(empty), "localhost")
    with pytest.raises(TLSConfigError, match="server-cert.pem is missing"):
        tls.TLSServer.from_creds(str(empty))
    p = Parameters()
    p.set({"tls-creds": creds.good})
    with pytest.raises(TLSConfigError, match="needs tls-hostname"):
        tls.TLSClient.from_params(p, MigrationURI("unix", path="/tmp/x"))
    with pytest.raises(TLSConfigError, match="not a network channel"):
        tls.TLSClient.from_params(p, MigrationURI("file", path="/tmp/x"))
    assert tls.TLSClient.from_params(p, MigrationURI("tcp", "127.0.0.1", 1)).hostname == "127.0.0.1"
    assert tls.TLSClient.from_params(Parameters(), MigrationURI("tcp", "h", 1)) is None


# -- migrations over TLS ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_precopy_over_tls(kind: str, creds: Creds, tmp_path: Path, pair) -> None:  # noqa: ANN001
    src, dst, cs, cd = pair
    set_tls(cs, creds.good, hostname="localhost" if kind == "unix" else "")
    set_tls(cd, creds.good, authz="livemig-source")
    uri = "tcp:127.0.0.1:0" if kind == "tcp" else f"unix:{tmp_path / 'tls.sock'}"
    migrate_ok(src, dst, cs, cd, uri)
    ram = cs.query_migrate()["ram"]
    assert ram["normal"] > 0 and ram["remaining"] == 0


def test_tls_to_ipv6_loopback(creds: Creds, pair) -> None:  # noqa: ANN001
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    src, dst, cs, cd = pair
    set_tls(cs, creds.good)
    set_tls(cd, creds.good)
    migrate_ok(src, dst, cs, cd, "tcp:[::1]:0")


@dataclass(frozen=True)
class Refusal:
    name: str
    src: str  # which creds the source uses ("" = no TLS)
    dst: str
    hostname: str = ""
    authz: str = ""
    src_says: str = ""  # what the source's error must contain
    dst_says: str = ""
    src_check: str = ""  # the TLSError check the source reports


REFUSALS = [
    Refusal("plaintext-source", src="", dst="good",
            dst_says="refused the source: it sent a plaintext migration stream"),
    Refusal("plaintext-destination", src="good", dst="",
            src_says="does not speak TLS", src_check="plaintext"),
    Refusal("untrusted-destination-certificate", src="foreign", dst="good",
            src_says="destination's certificate is not trusted", src_check="untrusted",
            dst_says="the source refused the session"),
    Refusal("untrusted-source-certificate", src="foreign_client", dst="good",
            src_says="does not trust our certificate", src_check="peer-refused",
            dst_says="the source's certificate is not trusted"),
    Refusal("unlisted-certificate-name", src="good", dst="good", authz="admin-console, backup-host",
            src_says="not in its tls-authz", src_check="authz",
            dst_says="(livemig-source) are not in tls-authz (admin-console, backup-host)"),
    Refusal("wrong-hostname", src="good", dst="good", hostname="migration.example.org",
            src_says="does not match tls-hostname 'migration.example.org'", src_check="hostname",
            dst_says="the source refused the session"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=lambda c: c.name)
def test_refusal_names_the_check_and_source_can_migrate_again(
    case: Refusal, creds: Creds, pair  # noqa: ANN001
) -> None:
    src, dst, cs, cd = pair
    set_tls(cs, getattr(creds, case.src) if case.src else "", hostname=case.hostname)
    set_tls(cd, getattr(creds, case.dst) if case.dst else "", authz=case.authz)
    written = src.workload.pages_written
    s, d = migrate(cs, cd)
    assert s["status"] == "failed", s
    assert d["status"] == "failed", d
    assert case.src_says in s.get("error-desc", ""), s
    assert case.dst_says in d.get("error-desc", ""), d
    # the source guest keeps running, writing, and is whole
    assert src.runstate == "running"
    wait_for(lambda: src.workload.pages_written > written, what="source guest writes")
    assert not src.accel.dirty_log.active
    assert dst.runstate == "inmigrate"
    # ... and migrates once the configuration is right
    set_tls(cs, creds.good)
    set_tls(cd, creds.good, authz="livemig-source")
    migrate_ok(src, dst, cs, cd)


def wire(client: tls.TLSClient | None, server: tls.TLSServer | None) -> tuple[BaseException | None, BaseException | None]:
    """One connection, the source sending a stream start: (client error, server error)."""
    listener = Listener(MigrationURI("tcp", "127.0.0.1", 0), tls=server)
    server_err: list[BaseException | None] = [None]

    def serve() -> None:
        try:
            ch = listener.accept(timeout=10)
            ch.recv(1)  # plaintext destination: read the client hello, then close
            ch.close()
        except Exception as e:  # noqa: BLE001
            server_err[0] = e

    t = threading.Thread(target=serve)
    t.start()
    client_err = None
    try:
        ch = connect(listener.uri, tls=client)
        try:  # TLS 1.3: the server judges our certificate after our handshake ended
            ch.sendall(b"QEVM" + bytes(1 << 20))
            ch.recv(1)
        finally:
            ch.close()
    except Exception as e:  # noqa: BLE001
        client_err = e
    finally:
        t.join(10)
        listener.close()
    return client_err, server_err[0]


@pytest.mark.parametrize("case", [r for r in REFUSALS if r.src_check], ids=lambda c: c.name)
def test_refusal_check_names_on_the_wire_level(case: Refusal, creds: Creds) -> None:
    """The same refusals on bare channels: the exception's ``check`` says which one."""
    client_p, server_p = Parameters(), Parameters()
    if case.src:
        client_p.set({"tls-creds": getattr(creds, case.src), "tls-hostname": case.hostname})
    if case.dst:
        server_p.set({"tls-creds": getattr(creds, case.dst), "tls-authz": case.authz})
    uri = MigrationURI("tcp", "127.0.0.1", 0)
    err, _ = wire(tls.TLSClient.from_params(client_p, uri), tls.TLSServer.from_params(server_p))
    assert isinstance(err, TLSError), err
    assert err.check == case.src_check
    assert case.src_says in str(err)


def test_expired_client_certificate_is_refused(creds: Creds, tmp_path: Path) -> None:
    d = tmp_path / "expired"
    d.mkdir()
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    cert, key = tls_certs.issue(creds.ca, "livemig-source", client=True, days=1, not_before=long_ago)
    (d / "client-cert.pem").write_bytes(cert)
    (d / "client-key.pem").write_bytes(key)
    (d / "client-key.pem").chmod(0o600)
    (d / "ca-cert.pem").write_bytes(creds.ca.pem)
    client_err, server_err = wire(tls.TLSClient.from_creds(str(d), "127.0.0.1"),
                                  tls.TLSServer.from_creds(creds.good))
    assert isinstance(server_err, TLSError) and server_err.check == "untrusted"
    assert "certificate has expired" in str(server_err)
    assert isinstance(client_err, TLSError) and client_err.check == "peer-refused"
    assert "certificate expired" in str(client_err)


def test_revoked_client_certificate_is_refused(creds: Creds, tmp_path: Path) -> None:
    """ca-crl.pem in the destination's directory: a revoked source certificate is refused."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    d = tmp_path / "with-crl"
    d.mkdir()
    for name in tls.CREDS_FILES:
        (d / name).write_bytes(Path(creds.good, name).read_bytes())
    client = x509.load_pem_x509_certificate((d / "client-cert.pem").read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(creds.ca.cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(client.serial_number)
            .revocation_date(now - datetime.timedelta(minutes=1)).build()
        )
        .sign(creds.ca.key, hashes.SHA256())
    )
    (d / "ca-crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    client_err, server_err = wire(tls.TLSClient.from_creds(creds.good, "127.0.0.1"),
                                  tls.TLSServer.from_creds(str(d)))
    assert isinstance(server_err, TLSError) and server_err.check == "untrusted"
    assert "certificate revoked" in str(server_err)
    assert isinstance(client_err, TLSError) and "revoked" in str(client_err)


def test_missing_client_certificate_is_refused(creds: Creds) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(Path(creds.good, "ca-cert.pem")))
    client_err, server_err = wire(tls.TLSClient(ctx, "127.0.0.1"), tls.TLSServer.from_creds(creds.good))
    assert isinstance(server_err, TLSError) and server_err.check == "no-certificate"
    assert "presented no client certificate" in str(server_err)
    assert isinstance(client_err, TLSError) and client_err.check == "peer-refused"
    assert "requires a client certificate" in str(client_err)


def test_tls12_peer_is_refused(creds: Creds) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(Path(creds.good, "ca-cert.pem")))
    ctx.load_cert_chain(str(Path(creds.good, "client-cert.pem")), str(Path(creds.good, "client-key.pem")))
    client_err, server_err = wire(tls.TLSClient(ctx, "127.0.0.1"), tls.TLSServer.from_creds(creds.good))
    assert isinstance(server_err, TLSError) and server_err.check == "version", server_err
    assert "does not offer TLS 1.3" in str(server_err)
    assert isinstance(client_err, TLSError) and client_err.check == "peer-refused", client_err
    assert "alert: protocol version" in str(client_err)


def test_handshake_timeout_is_a_refusal(creds: Creds) -> None:
    server = tls.TLSServer.from_creds(creds.good)
    a, b = socket.socketpair()
    try:
        with pytest.raises(TLSError, match="did not complete the handshake") as info:
            server.wrap(a, timeout=0.3)
        assert info.value.check == "timeout"
    finally:
        b.close()


def test_file_uri_is_refused_while_tls_is_set(creds: Creds, tmp_path: Path) -> None:
    src, dst = machine(False, dirty_rate=0), machine(True)
    try:
        cs, cd = VMController(src), VMController(dst)
        set_tls(cs, creds.good)
        set_tls(cd, creds.good)
        with pytest.raises(QMPError, match="not a network channel"):
            cs.migrate(f"file:{tmp_path / 'x'}")
        with pytest.raises(QMPError, match="not a network channel"):
            cd.migrate_incoming(f"file:{tmp_path / 'x'}")
        assert not (tmp_path / "x").exists()
        with pytest.raises(QMPError, match="needs tls-hostname"):
            cs.migrate(f"unix:{tmp_path / 's'}")
    finally:
        src.close()
        dst.close()


# -- what is on the wire ----------------------------------------------------------------------


class Relay:
    """A loopback TCP relay between source and destination that records both directions."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.to_dst = bytearray()
        self.to_src = bytearray()
        self._threads: list[threading.Thread] = []
        t = threading.Thread(target=self._run, daemon=True)
        t.start()
        self._threads.append(t)

    def _run(self) -> None:
        self.sock.settimeout(TIMEOUT)
        a, _ = self.sock.accept()
        b = socket.create_connection(self.target)
        for src, dst, rec in ((a, b, self.to_dst), (b, a, self.to_src)):
            t = threading.Thread(target=self._pump, args=(src, dst, rec), daemon=True)
            t.start()
            self._threads.append(t)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, rec: bytearray) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                rec += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
                try:
                    s.shutdown(how)
                except OSError:
                    pass

    def join(self) -> None:
        for t in self._threads:
            t.join(TIMEOUT)
        self.sock.close()


@pytest.mark.parametrize("use_tls", [True, False], ids=["tls", "plaintext"])
def test_captured_traffic_holds_no_guest_page_under_tls(use_tls: bool, creds: Creds) -> None:
    """A marker page written into guest RAM is on the wire in plaintext, and not under TLS."""
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        cs, cd = VMController(src), VMController(dst, autostart=False)
        boot(src)
        marker = hashlib.sha256(b"livemig tls marker %d" % os.getpid()).digest()  # 32 bytes
        page = marker * (4096 // len(marker))
        src.accel.write(8 * MiB, page)
        assert src.vmem_mr is not None
        src.accel.write(src.vmem_mr.addr + 4 * MiB, page)
        if use_tls:
            set_tls(cs, creds.good)
            set_tls(cd, creds.good, authz="livemig-source")
        cd.migrate_incoming("tcp:127.0.0.1:0")
        assert cd.incoming is not None
        relay = Relay(("127.0.0.1", cd.incoming.uri.port))
        cs.migrate(f"tcp:127.0.0.1:{relay.port}")
        assert cs.outgoing is not None and cs.outgoing.wait(TIMEOUT) and cd.incoming.wait(TIMEOUT)
        relay.join()
        assert cs.query_migrate()["status"] == "completed", cs.query_migrate()
        assert cd.query_migrate()["status"] == "completed", cd.query_migrate()
        assert src.checksum() == dst.checksum()
        wire = bytes(relay.to_dst)
        assert len(wire) > 32 * MiB  # the guest's data did go through the relay
        found = wire.count(marker)
        if use_tls:
            assert found == 0, "a guest page crossed the wire in plaintext"
            assert b"QEVM" not in wire and b"pc.ram" not in wire and b"virtio-mem" not in wire
            assert wire[0] == 0x16  # a TLS handshake record
            assert b"livemig-source" not in bytes(relay.to_src)  # TLS 1.3: certs are encrypted
        else:
            assert found >= 2 * 4096 // len(marker)  # both copies of the marker page
            assert wire.startswith(b"QEVM")
    finally:
        src.close()
        dst.close()


# -- the channel itself -----------------------------------------------------------------------


@pytest.fixture
def channel_pair(creds: Creds) -> Iterator[tuple[TLSChannel, TLSChannel]]:
    listener = Listener(MigrationURI("tcp", "127.0.0.1", 0), tls=tls.TLSServer.from_creds(creds.good))
    accepted: list[TLSChannel] = []
    t = threading.Thread(target=lambda: accepted.append(listener.accept(timeout=10)))
    t.start()
    client = connect(listener.uri, tls=tls.TLSClient.from_creds(creds.good, "127.0.0.1"))
    t.join(10)
    listener.close()
    server = accepted[0]
    assert isinstance(client, TLSChannel) and isinstance(server, TLSChannel)
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def test_channel_is_tls13_with_mutual_authentication(channel_pair) -> None:  # noqa: ANN001
    client, server = channel_pair
    assert client.version() == "TLSv1.3" and server.version() == "TLSv1.3"
    assert server.peer_names == {"livemig-source"}
    assert "127.0.0.1" in {v for _, v in client.getpeercert()["subjectAltName"]}


def test_one_reader_and_one_writer_per_end_at_once(channel_pair) -> None:  # noqa: ANN001
    """Both directions at full speed, each end reading in one thread while another writes:
    what the source (migration thread + return-path reader) does, only harder."""
    client, server = channel_pair
    size = 48 * MiB
    payload = {end: os.urandom(1 << 20) for end in ("c", "s")}
    digests: dict[str, str] = {}

    def writer(ch: TLSChannel, key: str) -> None:
        data = memoryview(payload[key])
        for i in range(size // len(data)):
            if i % 2:
                ch.sendall(data)
            else:  # small and large buffers in one scatter-gather call
                assert ch.sendmsg([data[:9], data[9:4096], data[4096:]]) == len(data)

    def reader(ch: TLSChannel, key: str) -> None:
        h, got, buf = hashlib.sha256(), 0, bytearray(3 << 20)
        while got < size:
            n = ch.recv_into(buf, min(len(buf), size - got))
            assert n
            h.update(memoryview(buf)[:n])
            got += n
        digests[key] = h.hexdigest()

    threads = [
        threading.Thread(target=writer, args=(client, "c")),
        threading.Thread(target=writer, args=(server, "s")),
        threading.Thread(target=reader, args=(server, "c")),
        threading.Thread(target=reader, args=(client, "s")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for key in ("c", "s"):
        assert digests[key] == hashlib.sha256(payload[key] * (size >> 20)).hexdigest()


def test_peek_pending_and_orderly_close(channel_pair) -> None:  # noqa: ANN001
    client, server = channel_pair
    client.sendall(b"QEVM and more")
    assert server.recv(4, socket.MSG_PEEK) == b"QEVM"
    assert server.pending() >= 4
    assert server.recv(4) == b"QEVM"
    assert server.recv(100) == b" and more"
    client.close()  # sends close_notify
    assert server.recv(10) == b""


def test_zero_copy_send_is_refused_on_tls(channel_pair) -> None:  # noqa: ANN001
    client, _ = channel_pair
    with pytest.raises(OSError, match="zero-copy"):
        client.sendmsg([b"x"], [], 0x4000000)


def test_cancel_unblocks_a_tls_writer(channel_pair) -> None:  # noqa: ANN001
    """shutdown() from another thread (migrate_cancel) ends a writer stuck on a full pipe
    at once, with the socket's own error, not a TLS one."""
    client, _server = channel_pair
    errors: list[BaseException] = []

    def write() -> None:
        try:
            while True:
                client.sendall(bytes(4 << 20))
        except OSError as e:
            errors.append(e)

    t = threading.Thread(target=write)
    t.start()
    time.sleep(0.3)  # nobody reads: the writer blocks
    start = time.monotonic()
    client.shutdown(socket.SHUT_RDWR)
    t.join(5)
    assert not t.is_alive() and time.monotonic() - start < 1.0
    assert errors and not isinstance(errors[0], TLSError)


# -- postcopy ---------------------------------------------------------------------------------


def _postcopy_missing() -> str | None:
    if "postcopy-ram" not in SUPPORTED_CAPABILITIES:
        return "postcopy has not landed"
    try:
        from livemig.migration.postcopy import placer as postcopy_uffd
    except ImportError:
        return "postcopy has not landed"
    return postcopy_uffd.available()


@pytest.fixture
def postcopy_pair(creds: Creds) -> Iterator[tuple[Machine, Machine, VMController, VMController]]:
    why = _postcopy_missing()
    if why is not None:
        pytest.skip(why)
    # idle guests: the destination's memory must equal the source's at the end
    src, dst = machine(False, dirty_rate=0), machine(True, dirty_rate=0)
    try:
        boot(src)
        cs, cd = VMController(src), VMController(dst, autostart=True)
        set_tls(cs, creds.good)
        set_tls(cd, creds.good, authz="livemig-source")
        caps = [{"capability": "postcopy-ram", "state": True}]
        cs.migrate_set_capabilities(caps)
        cd.migrate_set_capabilities(caps)
        yield src, dst, cs, cd
    finally:
        src.close()
        dst.close()


def start_postcopy(cs: VMController, cd: VMController) -> None:
    cd.migrate_incoming("tcp:127.0.0.1:0")
    assert cd.incoming is not None
    cs.migrate_set_parameters(max_bandwidth=16 * MiB)
    cs.params.set({"max-postcopy-bandwidth": 4 * MiB})  # still busy when we pause
    cs.migrate(str(cd.incoming.uri))
    wait_for(lambda: cs.query_migrate()["status"] == "active", what="active")
    cs.migrate_start_postcopy()  # type: ignore[attr-defined]
    wait_for(lambda: cs.query_migrate()["status"] == "postcopy-active"
             and cd.query_migrate()["status"] == "postcopy-active", what="postcopy-active")
    assert isinstance(cs.outgoing.sock, TLSChannel)  # type: ignore[union-attr]
    assert isinstance(cd.incoming.sock, TLSChannel)  # type: ignore[union-attr]


def finish_postcopy(src: Machine, dst: Machine, cs: VMController, cd: VMController) -> None:
    cs.params.set({"max-postcopy-bandwidth": 0})
    assert cs.outgoing is not None and cs.outgoing.wait(TIMEOUT), cs.query_migrate()
    assert cs.query_migrate()["status"] == "completed", cs.query_migrate()
    assert cd.incoming is not None and cd.incoming.wait(TIMEOUT)
    assert cd.query_migrate()["status"] == "completed", cd.query_migrate()
    cd.stop()
    assert src.checksum() == dst.checksum()


def test_postcopy_over_tls(postcopy_pair) -> None:  # noqa: ANN001
    src, dst, cs, cd = postcopy_pair
    start_postcopy(cs, cd)
    finish_postcopy(src, dst, cs, cd)


def test_postcopy_recovery_over_tls_refuses_a_plaintext_reconnect(postcopy_pair) -> None:  # noqa: ANN001
    """The recovery listener is TLS too: a plaintext connection to it is refused and the
    destination stays paused; the source then reconnects over TLS and completes."""
    src, dst, cs, cd = postcopy_pair
    start_postcopy(cs, cd)
    cs.migrate_pause()  # type: ignore[attr-defined]
    paused = "postcopy-paused"
    wait_for(lambda: cs.query_migrate()["status"] == paused and cd.query_migrate()["status"] == paused,
             what="both paused")
    assert dst.runstate == "running"
    # an intruder (or a misconfigured source) speaks plaintext to the recovery port
    cd.migrate_recover("tcp:127.0.0.1:0")  # type: ignore[attr-defined]
    wait_for(lambda: cd.query_migrate()["status"] == "postcopy-recover-setup", what="recover-setup")
    assert cd.incoming is not None
    with socket.create_connection(("127.0.0.1", cd.incoming.uri.port)) as intruder:
        intruder.sendall(b"QEVM\x00\x00\x00\x03")
        wait_for(lambda: cd.query_migrate()["status"] == paused, what="refused, paused again")
        assert intruder.recv(1) == b""  # closed without a byte of TLS or stream
    assert "plaintext migration stream" in cd.query_migrate().get("error-desc", "")
    # the real source reconnects over TLS
    cd.migrate_recover("tcp:127.0.0.1:0")  # type: ignore[attr-defined]
    cs.migrate(str(cd.incoming.uri), resume=True)
    wait_for(lambda: cs.query_migrate()["status"] in ("postcopy-active", "completed"), what="resumed")
    assert isinstance(cs.outgoing.sock, TLSChannel)  # type: ignore[union-attr]
    finish_postcopy(src, dst, cs, cd)


# -- file: targets ----------------------------------------------------------------------------


@pytest.fixture
def idle_source() -> Iterator[tuple[Machine, VMController]]:
    m = machine(False, dirty_rate=0)
    try:
        boot(m)
        yield m, VMController(m)
    finally:
        m.close()


def file_migration(ctl: VMController, path: Path) -> dict:
    ctl.migrate(f"file:{path}")
    assert ctl.outgoing is not None and ctl.outgoing.wait(TIMEOUT)
    return ctl.query_migrate()


def test_file_target_is_created_owner_only(idle_source, tmp_path: Path) -> None:  # noqa: ANN001
    m, ctl = idle_source
    path = tmp_path / "new.stream"
    assert file_migration(ctl, path)["status"] == "completed"
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert path.read_bytes()[:4] == b"QEVM"


def test_existing_file_is_not_overwritten_unless_asked(idle_source, tmp_path: Path) -> None:  # noqa: ANN001
    m, ctl = idle_source
    path = tmp_path / "precious"
    path.write_bytes(b"keep me")
    info = file_migration(ctl, path)
    assert info["status"] == "failed"
    assert "file exists (set x-file-overwrite to replace it)" in info["error-desc"]
    assert path.read_bytes() == b"keep me"
    assert m.runstate == "running"
    ctl.migrate_set_parameters(x_file_overwrite=True)
    assert file_migration(ctl, path)["status"] == "completed"
    assert path.read_bytes()[:4] == b"QEVM"


@pytest.mark.parametrize("overwrite", [False, True])
def test_symlink_target_is_never_followed(overwrite: bool, idle_source, tmp_path: Path) -> None:  # noqa: ANN001
    m, ctl = idle_source
    victim = tmp_path / "victim"
    victim.write_bytes(b"not yours")
    link = tmp_path / "link.stream"
    link.symlink_to(victim)
    dangling = tmp_path / "dangling.stream"
    dangling.symlink_to(tmp_path / "would-be-created")
    ctl.migrate_set_parameters(x_file_overwrite=overwrite)
    for target in (link, dangling):
        info = file_migration(ctl, target)
        assert info["status"] == "failed", info
        assert "symbolic link" in info["error-desc"] or "file exists" in info["error-desc"]
    assert victim.read_bytes() == b"not yours"
    assert not (tmp_path / "would-be-created").exists()
    assert m.runstate == "running"


def test_overwrite_replaces_only_regular_files(idle_source, tmp_path: Path) -> None:  # noqa: ANN001
    m, ctl = idle_source
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    ctl.migrate_set_parameters(x_file_overwrite=True)
    start = time.monotonic()
    info = file_migration(ctl, fifo)
    assert info["status"] == "failed" and time.monotonic() - start < 5  # did not block
    assert "No such device or address" in info["error-desc"] or "not a regular file" in info["error-desc"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert m.runstate == "running"
