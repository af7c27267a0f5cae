"""A private Open vSwitch for one NAT instance: its own ovsdb-server and ovs-vswitchd, run
inside the NAT's network namespace with their own run/db/log directories, one userspace
(``netdev``) bridge, and the ovs-ofctl calls the backend makes in bulk.

The daemons run in the namespace so that the bridge's ports are that namespace's interfaces
and the controller address 127.0.0.1 is the namespace's own loopback. Everything started here
is stopped by PID; nothing of the host's own Open vSwitch is touched.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
BRIDGE = "nfmig"
OF_VERSION = "OpenFlow15"  # bundles (atomic multi-flow changes) need OpenFlow 1.4+
START_WAIT = 20.0  # seconds for a daemon's socket to appear
CMD_TIMEOUT = 120.0


class OvsError(RuntimeError):
    """An Open vSwitch daemon or command failed; the message carries its own words."""


class Ovs:
    """ovsdb-server + ovs-vswitchd in ``netns`` (None: the current namespace)."""

    def __init__(self, netns: str | None, ports: dict[str, int], controller: str,
                 rundir: Path | None = None):
        self.netns = netns
        self.ports = ports  # interface name -> OpenFlow port number
        self.controller = controller
        self._own_dir = rundir is None
        # Unix socket paths must stay short (108 bytes): a fresh directory under /tmp.
        self.dir = Path(tempfile.mkdtemp(prefix="nfmig-ovs-")) if rundir is None else rundir
        self.db_sock = self.dir / "db.sock"
        self.mgmt = f"unix:{self.dir / (BRIDGE + '.mgmt')}"
        self._procs: list[subprocess.Popen] = []

    # -- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start both daemons and create the bridge; on failure stop what was started."""
        try:
            self._start_db()
            self._start_switch()
            self._create_bridge()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the daemons this instance started (by PID) and remove its directory."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._procs = []
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _env(self) -> dict[str, str]:
        d = str(self.dir)
        return {**os.environ, "OVS_RUNDIR": d, "OVS_DBDIR": d, "OVS_LOGDIR": d,
                "OVS_SYSCONFDIR": d, "OVS_PKGDATADIR": str(SCHEMA.parent)}

    def _in_ns(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def _spawn(self, name: str, argv: list[str]) -> None:
        log_file = open(self.dir / f"{name}.out", "w")  # noqa: SIM115 - owned by the child
        try:
            proc = subprocess.Popen(self._in_ns(argv), env=self._env(), stdout=log_file,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log_file.close()
        self._procs.append(proc)

    def _wait_for(self, path: Path, name: str) -> None:
        deadline = time.monotonic() + START_WAIT
        while not path.exists():
            proc = self._procs[-1]
            if proc.poll() is not None or time.monotonic() > deadline:
                out = (self.dir / f"{name}.out").read_text(errors="replace")[-2000:]
                raise OvsError(f"{name} did not start: {out.strip()}")
            time.sleep(0.02)

    def _start_db(self) -> None:
        db = self.dir / "conf.db"
        self.run("ovsdb-tool", "create", str(db), str(SCHEMA), in_ns=False)
        self._spawn("ovsdb-server", [
            "ovsdb-server", str(db), f"--remote=punix:{self.db_sock}",
            f"--unixctl={self.dir / 'ovsdb-server.ctl'}",
            f"--log-file={self.dir / 'ovsdb-server.log'}", "-vconsole:off"])
        self._wait_for(self.db_sock, "ovsdb-server")
        self.vsctl("--no-wait", "init")

    def _start_switch(self) -> None:
        ctl = self.dir / "ovs-vswitchd.ctl"
        self._spawn("ovs-vswitchd", [
            "ovs-vswitchd", f"unix:{self.db_sock}", f"--unixctl={ctl}",
            f"--log-file={self.dir / 'ovs-vswitchd.log'}", "-vconsole:off"])
        self._wait_for(ctl, "ovs-vswitchd")

    def _create_bridge(self) -> None:
        """The bridge, its ports and its controller in one transaction: changing the
        controller later would wipe every flow."""
        args = ["add-br", BRIDGE, "--", "set", "bridge", BRIDGE, "datapath_type=netdev",
                "fail-mode=secure", "protocols=OpenFlow13,OpenFlow14,OpenFlow15",
                "--", "set-controller", BRIDGE, self.controller,
                "--", "set", "controller", BRIDGE, "max_backoff=1000",
                "connection_mode=out-of-band"]
        for name, number in self.ports.items():
            args += ["--", "add-port", BRIDGE, name, "--", "set", "interface", name,
                     f"ofport_request={number}"]
        self.vsctl(*args)

    # -- commands ------------------------------------------------------------------------
    def run(self, *argv: str, stdin: str | None = None, in_ns: bool = False,
            check: bool = True) -> subprocess.CompletedProcess:
        cmd = self._in_ns(list(argv)) if in_ns else list(argv)
        done = subprocess.run(cmd, input=stdin, text=True, capture_output=True,
                              env=self._env(), timeout=CMD_TIMEOUT)
        if check and done.returncode:
            raise OvsError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed: "
                           f"{done.stderr.strip() or done.stdout.strip()}")
        return done

    def vsctl(self, *args: str) -> str:
        return self.run("ovs-vsctl", f"--db=unix:{self.db_sock}", "--timeout=20",
                        *args).stdout

    def ofctl(self, command: str, *args: str, options: tuple[str, ...] = (),
              stdin: str | None = None) -> str:
        return self.run("ovs-ofctl", "-O", OF_VERSION, *options, command, self.mgmt, *args,
                        stdin=stdin).stdout

    def bundle(self, commands: str) -> None:
        """Apply flow commands (``add``/``delete``/``delete_strict`` lines) all at once,
        or none of them."""
        if commands:
            self.ofctl("add-flows", "-", options=("--bundle",), stdin=commands)

    def dump_flows(self, match: str = "") -> str:
        return self.ofctl("dump-flows", *([match] if match else []), options=("--no-names",))

    def del_flows(self, match: str) -> None:
        self.ofctl("del-flows", match)

    def limit_table(self, table: int, flows: int) -> None:
        """Refuse flows in ``table`` beyond ``flows`` (a full table fails a bundle)."""
        self.vsctl("--", "--id=@ft", "create", "Flow_Table", f"flow_limit={flows}",
                   "overflow_policy=refuse", "--", "set", "bridge", BRIDGE,
                   f"flow_tables:{table}=@ft")

    def controller_connected(self) -> bool:
        out = self.vsctl("--columns=is_connected", "list", "controller")
        return "true" in out
