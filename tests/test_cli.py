"""The ``livemig`` command line driven as a user drives it: real processes, real sockets.

Every mistake a user can make gets one line on stderr that names the thing (path, URI,
option, value), a non-zero exit status and no traceback; the VM says when it is ready;
Ctrl-C cancels a migration; statistics use QEMU's names everywhere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from vm_processes import LIVEMIG, VmProcess

from livemig.cli.main import build_parser
from livemig.cli.progress import MigrationBar, RestoreBar
from livemig.cli.sizes import parse_size, size_bytes, size_mib
from livemig.control.qmp_client import QMPClient

MiB, GiB = 1 << 20, 1 << 30


def run(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LIVEMIG, *args], capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def the_line(proc: subprocess.CompletedProcess[str], prefix: str) -> str:
    """The one error line of a failed command; no traceback anywhere."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[VmProcess]:
    v = VmProcess(tmp_path)
    yield v
    v.stop()


def wait_status(c: QMPClient, *states: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = c.execute("query-migrate")
        if info.get("status") in states:
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.02)


# =============================================================================================
# --qmp: a VM that is not there, an address that is not one, QEMU's tcp: form
# =============================================================================================

COMMANDS = {
    "info": ["info"],
    "migrate": ["migrate", "tcp:127.0.0.1:1"],
    "snapshot": ["snapshot", "out.snap"],
}


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_missing_or_stale_qmp_socket_fails_at_once_naming_the_path(cmd: str, tmp_path: Path):
    missing = tmp_path / "nothing.qmp"
    t0 = time.monotonic()
    proc = run(*COMMANDS[cmd][:1], "--qmp", str(missing), *COMMANDS[cmd][1:])
    assert time.monotonic() - t0 < 5  # no waiting for a socket that is not there
    assert proc.returncode == 1
    assert the_line(proc, f"livemig {cmd}: ") == (
        f"livemig {cmd}: no QMP socket at {missing} (is the VM running?)")
    stale = tmp_path / "stale.qmp"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    proc = run(*COMMANDS[cmd][:1], "--qmp", f"unix:{stale}", *COMMANDS[cmd][1:])
    assert proc.returncode == 1
    assert the_line(proc, f"livemig {cmd}: ") == (
        f"livemig {cmd}: nothing listens on QMP socket {stale} (a stale socket file?)")


@pytest.mark.parametrize("value", ["gopher:x", "tcp:127.0.0.1", "tcp:host:99999", "unix:"])
@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_bad_qmp_value_is_named(cmd: str, value: str):
    proc = run(*COMMANDS[cmd][:1], "--qmp", value, *COMMANDS[cmd][1:])
    assert proc.returncode == 2
    assert f"invalid QMP address {value!r}" in the_line(proc, f"livemig {cmd}: --qmp: ")


def test_qmp_over_tcp_as_in_qemu(tmp_path: Path):
    v = VmProcess(tmp_path, qmp="tcp:127.0.0.1:0,server=on,wait=off")
    try:
        assert re.fullmatch(r"tcp:127\.0\.0\.1:\d+", v.address) and not v.address.endswith(":0")
        proc = run("info", "--qmp", v.address)
        assert proc.returncode == 0, proc.stderr
        assert re.search(r"^query-status\n  status +running$", proc.stdout, re.M), proc.stdout
    finally:
        v.stop()
    proc = run("vm", "--qmp", "tcp:nohost")
    assert proc.returncode == 2
    assert "invalid QMP address 'tcp:nohost'" in the_line(proc, "livemig vm: argument --qmp")


def test_ready_line_names_the_qmp_socket_and_comes_when_it_answers(tmp_path: Path):
    sock = tmp_path / "r.qmp"
    v = VmProcess(tmp_path, "--incoming", "tcp:127.0.0.1:0", qmp=f"unix:{sock}")
    try:
        assert v.lines[0] == f"livemig vm: ready, QMP unix:{sock}, {v.lines[0].split(', ')[-1]}"
        assert v.address == f"unix:{sock}"
        assert re.fullmatch(r"tcp:127\.0\.0\.1:[1-9]\d*", v.incoming or "")  # the real port
        with QMPClient(v.address) as c:  # at once: no retry needed
            assert c.execute("query-status")["status"] == "inmigrate"
    finally:
        v.stop()


# =============================================================================================
# livemig vm: option mistakes, QEMU's size rules
# =============================================================================================


@pytest.mark.parametrize(
    ("args", "code", "expected"),
    [
        (["--memory", "12x"], 2, "livemig vm: argument --memory/-m: invalid size '12x'"),
        (["--memory", "1"], 2, "livemig vm: --memory must be a positive multiple of 2 MiB"),
        (["--virtio-mem", "id=vm0,size=3X"], 2,
         "livemig vm: argument --virtio-mem: size: invalid size '3X'"),
        (["--virtio-mem", "id=vm0"], 2, "livemig vm: argument --virtio-mem: needs size="),
        (["--virtio-mem", "id=vm0,size=1G,color=red"], 2,
         "livemig vm: argument --virtio-mem: unknown property 'color'"),
        (["--accel", "foo"], 2, "livemig vm: unknown accelerator 'foo'"),
        (["--log", "loud"], 2, "livemig vm: argument --log: invalid choice: 'loud'"),
        (["--incoming", "gopher:x"], 1, "livemig vm: --incoming: Failed to start incoming "
         "migration: unsupported migration URI scheme 'gopher' in 'gopher:x'"),
        (["--incoming", "file:/nonexistent/stream"], 1, "livemig vm: --incoming: Failed to start "
         "incoming migration: file:/nonexistent/stream: No such file or directory"),
        (["--qmp", "/nonexistent/dir/vm.qmp"], 1, "livemig vm: --qmp: cannot create QMP socket "
         "/nonexistent/dir/vm.qmp: No such file or directory"),
    ],
)
def test_vm_option_mistakes(args: list[str], code: int, expected: str, tmp_path: Path):
    base = ["vm", "--accel", "soft", "--memory", "64M", "--no-prefill"]
    if "--qmp" not in args:
        base += ["--qmp", f"unix:{tmp_path / 'q.qmp'}"]
    t0 = time.monotonic()
    proc = run(*base, *args, timeout=30)
    assert proc.returncode == code, proc.stderr
    assert the_line(proc, expected)
    assert time.monotonic() - t0 < 15
    assert not (tmp_path / "q.qmp").exists()


def test_a_live_qmp_socket_is_refused_and_left_alone(vm: VmProcess, tmp_path: Path):
    path = vm.address.removeprefix("unix:")
    proc = run("vm", "--accel", "soft", "--memory", "64M", "--qmp", vm.address, timeout=30)
    assert proc.returncode == 1
    assert the_line(proc, "livemig vm: ") == f"livemig vm: --qmp: QMP socket {path} is in use"
    with vm.client() as c:  # the first VM's socket still works
        assert c.execute("query-status")["running"] is True


def test_sizes_follow_qemu_rules(tmp_path: Path):
    # -m takes MiB, QEMU's size properties take bytes, suffixes are powers of 1024
    assert size_mib("1000") == 1000 * MiB and size_mib("2G") == 2 * GiB
    assert size_bytes("4096") == 4096 and size_bytes("2M") == 2 * MiB
    assert parse_size("1.5G") == 3 * GiB // 2 and parse_size("0x1000") == 4096
    assert parse_size("8GiB") == parse_size("8gb") == 8 * GiB
    for bad in ("", "12x", "-1", "1.5", "0x10K", "1.0000001K"):
        with pytest.raises(Exception, match="invalid size"):
            parse_size(bad)
    v = VmProcess(tmp_path, "--virtio-mem", "id=vm0,size=1073741824,block-size=2097152",
                  "--no-prefill", memory="96")
    try:
        proc = run("info", "--qmp", v.address, "--json")
        info = json.loads(proc.stdout)
        ram = {b["id"]: b["size"] for b in info["x-query-ram-allocation"]}
        assert ram["pc.ram"] == 96 * MiB  # a bare --memory is MiB, as QEMU's -m
        dev = info["query-memory-devices"][0]["data"]
        assert dev["max-size"] == GiB and dev["block-size"] == 2 * MiB  # bytes, as QEMU's
    finally:
        v.stop()


def test_version():
    proc = run("--version")
    assert proc.returncode == 0 and proc.stdout == "livemig 0.1.0\n"
    script = Path(sys.executable).with_name("livemig")  # the console script
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout == "livemig 0.1.0\n"


def test_every_option_has_help_and_help_has_no_markup():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.choices and isinstance(a.choices, dict))  # noqa: SLF001
    from livemig.cli.inspect import _parser as inspect_parser  # noqa: PLC0415

    parsers = {"livemig": parser, **sub.choices, "inspect": inspect_parser()}
    for name, p in parsers.items():
        for action in p._actions:  # noqa: SLF001
            if action.dest in ("help", "command"):
                continue
            assert action.help and action.help.strip(), (name, action.option_strings or action.dest)
    for cmd in ["", *sorted(sub.choices)]:
        proc = run(*([cmd] if cmd else []), "--help")
        assert proc.returncode == 0, (cmd, proc.stderr)
        assert "`" not in proc.stdout, (cmd, proc.stdout)


# =============================================================================================
# livemig demo: the VM's own message, cleaning up
# =============================================================================================


def _demo_dirs(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("livemig-demo-*"))


@pytest.mark.parametrize(
    ("args", "code", "expected", "keeps_dir"),
    [
        (["--memory", "1"], 1, "livemig demo: the source VM did not start: --memory must be a "
         "positive multiple of 2 MiB", True),
        (["--uri", "gopher:x"], 1, "livemig demo: the destination VM did not start: --incoming: "
         "Failed to start incoming migration: unsupported migration URI scheme 'gopher'", True),
        (["--plugged", "3M"], 2, "livemig demo: --plugged 3.00 MiB: must be a positive multiple "
         "of the 2.00 MiB block size", False),
        (["--plugged", "4G", "--virtio-mem-size", "2G"], 2,
         "livemig demo: --plugged 4.00 GiB: more than --virtio-mem-size 2.00 GiB", False),
        (["--accel", "foo"], 2, "livemig demo: --accel: unknown accelerator 'foo'", False),
        (["--memory", "lots"], 2, "livemig demo: argument --memory: invalid size 'lots'", False),
    ],
)
def test_demo_mistakes_show_the_real_message(args: list[str], code: int, expected: str,
                                             keeps_dir: bool, tmp_path: Path):
    t0 = time.monotonic()
    proc = run("demo", "--accel", "soft", *args, timeout=60, env={"TMPDIR": str(tmp_path)})
    assert time.monotonic() - t0 < 20
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("livemig demo:")]
    assert lines[0].startswith(expected), lines
    assert len(lines) == 1, lines
    dirs = _demo_dirs(tmp_path)
    if keeps_dir:  # a failure keeps the logs and says where
        assert len(dirs) == 1 and lines[0].endswith(f"; the VMs' logs are kept in {dirs[0]}")
        assert {p.name for p in dirs[0].iterdir()} >= {"source.log", "destination.log"}
    else:
        assert dirs == []


def test_demo_succeeds_speaks_qemu_and_leaves_nothing(tmp_path: Path):
    proc = run("demo", "--json", "--accel", "soft", "--memory", "128", "--virtio-mem-size", "1G",
               "--plugged", "256M", "--dirty-rate", "8", timeout=240,
               env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert all(out["checks"].values()), out["checks"]
    info = out["query-migrate"]
    assert info["status"] == "completed" and {"total-time", "downtime", "setup-time"} <= set(info)
    assert {"transferred", "duplicate", "normal", "mbps"} <= set(info["ram"])
    assert _demo_dirs(tmp_path) == []  # nothing left behind


# =============================================================================================
# migrate / info: Ctrl-C, a closed pipe, one vocabulary
# =============================================================================================


@pytest.mark.parametrize("cmd", ["migrate", "snapshot"])
def test_ctrl_c_cancels_the_migration_and_says_so(cmd: str, tmp_path: Path):
    v = VmProcess(tmp_path, "--dirty-rate", "0", memory="256M")
    what = "migration" if cmd == "migrate" else "snapshot"
    try:
        with v.client() as c:
            # 256 MiB of data at 16 MiB/s: 16 s to cancel in, once the guest's first fill
            # has written it (a guest still zero would migrate in a moment)
            deadline = time.monotonic() + 60
            while not c.execute("x-query-guest")["fill-done"]:
                assert time.monotonic() < deadline, "the guest's first fill did not finish"
                time.sleep(0.02)
            c.execute("migrate-set-parameters", **{"max-bandwidth": 16 * MiB})
            target = f"file:{tmp_path / 'slow.stream'}"
            # SIGINT as a terminal's shell leaves it: a test run started in the background
            # (``&`` without job control) hands its children SIGINT ignored
            mig = subprocess.Popen([*LIVEMIG, cmd, "--qmp", v.address, target],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
            wait_status(c, "active")
            time.sleep(0.3)
            mig.send_signal(signal.SIGINT)
            out, err = mig.communicate(timeout=30)
            assert mig.returncode == 130, err
            assert "Traceback" not in err + out and "KeyboardInterrupt" not in err
            lines = [ln for ln in err.splitlines() if ln.startswith(f"livemig {cmd}:")]
            assert lines == [f"livemig {cmd}: interrupted; asking the VM to cancel the {what} "
                             "(migrate_cancel)", f"livemig {cmd}: {what} cancelled"], err
            assert c.execute("query-migrate")["status"] == "cancelled"
            assert c.execute("query-status")["status"] == "running"
            caps = {e["capability"]: e["state"] for e in c.execute("query-migrate-capabilities")}
            assert caps["background-snapshot"] is False  # put back as it was
    finally:
        v.stop()


@pytest.mark.parametrize("json_out", [False, True])
def test_info_into_a_closed_pipe_ends_quietly(vm: VmProcess, json_out: bool):
    r, w = os.pipe()
    os.close(r)  # like `| head` that already exited
    try:
        proc = subprocess.run([*LIVEMIG, "info", "--qmp", vm.address, *(["--json"] * json_out)],
                              stdout=w, stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(w)
    assert proc.returncode == 141
    assert proc.stderr == ""  # no BrokenPipeError, no traceback


def _row_names(text: str, title: str) -> dict[str, str]:
    """The rows under one section title of the human output."""
    rows: dict[str, str] = {}
    inside = False
    for line in text.splitlines():
        if not line.startswith(" "):
            inside = line == title
        elif inside:
            name, value = line.split(None, 1)
            rows[name] = value
    return rows


def test_statistics_use_query_migrate_names_and_units(vm: VmProcess, tmp_path: Path):
    proc = run("migrate", "--qmp", vm.address, f"file:{tmp_path / 'out.stream'}")
    assert proc.returncode == 0, proc.stderr
    with vm.client() as c:
        reply = c.execute("query-migrate")
    names = {k for k, v in reply.items() if not isinstance(v, dict)}
    names |= {f"ram.{k}" for k in reply["ram"]}
    rows = _row_names(proc.stdout, "query-migrate")
    assert set(rows) == names  # the very names QMP clients read, nothing else
    assert rows["status"] == "completed"
    assert re.fullmatch(r"[\d,]+ ms", rows["total-time"])
    assert re.fullmatch(r"\d+\.\d\d (KiB|MiB|GiB)", rows["ram.transferred"])
    assert re.fullmatch(r"[\d,]+ pages", rows["ram.normal"])
    assert re.fullmatch(r"[\d,.]+ MB/s", rows["ram.mbps"])
    info = run("info", "--qmp", vm.address)
    assert info.returncode == 0, info.stderr
    titles = [ln for ln in info.stdout.splitlines() if not ln.startswith(" ")]
    assert titles == ["query-status", "query-memory-devices", "x-query-ram-allocation",
                      "query-migrate"]
    assert not re.search(r"^status:", info.stdout, re.M)  # every status is under its title
    assert _row_names(info.stdout, "query-status")["status"] == "postmigrate"
    assert _row_names(info.stdout, "query-migrate")["status"] == "completed"


def test_progress_bar_totals_are_fixed_and_bars_end_full(tmp_path: Path):
    """Real query-migrate replies of a migration whose guest keeps dirtying memory (the sum
    transferred + remaining moves) and of a restore, through the bars' arithmetic."""
    src = VmProcess(tmp_path, "--dirty-rate", "64M", name="src", memory="128M")
    dst = VmProcess(tmp_path, "--incoming", "defer", name="dst", memory="128M")
    stream = tmp_path / "bar.stream"
    try:
        with src.client() as c:
            c.execute("migrate-set-parameters", **{"max-bandwidth": 64 * MiB})
            c.execute("migrate", uri=f"file:{stream}")
            replies = []
            while not replies or replies[-1]["status"] not in ("completed", "failed"):
                replies.append(c.execute("query-migrate"))
                time.sleep(0.01)
        assert replies[-1]["status"] == "completed"
        sums = {r["ram"]["transferred"] + r["ram"]["remaining"] for r in replies if "ram" in r}
        assert len(sums) > 2  # the naive total would have moved
        bar = MigrationBar()
        positions = [bar.update(r) for r in replies]
        totals = {t for t, _ in positions if t is not None}
        assert len(totals) == 1
        assert positions[-1] == (totals.pop(), positions[-1][1]) and positions[-1][0] == positions[-1][1]
        with dst.client() as c:
            c.execute("migrate-incoming", uri=f"file:{stream}")
            restore = []
            while not restore or restore[-1]["status"] not in ("completed", "failed"):
                restore.append(c.execute("query-migrate"))
                time.sleep(0.01)
        assert restore[-1]["status"] == "completed"
        size = stream.stat().st_size
        assert restore[-1]["ram"]["transferred"] < size  # what the old bar ended at
        rbar = RestoreBar(size)
        assert [rbar.update(r) for r in restore][-1] == (size, size)
    finally:
        src.stop()
        dst.stop()


# =============================================================================================
# a failed incoming migration is not silent
# =============================================================================================


def test_failed_incoming_migration_is_reported_at_the_default_log_level(tmp_path: Path):
    sock = tmp_path / "in.sock"
    v = VmProcess(tmp_path, "--incoming", f"unix:{sock}")
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock))
            s.sendall(b"NOT A MIGRATION STREAM")
        line = v.wait_line(r"^livemig vm: incoming migration failed: ")
        assert "0x0" in line or "magic" in line.lower(), line  # names where and what
        with v.client() as c:  # still waiting for a migration
            assert c.execute("query-status")["status"] == "inmigrate"
    finally:
        v.stop()
