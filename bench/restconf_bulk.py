"""GET of N sessions over RESTCONF (JSON and XML, HTTPS) beside NETCONF get-data of the same
sessions from the same server process (simulated backend).

Goal: RESTCONF JSON no slower than NETCONF get-data.

With --migrate N it times instead a migration of N sessions between two such servers (the
migrator's report), restconf -> restconf and netconf -> restconf: the write to a RESTCONF
end is one YANG Patch.

    .venv/bin/python bench/restconf_bulk.py [--sizes 1000,10000,100000] [--repeat 5]
    .venv/bin/python bench/restconf_bulk.py --migrate 10000 [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from nfmig.client.endpoints import Credentials, Endpoint
from nfmig.client.migrate import Migration, Options
from nfmig.client.netconf import timed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.restconf_client import start_with_restconf  # noqa: E402

PATH = "/restconf/ds/ietf-datastores:operational/nfmig-nat:nat-session"


async def restconf_gets(base: str, auth: str, tls: ssl.SSLContext, accept: str, repeat: int
                        ) -> tuple[list[float], int, str]:
    times, size, text = [], 0, ""
    async with aiohttp.ClientSession(headers={"Authorization": auth, "Accept": accept}) as s:
        async with s.get(base + "/restconf", ssl=tls) as r:  # connection and password once
            await r.read()
        for _ in range(repeat):
            t0 = time.perf_counter()
            async with s.get(base + PATH, ssl=tls) as r:
                body = await r.read()
            times.append(time.perf_counter() - t0)
            size, text = len(body), body.decode()
    return times, size, text


def measure(n: int, repeat: int, tmp: Path) -> dict:
    server, port = start_with_restconf(tmp / f"s{n}", "--sessions", str(n))
    try:
        tls = ssl.create_default_context(cafile=str(server.state_dir / "restconf-cert.pem"))
        auth = "Basic " + base64.b64encode(f"{server.user}:{server.password}".encode()).decode()
        base = f"https://127.0.0.1:{port}"
        nc = server.client()
        gets = []
        for _ in range(repeat):
            (body, nc_bytes), t = timed(nc.get_sessions)
            gets.append(t)
        assert body.count("<nat-session") == n
        nc.close()
        js, js_bytes, text = asyncio.run(restconf_gets(base, auth, tls,
                                                       "application/yang-data+json", repeat))
        assert len(json.loads(text)["nfmig-nat:nat-session"]) == n
        xs, xs_bytes, text = asyncio.run(restconf_gets(base, auth, tls,
                                                       "application/yang-data+xml", repeat))
        assert text.count("<nat-session") == n
    finally:
        server.stop()
    return {"n": n, "netconf": statistics.median(gets), "netconf_bytes": nc_bytes,
            "json": statistics.median(js), "json_bytes": js_bytes,
            "xml": statistics.median(xs), "xml_bytes": xs_bytes}


def migrate_once(n: int, source_scheme: str, tmp: Path) -> dict:
    """One migration of n sessions from a server reached by ``source_scheme`` to an empty
    one reached over RESTCONF; the report's total and phase times."""
    password = "bench-" + base64.b16encode(tmp.name.encode()).decode()[:12]
    a, a_rc = start_with_restconf(tmp / "a", "--sessions", str(n), password=password)
    try:
        b, b_rc = start_with_restconf(tmp / "b", "--sessions", "0", password=password)
    except BaseException:
        a.stop()
        raise
    try:
        bundle = tmp / "ca.pem"
        bundle.write_text("".join((s.state_dir / "restconf-cert.pem").read_text()
                                  for s in (a, b)))
        source = Endpoint("127.0.0.1", a_rc if source_scheme == "restconf" else a.port,
                          a.user, password, source_scheme)
        target = Endpoint("127.0.0.1", b_rc, b.user, password, "restconf")
        options = Options(credentials=Credentials(ca_file=bundle, verify_host_keys=False))
        report = Migration([source], [target], None, options).run()
        assert report.result == "success", report.reason
        assert report.sessions_moved == n
        return {"total": report.total_seconds, **report.phase_seconds()}
    finally:
        a.stop()
        b.stop()


def migrations(n: int, repeat: int) -> None:
    print(f"migration of {n} sessions to a RESTCONF end (medians of {repeat})")
    for scheme in ("restconf", "netconf"):
        runs = []
        for i in range(repeat):
            with tempfile.TemporaryDirectory(prefix="nfmig-bench-") as tmp:
                runs.append(migrate_once(n, scheme, Path(tmp) / f"r{i}"))
        phases = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        detail = ", ".join(f"{k} {v:.3f}" for k, v in phases.items() if k != "total")
        print(f"{scheme:>8} -> restconf: total {phases['total']:.3f} s ({detail})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--migrate", type=int, metavar="N",
                        help="time migrations of N sessions instead of reads")
    args = parser.parse_args()
    if args.migrate:
        migrations(args.migrate, args.repeat)
        return
    print(f"{'sessions':>9} {'NETCONF s':>10} {'bytes':>11} {'RESTCONF JSON s':>16} "
          f"{'bytes':>11} {'RESTCONF XML s':>15} {'bytes':>11}")
    with tempfile.TemporaryDirectory(prefix="nfmig-bench-") as tmp:
        for n in (int(x) for x in args.sizes.split(",")):
            r = measure(n, args.repeat, Path(tmp))
            print(f"{r['n']:>9} {r['netconf']:>10.3f} {r['netconf_bytes']:>11,} "
                  f"{r['json']:>16.3f} {r['json_bytes']:>11,} {r['xml']:>15.3f} "
                  f"{r['xml_bytes']:>11,}", flush=True)
    print("goal: RESTCONF JSON no slower than NETCONF get-data")


if __name__ == "__main__":
    main()
