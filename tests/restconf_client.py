"""A RESTCONF test client: real HTTPS requests with aiohttp (and curl), checked against the
server's own certificate, and yanglint for the JSON replies."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from nfmig.client.local import LocalServer, start_local_server
from nfmig.server.schema import IMPLEMENTED
from nfmig.yang import YANG_DIR

JSON = "application/yang-data+json"
XML = "application/yang-data+xml"
IETF_MODULES = Path(sys.prefix) / "share" / "yang" / "modules" / "ietf"  # pyang's copies


@dataclass
class Reply:
    status: int
    headers: dict
    text: str

    def json(self):
        return json.loads(self.text)

    @property
    def error_tag(self) -> str:
        return self.json()["ietf-restconf:errors"]["error"][0]["error-tag"]


class Restconf:
    """One server's RESTCONF listener, as a client sees it."""

    def __init__(self, server: LocalServer, port: int):
        self.server = server
        self.port = port
        self.base = f"https://127.0.0.1:{port}"
        self.cert = server.state_dir / "restconf-cert.pem"
        self.tls = ssl.create_default_context(cafile=str(self.cert))

    def request(self, method: str, path: str, body: str | bytes | dict | None = None, *,
                user: str | None = None, password: str | None = None,
                content_type: str = JSON, accept: str | None = JSON,
                headers: dict | None = None) -> Reply:
        return asyncio.run(self._request(method, path, body, user, password, content_type,
                                         accept, headers or {}))

    async def _request(self, method, path, body, user, password, content_type, accept,
                       headers) -> Reply:
        hdrs = {**self.auth(user, password), **headers}
        if accept:
            hdrs.setdefault("Accept", accept)
        if body is not None:
            hdrs.setdefault("Content-Type", content_type)
            if isinstance(body, dict):
                body = json.dumps(body)
        async with aiohttp.ClientSession() as session, session.request(
                method, self.base + path, data=body, headers=hdrs, ssl=self.tls) as resp:
            text = await resp.text()
            return Reply(resp.status, dict(resp.headers), text)

    def auth(self, user: str | None = None, password: str | None = None) -> dict:
        pair = f"{user or self.server.user}:{password or self.server.password}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}

    def get(self, path: str, **kw) -> Reply:
        return self.request("GET", path, **kw)

    def curl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["curl", "-sS", "--cacert", str(self.cert), "-u",
                               f"{self.server.user}:{self.server.password}", *args],
                              capture_output=True, text=True, timeout=60)


def start_with_restconf(workdir: Path, *args: str, password: str | None = None
                        ) -> tuple[LocalServer, int]:
    port_file = workdir / "restconf-port"
    port_file.unlink(missing_ok=True)
    server = start_local_server(workdir, "--restconf-port", "0", "--restconf-port-file",
                                str(port_file), *args, password=password)
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text().strip():
        if time.monotonic() > deadline or not server.alive():
            server.stop()
            raise RuntimeError(f"no RESTCONF port; log:\n{server.log.read_text()}")
        time.sleep(0.05)
    return server, int(port_file.read_text())


def yanglint(data: dict, tmp_path: Path, kind: str = "data") -> subprocess.CompletedProcess:
    """yanglint's verdict on JSON data (the content of ietf-restconf:data, or a resource)."""
    if "ietf-restconf:data" in data:
        data = data["ietf-restconf:data"]
    path = tmp_path / f"reply-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(data))
    modules = [str(p) for p in sorted(YANG_DIR.glob("*.yang")) if p.name.split("@")[0] in
               (*IMPLEMENTED, "ietf-yang-library")]
    features = [f"-F{name}:{','.join(f)}" for name, f in IMPLEMENTED.items() if f]
    return subprocess.run(["yanglint", "-p", str(YANG_DIR), "-f", "json", "-t", kind,
                           *features, *modules, str(path)], capture_output=True, text=True,
                          timeout=60)


ERRORS_CHECK = """module restconf-errors-check {
  yang-version 1.1;
  namespace "urn:test:restconf-errors-check";
  prefix rec;
  import ietf-restconf { prefix rc; }
  container checked {
    config false;
    uses rc:errors;
  }
}
"""


def yanglint_errors(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """yanglint on an ietf-restconf:errors document: the yang-errors structure is checked
    through a module that uses ietf-restconf's errors grouping (libyang does not parse
    yang-data documents on their own)."""
    module = tmp_path / "restconf-errors-check.yang"
    module.write_text(ERRORS_CHECK)
    doc = json.loads(text)
    path = tmp_path / f"errors-{time.monotonic_ns()}.json"
    path.write_text(json.dumps({"restconf-errors-check:checked": {
        "errors": doc["ietf-restconf:errors"]}}))
    return subprocess.run(["yanglint", "-p", str(IETF_MODULES), "-p", str(YANG_DIR), "-f",
                           "json", "-t", "get", str(module),
                           *map(str, YANG_DIR.glob("nfmig-nat@*.yang")), str(path)],
                          capture_output=True, text=True, timeout=60)


YANG_PATCH_NS = "urn:ietf:params:xml:ns:yang:ietf-yang-patch"
PATCH_STATUS_CHECK = """module yang-patch-status-check {
  yang-version 1.1;
  namespace "urn:test:yang-patch-status-check";
  prefix ypc;
  import ietf-yang-patch { prefix ypatch; }
  container checked {
    config false;
    uses ypatch:yang-patch-status;
  }
}
"""


def yanglint_patch_status(text: str, media: str, tmp_path: Path
                          ) -> subprocess.CompletedProcess:
    """yanglint on a yang-patch-status reply (JSON or XML), through a module that uses
    ietf-yang-patch's yang-patch-status grouping (a yang-data structure is not data on its
    own); in XML the status moves into that module's namespace, which the grouping's nodes
    take there."""
    module = tmp_path / "yang-patch-status-check.yang"
    module.write_text(PATCH_STATUS_CHECK)
    if media == JSON:
        status = json.loads(text)["ietf-yang-patch:yang-patch-status"]
        doc, kind = json.dumps({"yang-patch-status-check:checked": {
            "yang-patch-status": status}}), "json"
    else:
        inner = text.replace(f'xmlns="{YANG_PATCH_NS}"', "", 1)
        doc, kind = f'<checked xmlns="urn:test:yang-patch-status-check">{inner}</checked>', "xml"
    path = tmp_path / f"status-{time.monotonic_ns()}.{kind}"
    path.write_text(doc)
    return subprocess.run(["yanglint", "-p", str(YANG_DIR), "-f", kind, "-t", "get",
                           str(module), *map(str, YANG_DIR.glob("nfmig-nat@*.yang")),
                           str(path)], capture_output=True, text=True, timeout=60)


# RFC 5277 defines replayComplete and notificationComplete in XML Schema; this stand-in
# states the two notifications in YANG under that namespace, so yanglint can check the
# JSON the event stream sends for them.
NC_NOTIFICATIONS = """module nc-notifications {
  yang-version 1.1;
  namespace "urn:ietf:params:xml:ns:netmod:notification";
  prefix manageEvent;
  notification replayComplete;
  notification notificationComplete;
}
"""


def yanglint_stream_marker(event: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """yanglint on the content of a replayComplete or notificationComplete event."""
    module = tmp_path / "nc-notifications.yang"
    module.write_text(NC_NOTIFICATIONS)
    content = {k: v for k, v in event["ietf-restconf:notification"].items()
               if k != "eventTime"}
    path = tmp_path / f"marker-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(content))
    return subprocess.run(["yanglint", "-f", "json", "-t", "notif", str(module), str(path)],
                          capture_output=True, text=True, timeout=60)
