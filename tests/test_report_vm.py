"""The VM comparison: the chart of bench/vm_vs_state.py's measurements (client/chart.py), and
the migration report's estimate when the VM memory is measured from the NF process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from nfmig.client.chart import bench_panels, bench_title, estimate_note
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


# -- the chart of bench/vm_vs_state.py's JSON ---------------------------------------------

def _row(n: int, link: str, shape: str, vm_mb: float, vm_s: float, nf_mb: float,
         nf_s: float) -> dict:
    return {"sessions": n, "link": link, "link_shape": shape, "errors": [],
            "vm": {"link_bytes": vm_mb * 1e6, "total_s": vm_s, "downtime_ms": 40.0,
                   "gap_tcp_ms": 300.0},
            "nfmig": {"link_bytes": nf_mb * 1e6, "command_s": nf_s, "freeze_ms": 30.0,
                      "gap_tcp_ms": 8.0}}


BENCH = {
    "kind": "vm-vs-state", "date": "2026-12-06T03:00:00+00:00", "accelerator": "tcg",
    "qemu": "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)",
    "guest_memory_mib": 256, "guest_kernel": "6.1.0-57-amd64", "repeat": 1,
    "sizes": [1000, 10000], "links": ["none", "100mbit"],
    "results": [_row(10000, "none", "unshaped", 68.7, 0.9, 0.26, 1.9),
                _row(1000, "none", "unshaped", 65.4, 0.4, 0.05, 0.9),
                _row(1000, "100mbit", "100mbit, 5ms each way (tc netem)", 65.4, 5.45, 0.05,
                     0.91),
                _row(10000, "100mbit", "100mbit, 5ms each way (tc netem)", 68.7, 5.72, 0.26,
                     1.91)],
}


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_the_bench_chart_draws_each_link_with_the_measured_bytes_and_times():
    panels = bench_panels(BENCH)
    assert [p["title"] for p in panels] == ["link: unshaped",
                                           "link: 100mbit, 5ms each way (tc netem)"]
    none = panels[0]
    assert none["sizes"] == ["1k", "10k"]  # in order of N, whatever the file's order
    assert dict((label, values) for label, _, values in none["bytes"]) == {
        "VM live migration (QEMU)": [65.4, 68.7], "nfmig migrate": [0.05, 0.26]}
    times = {label: values for label, _, values in none["time"]}
    assert times == {"VM: total migration time": [0.4, 0.9], "VM: downtime": [0.04, 0.04],
                     "nfmig: whole command": [0.9, 1.9], "nfmig: freeze window": [0.03, 0.03]}


def test_the_bench_chart_names_the_accelerator_the_guest_and_qemu():
    title = bench_title(BENCH)
    assert "QEMU accelerator TCG" in title and "256 MiB guest" in title
    assert "Linux 6.1.0-57-amd64" in title and "QEMU emulator version 7.2.22" in title
    assert "same link, same run (2026-12-06)" in title


def test_nfmig_report_draws_the_bench_json(tmp_path):
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    png = tmp_path / "bench.png"
    assert main(["report", str(tmp_path / "bench.json"), "--png", str(png)]) == 0
    width, height = _png_size(png)
    one = dict(BENCH, links=["none"], results=BENCH["results"][:2])
    (tmp_path / "one.json").write_text(json.dumps(one))
    assert main(["report", str(tmp_path / "one.json"), "--png", str(tmp_path / "1.png")]) == 0
    assert width > _png_size(tmp_path / "1.png")[0]  # a column of panels per link
    assert height > 600


def test_a_bench_json_with_nothing_measured_on_both_sides_is_refused(tmp_path, capsys):
    broken = dict(BENCH, results=[dict(r, nfmig=None) for r in BENCH["results"]])
    (tmp_path / "b.json").write_text(json.dumps(broken))
    assert main(["report", str(tmp_path / "b.json"), "--png", str(tmp_path / "b.png")]) == 2
    assert "measured no size on both sides" in capsys.readouterr().err
    assert not (tmp_path / "b.png").exists()


def test_vm_sizes_are_not_mixed_into_measured_ones(tmp_path, capsys):
    (tmp_path / "bench.json").write_text(json.dumps(BENCH))
    assert main(["report", str(tmp_path / "bench.json"), "--png", str(tmp_path / "x.png"),
                 "--vm-memory-bytes", "1G"]) == 2
    assert "the benchmark measured the VM" in capsys.readouterr().err


def test_the_single_chart_says_its_vm_figures_are_an_estimate_or_given():
    assert "an estimate from a process's resident memory, not a VM migration" in \
        estimate_note("measured from pid 4242")
    assert estimate_note("command line") == "VM figures: command line, not measured"
