"""GET of N sessions over RESTCONF (JSON and XML, HTTPS) beside NETCONF get-data of the same
sessions from the same server process (simulated backend).

Goal: RESTCONF JSON no slower than NETCONF get-data.

    .venv/bin/python bench/restconf_bulk.py [--sizes 1000,10000,100000] [--repeat 5]
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
from nfmig.client.netconf import NatClient, timed

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
        nc = NatClient("127.0.0.1", server.port, server.user, server.password,
                       hostkey_verify=False)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
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
