"""The migration report's VM comparison when the VM memory is measured from the NF process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nfmig.client.report import Report, process_memory

from nfmig.cli import main

from .test_migrate import run_cli

# A parent that starts a child holding 40 MiB it has written to (so they are resident), and
# prints the child's pid once the memory is there.
PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import sys, time\\n"
                          "block = bytearray(b'x') * (40 << 20)\\n"
                          "print('ready', flush=True)\\n"
                          "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "ready"
print(child.pid, flush=True)
child.wait()
"""


def resident(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_migrate_measures_vm_memory_from_the_nf_process_and_says_so(
        nats, capsys, monkeypatch, tmp_path):  # noqa: F811
    a, b = nats(20, 0)
    pid = a.server.process.pid
    before = resident(pid)
    code, out, err = run_cli(capsys, monkeypatch, "migrate", a.url, b.url,
                             "--insecure-no-host-key-check", "--json",
                             "--vm-memory-from-pid", str(pid))
    assert code == 0, err
    report = json.loads(out)
    vm = report["vm"]
    assert vm["source"] == f"measured from pid {pid}"
    assert vm["image_bytes"] == 0  # memory only: no image given
    # Read before the migration began; the server grows a little while it serves it.
    assert 0.8 * before <= vm["memory_bytes"] <= 1.2 * before
    assert report["vm_comparison"]["vm_bytes"] == vm["memory_bytes"]
    assert report["vm_comparison"]["source"] == vm["source"]
    assert report["vm_comparison"]["vm_to_state_ratio"] > 1
    (tmp_path / "r.json").write_text(out)
    png = tmp_path / "r.png"
    assert main(["report", str(tmp_path / "r.json"), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_image_size_given_beside_the_measured_memory_is_kept(
        nats, capsys, monkeypatch):  # noqa: F811
    a, b = nats(5, 0)
    code, out, err = run_cli(capsys, monkeypatch, "migrate", a.url, b.url,
                             "--insecure-no-host-key-check", "--json", "--vm-image-bytes",
                             "2G", "--vm-memory-from-pid", str(a.server.process.pid))
    assert code == 0, err
    vm = json.loads(out)["vm"]
    assert vm["image_bytes"] == 2 << 30 and vm["memory_bytes"] > 0


def test_measured_memory_includes_the_processes_the_nf_started():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        total, pids = process_memory(parent.pid)
        assert sorted(pids) == sorted([parent.pid, child])
        assert total >= 40 << 20
        assert abs(total - resident(parent.pid) - resident(child)) < 4 << 20
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_a_pid_that_is_not_running_is_refused_before_connecting(capsys, monkeypatch):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid names no process now (reuse within the test is unlikely)
    code, _, err = run_cli(capsys, monkeypatch, "migrate", "netconf://ops@127.0.0.1:1",
                           "netconf://ops@127.0.0.1:2", "--vm-memory-from-pid",
                           str(gone.pid))
    assert code == 2
    assert f"no process {gone.pid} on this host" in err


def test_memory_given_and_measured_at_once_is_refused(capsys, monkeypatch):
    code, _, err = run_cli(capsys, monkeypatch, "migrate", "netconf://ops@127.0.0.1:1",
                           "netconf://ops@127.0.0.1:2", "--vm-memory-bytes", "1G",
                           "--vm-memory-from-pid", str(os.getpid()))
    assert code == 2 and "not both" in err


@pytest.mark.parametrize("pid", ["0", "-5", "self"])
def test_a_pid_that_is_not_a_positive_number_is_a_usage_error(pid, capsys):
    with pytest.raises(SystemExit) as done:
        main(["migrate", "netconf://ops@h", "netconf://ops@g", f"--vm-memory-from-pid={pid}"])
    assert done.value.code == 2
    assert "--vm-memory-from-pid" in capsys.readouterr().err


def test_figures_from_the_command_line_are_reported_as_such():
    report = Report("m1", "all", state_bytes=1000, vm_image_bytes=2 << 30,
                    vm_memory_bytes=1 << 30)
    data = report.to_dict()
    assert data["vm"] == {"memory_bytes": 1 << 30, "image_bytes": 2 << 30,
                          "source": "command line"}
    assert "(VM figures: command line)" in report.summary()
    assert Report("m2", "all").to_dict()["vm"] is None
