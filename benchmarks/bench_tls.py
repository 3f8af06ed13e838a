"""TLS benchmarks (issue: encrypted, authenticated migration channels), printed as one JSON object.

(a) migration: SIZE of random-content plugged memory migrated between two ``livemig vm``
    processes over loopback tcp, plaintext and TLS (tls-creds on both ends, tls-authz on
    the destination), the same VM configuration, alternating, REPEATS times each:
    throughput (bytes on the wire / total time), downtime, and the TLS/plaintext ratio of
    the medians.
(b) channel: SIZE bytes in one stream between two processes: a plain socket, livemig's
    TLSChannel (memory BIOs, safe for a reader and a writer thread at once), and Python's
    ssl.SSLSocket (which is not): what the thread-safe design costs.

Credentials are a throw-away CA made at start (``livemig.migration.transport.tls_certs``, needs the
``cryptography`` package).

Usage: python benchmarks/bench_tls.py [--size 2G] [--repeats 3] [--skip a,b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _vm import GiB, VmProcess, free_port  # noqa: E402

from livemig.cli import parse_size  # noqa: E402
from livemig.migration.transport import tls_certs  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_creds(root: Path) -> str:
    return str(tls_certs.write_creds(root / "creds", tls_certs.make_ca()))


def one_migration(size: int, creds: str | None) -> dict:
    port = free_port()
    common = ["--accel", "soft", "--memory", "256M",
              "--virtio-mem", f"id=vm0,size={max(4 * GiB, size)},requested-size=0",
              "--vcpus", "1", "--dirty-rate", "0", "--content", "random"]
    src = VmProcess("src", common)
    dst = VmProcess("dst", [*common, "--incoming", "defer", "-S"], src.dir)
    try:
        src.plug(size)
        if creds:
            src("migrate-set-parameters", **{"tls-creds": creds})
            dst("migrate-set-parameters", **{"tls-creds": creds, "tls-authz": "livemig-source"})
        dst("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
        cpu0 = cpu_seconds(src.proc.pid), cpu_seconds(dst.proc.pid)
        src("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = src.wait_migration()
        assert info["status"] == "completed", info
        dst.wait_migration()
        cpu = cpu_seconds(src.proc.pid) - cpu0[0], cpu_seconds(dst.proc.pid) - cpu0[1]
        same = src("x-query-guest-checksum") == dst("x-query-guest-checksum")
    finally:
        src.close()
        dst.close()
    secs = info["total-time"] / 1000
    return {
        "GBps": info["ram"]["transferred"] / secs / 1e9,
        "seconds": secs,
        "downtime_ms": info["downtime"],
        "bytes": info["ram"]["transferred"],
        "src_cpu_s_per_GB": cpu[0] / (info["ram"]["transferred"] / 1e9),
        "dst_cpu_s_per_GB": cpu[1] / (info["ram"]["transferred"] / 1e9),
        "checksums_equal": same,
    }


def bench_migration(size: int, repeats: int, creds: str) -> dict:
    runs: dict[str, list[dict]] = {"plaintext": [], "tls": []}
    for _ in range(repeats):
        runs["plaintext"].append(one_migration(size, None))
        runs["tls"].append(one_migration(size, creds))
    out: dict = {"plugged_bytes": size, "repeats": repeats}
    for mode, rs in runs.items():
        out[mode] = {
            "GBps_median": round(statistics.median(r["GBps"] for r in rs), 3),
            "GBps_best": round(max(r["GBps"] for r in rs), 3),
            "GBps_all": [round(r["GBps"], 3) for r in rs],
            "src_cpu_s_per_GB_median": round(statistics.median(r["src_cpu_s_per_GB"] for r in rs), 3),
            "dst_cpu_s_per_GB_median": round(statistics.median(r["dst_cpu_s_per_GB"] for r in rs), 3),
            "seconds_median": round(statistics.median(r["seconds"] for r in rs), 3),
            "downtime_ms_median": statistics.median(r["downtime_ms"] for r in rs),
            "bytes_on_wire": rs[0]["bytes"],
            "checksums_equal": all(r["checksums_equal"] for r in rs),
        }
    out["ratio_tls_to_plaintext"] = round(out["tls"]["GBps_median"] / out["plaintext"]["GBps_median"], 3)
    out["ratio_tls_to_plaintext_best"] = round(out["tls"]["GBps_best"] / out["plaintext"]["GBps_best"], 3)
    return out


CHANNEL = r"""
import socket, sys, time
from livemig.migration.transport import tls
mode, creds, size, role = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
def wrap(sock, server):
    if mode == "plain":
        return sock
    if mode == "tlschannel":
        return (tls.TLSServer.from_creds(creds).wrap(sock) if server
                else tls.TLSClient.from_creds(creds, "127.0.0.1").wrap(sock))
    if server:
        return tls.TLSServer.from_creds(creds).context.wrap_socket(sock, server_side=True)
    return tls.TLSClient.from_creds(creds, "127.0.0.1").context.wrap_socket(
        sock, server_hostname="127.0.0.1")
if role == "server":
    ls = socket.create_server(("127.0.0.1", 0)); print(ls.getsockname()[1], flush=True)
    c, _ = ls.accept(); c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    ch = wrap(c, True)
    buf = memoryview(bytearray(4 << 20)); got = 0
    while got < size:
        n = ch.recv_into(buf, len(buf))
        if not n: break
        got += n
    ch.sendall(b"k"); ch.close()
    import resource; r = resource.getrusage(resource.RUSAGE_SELF)
    print(r.ru_utime + r.ru_stime, flush=True)
else:
    port = int(sys.stdin.readline())
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    ch = wrap(s, False)
    data = memoryview(bytearray(4 << 20))
    t = time.perf_counter()
    for _ in range(size // len(data)):
        ch.sendall(data)
    ch.recv(1)
    secs = time.perf_counter() - t
    ch.close()
    import resource; r = resource.getrusage(resource.RUSAGE_SELF)
    print(size / secs / 1e9, r.ru_utime + r.ru_stime, flush=True)
"""


def channel_once(mode: str, creds: str, size: int) -> tuple[float, float, float]:
    """(GB/s, sender CPU s/GB, receiver CPU s/GB); CPU includes interpreter start-up."""
    server = subprocess.Popen([sys.executable, "-c", CHANNEL, mode, creds, str(size), "server"],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    port = server.stdout.readline()
    client = subprocess.run([sys.executable, "-c", CHANNEL, mode, creds, str(size), "client"],
                            input=port, capture_output=True, text=True, check=True)
    rx_cpu = float(server.stdout.readline())
    server.wait()
    gbps, tx_cpu = map(float, client.stdout.split())
    return gbps, tx_cpu / (size / 1e9), rx_cpu / (size / 1e9)


def bench_channel(size: int, repeats: int, creds: str) -> dict:
    modes = ("plain", "tlschannel", "sslsocket")
    runs: dict[str, list[tuple[float, float, float]]] = {m: [] for m in modes}
    for _ in range(repeats):
        for m in modes:
            runs[m].append(channel_once(m, creds, size))
    med = {m: statistics.median(r[0] for r in v) for m, v in runs.items()}
    return {
        "bytes": size,
        **{f"{m}_GBps_median": round(med[m], 3) for m in modes},
        **{f"{m}_GBps_all": [round(r[0], 3) for r in runs[m]] for m in modes},
        **{f"{m}_sender_cpu_s_per_GB": round(statistics.median(r[1] for r in runs[m]), 3) for m in modes},
        **{f"{m}_receiver_cpu_s_per_GB": round(statistics.median(r[2] for r in runs[m]), 3) for m in modes},
        "ratio_tlschannel_to_plain": round(med["tlschannel"] / med["plain"], 3),
        "ratio_tlschannel_to_sslsocket": round(med["tlschannel"] / med["sslsocket"], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=parse_size, default=2 * GiB)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", default="")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    out: dict = {"cpus": os.cpu_count(), "python": platform.python_version()}
    import ssl

    out["openssl"] = ssl.OPENSSL_VERSION
    with tempfile.TemporaryDirectory(prefix="livemig-tls-bench-") as tmp:
        creds = make_creds(Path(tmp))
        start = time.monotonic()
        if "a" not in skip:
            out["migration"] = bench_migration(args.size, args.repeats, creds)
        if "b" not in skip:
            out["channel"] = bench_channel(args.size, args.repeats, creds)
        out["bench_seconds"] = round(time.monotonic() - start, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
