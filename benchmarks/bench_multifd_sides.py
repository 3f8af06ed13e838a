"""Each half of the multifd data path alone, in one process: what bounds a migration here.

* source: a 4 GiB memfd block (RANDOM random bytes then ZERO written zeros) sent through
  ``MultifdSender`` by the real ``RamSaver`` walk, into socket pairs drained by a child
  process that only reads (no destination work at all);
* destination: a child process feeds prebuilt packets (16 MiB of data per packet, then
  zero runs, then SYNC) into ``MultifdReceiver`` channels over socket pairs; the
  receiver populates and fills a fresh memfd block exactly as in a migration.

Prints JSON: seconds, CPU seconds of this process, GB/s of page data. Usage:
``python benchmarks/bench_multifd_sides.py [--random 2G] [--zero 2G] [--channels 1,2]``
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _qemu import warm_host_memory  # noqa: E402

from livemig.cli import parse_size  # noqa: E402
from livemig.memory.ram_block import RAMBlock  # noqa: E402
from livemig.memory.region import MemoryRegion  # noqa: E402
from livemig.migration import multifd  # noqa: E402
from livemig.migration.ram.load import RamLoader  # noqa: E402
from livemig.migration.ram.save import RamSaver  # noqa: E402
from livemig.migration.stream.qemu_file import BytesWriter  # noqa: E402

CHUNK = 16 << 20


def _pairs(n: int) -> list[tuple[socket.socket, socket.socket]]:
    pairs = [socket.socketpair() for _ in range(n)]
    for a, c in pairs:
        for s in (a, c):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return pairs


def source(random_bytes: int, zero_bytes: int, channels: int) -> dict:
    size = random_bytes + zero_bytes
    b = RAMBlock("bench", size)
    a = np.frombuffer(b.mmap, np.uint8, count=size)
    rng = np.random.default_rng(3)
    for off in range(0, random_bytes, CHUNK):
        a[off : off + CHUNK] = rng.integers(0, 256, min(CHUNK, random_bytes - off), dtype=np.uint8)
    a[random_bytes:] = 0  # written zeros: allocated, so the sender has to read them
    pairs = _pairs(channels)
    pid = os.fork()
    if pid == 0:  # drain only
        buf = memoryview(bytearray(CHUNK))

        def drain(s: socket.socket) -> None:
            while s.recv_into(buf, len(buf)):
                pass

        ts = [threading.Thread(target=drain, args=(c,)) for _, c in pairs]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        os._exit(0)
    for _, c in pairs:
        c.close()
    mr = MemoryRegion("bench", b, 0)
    saver = RamSaver([mr], None)
    sender = multifd.MultifdSender([s for s, _ in pairs])
    saver.multifd = sender
    saver.init_bitmaps(start_log=False, sync=False)
    t, c0 = time.perf_counter(), os.times()
    saver.send(BytesWriter())
    dt, c1 = time.perf_counter() - t, os.times()
    sent = sender.bytes_sent()
    sender.close()
    os.waitpid(pid, 0)
    b.close()
    return {"seconds": round(dt, 3), "cpu_s": round(c1.user - c0.user + c1.system - c0.system, 2),
            "bytes_sent": sent, "data_GBps": round(random_bytes / dt / 1e9, 2)}


def destination(random_bytes: int, zero_bytes: int, channels: int) -> dict:
    size = random_bytes + zero_bytes
    b = RAMBlock("bench", size)
    warm_host_memory(size + (1 << 30))
    pairs = _pairs(channels)
    pid = os.fork()
    if pid == 0:  # feed prebuilt packets
        data = np.random.default_rng(1).integers(0, 256, CHUNK, dtype=np.uint8)
        name = b"bench"

        def feed(i: int, s: socket.socket) -> None:
            for k, off in enumerate(range(0, size, CHUNK)):
                if k % channels != i:
                    continue
                n = min(CHUNK, size - off)
                runs = np.array([[off, n]], ">u8").tobytes()
                if off < random_bytes:
                    hdr = multifd.PACKET.pack(multifd.KIND_PAGES, 0, 1, 0, n // 4096) + bytes([len(name)]) + name
                    s.sendmsg([hdr + runs, memoryview(data)[:n]])
                else:
                    s.sendall(multifd.PACKET.pack(multifd.KIND_PAGES, 0, 0, 1, 0) + bytes([len(name)]) + name + runs)
            s.sendall(multifd.PACKET.pack(multifd.KIND_SYNC, 1, 0, 0, 0) + b"\0")
            s.recv(1)  # until the parent closes

        ts = [threading.Thread(target=feed, args=(i, s)) for i, (s, _) in enumerate(pairs)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        os._exit(0)
    for s, _ in pairs:
        s.close()
    loader = RamLoader([b])
    rx = multifd.MultifdReceiver(loader)
    rx.count, rx.session = channels, b"\0" * 16
    t, c0 = time.perf_counter(), os.times()
    for i, (_, c) in enumerate(pairs):
        ch = multifd._RecvChannel(rx, i, c)
        rx.channels[i] = ch
        ch.thread.start()
    rx.flush(0)
    dt, c1 = time.perf_counter() - t, os.times()
    ahead = rx.populator.bytes_ahead
    rx.close()
    os.waitpid(pid, 0)
    alloc = b.allocated_bytes()
    b.close()
    return {"seconds": round(dt, 3), "cpu_s": round(c1.user - c0.user + c1.system - c0.system, 2),
            "data_GBps": round(random_bytes / dt / 1e9, 2), "populated_ahead_bytes": ahead,
            "allocated_bytes": alloc}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--random", type=parse_size, default=2 << 30)
    p.add_argument("--zero", type=parse_size, default=2 << 30)
    p.add_argument("--channels", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    out: dict = {}
    for ch in (int(c) for c in args.channels.split(",")):
        for side, fn in (("source", source), ("destination", destination)):
            runs = [fn(args.random, args.zero, ch) for _ in range(args.repeats)]
            runs.sort(key=lambda r: r["seconds"])
            out[f"{side}_{ch}ch"] = {"median": runs[len(runs) // 2], "seconds_all": [r["seconds"] for r in runs]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
