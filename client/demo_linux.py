"""The live part of `nfmig demo` as root: a TCP stream through NAT A whose session moves to
NAT B while it runs (demo_hetero.py serves a Linux kernel NAT as A and the SDN NAT as B).

Hosts live in network namespaces of a test bed built for the demo and removed afterwards:
a client, NAT A, NAT B and a server. A stream runs from client to server and back the whole
time; the demo runs the migrator (what `nfmig migrate` runs) from A's NETCONF server to
B's: it copies the session, confirms, moves the gateway addresses and deletes on A; then
it reports what the stream saw.
"""
from __future__ import annotations

import subprocess
import sys
import time

from nfmig.testbed import TestBed

from .demo import migrate_between
from .local import LocalServer
from .netconf import NAT_NS

PORT = 5000
# Echoes what it receives; says which address:port the connection came from (the NAT's).
ECHO = ("import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)"
        f"\ns.bind(('',{PORT}))\ns.listen(1)\nprint('listening',flush=True)\n"
        "c,peer=s.accept()\nprint('peer',*peer,flush=True)\n"
        "while (d:=c.recv(65536)):\n c.sendall(d)\n")
# Sends 16 KB every 20 ms and reads the echo until told to stop; reports bytes and the
# longest wait for an echo (the gap a user would notice).
STREAM = ("import socket,sys,time,threading\nc=socket.create_connection((sys.argv[1],"
          f"{PORT}),timeout=10)\nprint('connected',flush=True)\nstop=threading.Event()\n"
          "threading.Thread(target=lambda:(sys.stdin.readline(),stop.set()),daemon=True)"
          ".start()\nblock=b'x'*16384\ntotal=0\nworst=0.0\n"
          "while not stop.is_set():\n t=time.monotonic()\n c.sendall(block)\n left=len(block)\n"
          " while left:\n  left-=len(c.recv(left))\n total+=len(block)\n"
          " worst=max(worst,time.monotonic()-t)\n time.sleep(0.02)\n"
          "print('done',total,round(worst*1000,1),flush=True)\n")
POLICY = (f'<nat-policy xmlns="{NAT_NS}"><inside-interface>inside</inside-interface>'
          "<outside-interface>outside</outside-interface>"
          f"<inside-prefix>{TestBed.INSIDE_PREFIX}</inside-prefix>"
          f"<external-address>{TestBed.EXTERNAL}</external-address>"
          "<port-min>20000</port-min><port-max>29999</port-max></nat-policy>")


def gateway_policy(gateways: bool) -> str:
    """The demo NATs' policy; the active one also answers for the gateway addresses."""
    if not gateways:
        return POLICY
    entries = "".join(
        f"<gateway-address><address>{address}</address><interface>{side}</interface>"
        "<prefix-length>24</prefix-length></gateway-address>"
        for address, side in ((TestBed.INSIDE_GATEWAY, "inside"),
                              (TestBed.EXTERNAL, "outside")))
    return POLICY.replace("</nat-policy>", entries + "</nat-policy>")


def move_live_stream(bed: TestBed, a: LocalServer, b: LocalServer) -> int:
    """A stream through A; then the migrator moves its session and the gateway addresses
    to B while it runs."""
    echo = bed.popen(bed.server, sys.executable, "-c", ECHO, stdout=subprocess.PIPE, text=True)
    _expect(echo, "listening")
    stream = bed.popen(bed.client, sys.executable, "-c", STREAM, TestBed.SERVER,
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _expect(stream, "connected")
    peer = _expect(echo, "peer")
    print(f"stream {TestBed.CLIENT} -> {TestBed.SERVER}:{PORT} runs through NAT A; the "
          f"server sees it from {peer[0]}:{peer[1]}")
    time.sleep(1)
    report = migrate_between(a, b)
    print(report.summary())
    time.sleep(2)
    stream.stdin.write("stop\n")
    stream.stdin.flush()
    total, worst = _expect(stream, "done")
    left_on_a, on_b = (_session_count(s) for s in (a, b))
    print(f"the stream moved {int(total):,} bytes each way; longest wait for an echo "
          f"{worst} ms; NAT A now holds {left_on_a} session(s), NAT B {on_b}")
    ok = stream.wait(10) == 0 and report.ok and left_on_a == 0 and on_b >= 1
    print("the connection kept flowing through NAT B" if ok else "migration FAILED")
    return 0 if ok else 1


def _session_count(server: LocalServer) -> int:
    client = server.client()
    try:
        return client.get_sessions()[0].count("<nat-session")
    finally:
        client.close()


def _expect(proc: subprocess.Popen, word: str) -> list[str]:
    line = proc.stdout.readline().split()
    if not line or line[0] != word:
        raise RuntimeError(f"the demo's traffic stopped: expected {word!r}, got {line!r}")
    return line[1:]
