"""The migrator's RESTCONF transport: the methods of a NETCONF Connection, carried over
RESTCONF (RFC 8040/8527) with aiohttp, so a migration mixes restconf:// and netconf:// ends.

How each NETCONF step is carried:
- get-data: GET of the datastore's top-level resource (XML), with the subtree or XPath
  filter applied here to what comes back;
- edit-config: one YANG Patch (RFC 8072) of the datastore, one edit per entry (merge, or the
  operation an entry's NETCONF operation attribute names: delete, remove, replace), so the
  server applies all of it or nothing;
- validate, commit, cancel-commit, discard-changes and the model's freeze, thaw and
  announce-migration: POST to /restconf/operations;
- lock and unlock: RESTCONF has no locks (RFC 8040 §1.4); they do nothing, and the
  candidate's confirmed commit is what keeps a failed migration from sticking.
Replies that are errors become the NETCONF client's RPCError, so the migration reports and
rolls back the same way for both protocols.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import logging
import re
import secrets
import ssl
from dataclasses import replace
from urllib.parse import quote
from xml.sax.saxutils import escape

import aiohttp
from lxml import etree
from ncclient.operations.rpc import RPCError
from ncclient.transport.errors import TransportError

from .endpoints import Credentials, Endpoint, EndpointError, nat_rpc_input
from .netconf import KEY_LEAVES, NAT_NS, NC_NS
from .wire import WireMeter

log = logging.getLogger(__name__)

RESTCONF_NS = "urn:ietf:params:xml:ns:yang:ietf-restconf"
XML = "application/yang-data+xml"
CAP = "urn:ietf:params:netconf:capability:"
_MODULES = {NAT_NS: "nfmig-nat", NC_NS: "ietf-netconf", None: "ietf-netconf"}
_PARSER = etree.XMLParser(huge_tree=True, resolve_entities=False, no_network=True)
YANG_PATCH = "application/yang-patch+xml"
YANG_PATCH_NS = "urn:ietf:params:xml:ns:yang:ietf-yang-patch"
SESSION_TARGET = "/nfmig-nat:nat-session="
_SESSION_HEAD = re.compile(rf'<nat-session(?:\s+xmlns="{re.escape(NAT_NS)}"|'
                           rf'\s+xmlns:nc="{re.escape(NC_NS)}"|\s+nc:operation="(\w+)")*\s*>')
_SESSION_KEYS = re.compile("".join(rf"\s*<{k}>([^<]*)</{k}>" for k in KEY_LEAVES))
_PLAIN_KEY = re.compile(r"[A-Za-z0-9._~-]*")  # RFC 3986 unreserved: no percent-encoding
# Request bodies from this size on are gzipped (below it the saving is a packet or less).
GZIP_FROM = 1400


class RestconfConnection:
    """One RESTCONF server, used as the migrator uses a NETCONF session."""

    def __init__(self, endpoint: Endpoint, credentials: Credentials, timeout: float = 600,
                 connect_timeout: float = 30):
        self.endpoint = endpoint
        self.credentials = credentials
        self.timeout = timeout
        self.bytes_sent = 0
        self.bytes_received = 0
        self._wire = WireMeter()
        # whether request bodies may be gzipped: the server says so in its responses'
        # Accept-Encoding (RFC 7694); responses are asked for gzipped in any case
        self._gzip_requests = False
        self._compress = credentials.compresses(endpoint)
        self.broken = False
        self.password = endpoint.password or credentials.password
        if self.password is None and credentials.prompt is not None:
            self.password = credentials.prompt(endpoint)
        if self.password is None:
            raise EndpointError(f"{endpoint}: RESTCONF needs a password (HTTP Basic)")
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        self.base = f"https://{host}:{endpoint.port}"
        self._tls = ssl.create_default_context(cafile=getattr(credentials, "ca_file", None))
        if not credentials.verify_host_keys:
            self._tls.check_hostname = False
            self._tls.verify_mode = ssl.CERT_NONE
        pair = f"{endpoint.user or 'admin'}:{self.password}".encode()
        self._headers = {"Authorization": "Basic " + base64.b64encode(pair).decode(),
                         "Accept": XML}
        self._loop = asyncio.new_event_loop()
        self._session: aiohttp.ClientSession | None = None
        self._connect_timeout = connect_timeout
        try:
            self.operations = self._discover()
        except BaseException:
            self.close()
            raise

    # -- transport ---------------------------------------------------------------------
    def _request(self, method: str, path: str, body: str | None = None,
                 content_type: str = XML) -> tuple[int, str]:
        if self.broken:
            raise TransportError(f"{self.endpoint}: not connected")
        try:
            return self._loop.run_until_complete(self._send(method, path, body, content_type))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.broken = True
            raise TransportError(f"{self.endpoint}: {type(exc).__name__}: {exc}") from None

    async def _send(self, method: str, path: str, body: str | None,
                    content_type: str) -> tuple[int, str]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=aiohttp.ClientTimeout(
                    total=self.timeout, connect=self._connect_timeout))
        data = body.encode() if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        self.bytes_sent += len(data or b"")
        if data is not None and len(data) >= GZIP_FROM and self._gzip_requests:
            data = await asyncio.get_running_loop().run_in_executor(None, gzip.compress,
                                                                   data, 6)
            headers["Content-Encoding"] = "gzip"
        if not self._compress:
            headers["Accept-Encoding"] = "identity"
        async with self._session.request(method, self.base + path, data=data,
                                         headers=headers, ssl=self._tls) as response:
            connection = response.connection
            sock = (connection.transport.get_extra_info("socket")
                    if connection is not None and connection.transport is not None else None)
            text = await response.text()
        if sock is not None:  # else released already: its next exchange counts this one
            self._wire.look(sock)
        offered = response.headers.get("Accept-Encoding", "")
        self._gzip_requests = self._compress and "gzip" in offered.lower()
        self.bytes_received += len(text)
        return response.status, text

    def wire_counts(self) -> tuple[int, int] | None:
        """(bytes sent, bytes received) on this end's TCP connections (TLS records,
        HTTP, bodies as sent: gzipped where they were), or None if not known."""
        meter = self._wire
        return (meter.sent, meter.received) if meter.known else None

    @property
    def compression(self) -> str | None:
        """gzip once the server takes gzipped requests (responses are gzipped whenever
        the server does so)."""
        return "gzip" if self._gzip_requests else "none"

    def _call(self, method: str, path: str, body: str | None = None,
              content_type: str = XML) -> str:
        status, text = self._request(method, path, body, content_type)
        if status == 401:
            self.broken = True
            raise EndpointError(f"{self.endpoint}: authentication failed")
        if status >= 400:
            raise _rpc_error(status, text, body if content_type == YANG_PATCH else None)
        return text

    def _discover(self) -> set[str]:
        try:
            text = self._call("GET", "/restconf/operations")
        except TransportError as exc:
            raise EndpointError(f"{self.endpoint}: cannot connect: {exc}") from None
        root = etree.fromstring(text.encode(), parser=_PARSER)
        return {f"{_MODULES.get(etree.QName(c).namespace, '?')}:{etree.QName(c).localname}"
                for c in root if isinstance(c.tag, str)}

    # -- what the migration uses -------------------------------------------------------
    @property
    def capabilities(self) -> list[str]:
        """What the server can do, named as NETCONF capabilities (the migration's
        negotiation reads those), from its operations; the modules come from the
        yang-library as for NETCONF."""
        caps = [CAP + "yang-library:1.1", CAP + "writable-running:1.0"]
        if "ietf-netconf:commit" in self.operations:
            caps += [CAP + "candidate:1.0", CAP + "confirmed-commit:1.1"]
        if "ietf-netconf:validate" in self.operations:
            caps.append(CAP + "validate:1.1")
        return caps

    @property
    def connected(self) -> bool:
        return not self.broken

    def reopen(self, connect_timeout: float = 10) -> RestconfConnection:
        return RestconfConnection(replace(self.endpoint, password=self.password),
                                  self.credentials, self.timeout, connect_timeout)

    def get_data(self, datastore: str, filter_xml: str = "") -> str:
        """The datastore's top-level nodes the filter selects, as XML text."""
        from nfmig.server.filters import subtree_filter, xpath_filter

        path = f"/restconf/ds/ietf-datastores:{datastore}"
        wanted = etree.fromstring(filter_xml.encode(), parser=_PARSER) if filter_xml else None
        tops = [c for c in wanted if isinstance(c.tag, str)] if wanted is not None else []
        kind = etree.QName(wanted).localname if wanted is not None else ""
        if kind == "subtree-filter" and len({c.tag for c in tops}) == 1:
            qname = etree.QName(tops[0])
            module = _MODULES.get(qname.namespace) if qname.namespace != NC_NS else None
            module = module or self._module_of(qname.namespace)
            path += f"/{module}:{qname.localname}"
            try:
                text = _resource_text(self._call("GET", path))
            except RPCError as exc:
                # get-data of a node that does not exist selects nothing; RESTCONF says 404
                if exc.tag not in ("invalid-value", "data-missing"):
                    raise
                return ""
            if all(len(c) == 0 for c in tops):
                return text
        else:
            text = _resource_text(self._call("GET", path))
        if wanted is None:
            return text
        data = etree.fromstring(f"<data>{text}</data>".encode(), parser=_PARSER)
        if kind == "xpath-filter":
            data = xpath_filter(data, wanted.text or "", wanted.nsmap)
        else:
            data = subtree_filter(data, wanted)
        return "".join(etree.tostring(c, encoding="unicode") for c in data)

    def _module_of(self, namespace: str | None) -> str:
        names = {"urn:ietf:params:xml:ns:yang:ietf-yang-library": "ietf-yang-library",
                 "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring":
                     "ietf-netconf-monitoring"}
        if namespace not in names:
            raise EndpointError(f"{self.endpoint}: no RESTCONF resource for {namespace}")
        return names[namespace]

    def edit_config(self, body: str, target: str = "candidate") -> int:
        """An edit-config's content (top-level nodes, entries may carry nc:operation) as one
        YANG Patch; the request size."""
        document = yang_patch(body, f"nfmig-{secrets.token_hex(6)}")
        self._call("PATCH", f"/restconf/ds/ietf-datastores:{target}", document, YANG_PATCH)
        return len(document)

    def _operation(self, name: str, inner: str = "", ns: str | None = None) -> None:
        module = _MODULES.get(ns, "ietf-netconf")
        body = f'<input xmlns="{ns or NC_NS}">{inner}</input>' if inner else None
        self._call("POST", f"/restconf/operations/{module}:{name}", body)

    session_id = None  # RESTCONF has no sessions to end

    def lock(self, datastore: str) -> None:
        """RESTCONF has no locks; see the module's description."""

    def unlock(self, datastore: str) -> None:
        """RESTCONF has no locks."""

    def validate(self, source: str = "candidate") -> None:
        self._operation("validate", f"<source><{source}/></source>")

    def commit(self, confirmed: bool = False, timeout: int | None = None,
               persist: str | None = None, persist_id: str | None = None) -> None:
        """As Connection.commit."""
        inner = ""
        if confirmed:
            inner += "<confirmed/>"
            if timeout is not None:
                inner += f"<confirm-timeout>{timeout}</confirm-timeout>"
            if persist is not None:
                inner += f"<persist>{escape(persist)}</persist>"
        if persist_id is not None:
            inner += f"<persist-id>{escape(persist_id)}</persist-id>"
        self._operation("commit", inner)

    def cancel_commit(self, persist_id: str | None = None) -> None:
        inner = f"<persist-id>{escape(persist_id)}</persist-id>" if persist_id else ""
        self._operation("cancel-commit", inner)

    def discard_changes(self) -> None:
        self._operation("discard-changes")

    def kill_session(self, session_id: str) -> None:
        self._operation("kill-session", f"<session-id>{escape(session_id)}</session-id>")

    def nat_rpc(self, name: str, **leaves: str | int | list[str] | None) -> None:
        self._operation(name, nat_rpc_input(**leaves), NAT_NS)

    def nat_rpc_output(self, name: str, **leaves: str | int | list[str] | None) -> str:
        """The operation's output (RFC 8040 §3.6.2, asked for as XML): its children."""
        body = f'<input xmlns="{NAT_NS}">{nat_rpc_input(**leaves)}</input>'
        text = self._call("POST", f"/restconf/operations/nfmig-nat:{name}", body)
        start = text.find(">", text.find("<output")) + 1 if "<output" in text else 0
        end = text.rfind("</output>")
        return text[start:end] if 0 < start < end else ""

    def cut(self) -> None:
        """Drop the connections without a goodbye, as a broken network would."""
        if self._session is not None and self._session.connector is not None:
            self._session.connector._close()  # aborts the sockets, no TLS close
        self.broken = True

    def close(self) -> None:
        try:
            if self._session is not None:
                self._loop.run_until_complete(self._session.close())
        except Exception:  # closing a broken connection must not hide why it broke
            log.debug("%s: close failed", self.endpoint, exc_info=True)
        finally:
            self._loop.close()


def yang_patch(body: str, patch_id: str) -> str:
    """The YANG Patch document (XML) of an edit-config's content: one edit per top-level
    node. Entries written the usual way are cut from the text; anything else is read as XML."""
    edits = _session_edits(body)
    if edits is None:
        edits = _tree_edits(body)
    return (f'<yang-patch xmlns="{YANG_PATCH_NS}"><patch-id>{patch_id}</patch-id>'
            f'{"".join(edits)}</yang-patch>')


def _edit(number: int, operation: str, target: str, value: str | None) -> str:
    return (f"<edit><edit-id>{number}</edit-id><operation>{operation}</operation>"
            f"<target>{escape(target)}</target>"
            + (f"<value>{value}</value></edit>" if value is not None else "</edit>"))


def _session_edits(body: str) -> list[str] | None:
    """The edits of nat-session entries as the migrator writes them (a head of known
    attributes, unprefixed leaves, keys first); None for anything else."""
    chunks = body.split("</nat-session>")
    if chunks.pop().strip():
        return None
    own = f'<nat-session xmlns="{NAT_NS}">'
    edits = []
    for number, chunk in enumerate(chunks, 1):
        head = _SESSION_HEAD.fullmatch(chunk, 0, chunk.find(">") + 1)
        keys = _SESSION_KEYS.match(chunk, head.end()) if head else None
        if keys is None or "&" in chunk:
            return None
        operation = head.group(1) or "merge"
        target = SESSION_TARGET + ",".join(
            v if _PLAIN_KEY.fullmatch(v) else quote(v, safe="") for v in keys.groups())
        value = None if operation in ("delete", "remove") else \
            f"{own}{chunk[head.end():]}</nat-session>"
        edits.append(_edit(number, operation, target, value))
    return edits


# Keys of the lists inside nat-policy: an entry edited with its own operation (a gateway
# address a switchover removes) becomes an edit of its own, as YANG Patch values carry none.
_POLICY_LIST_KEYS = {"gateway-address": "address", "address-mapping": "inside-prefix"}


def _tree_edits(body: str) -> list[str]:
    root = etree.fromstring(f'<x xmlns="{NAT_NS}" xmlns:nc="{NC_NS}">{body}</x>'.encode(),
                            parser=_PARSER)
    edits = []
    for node in (c for c in root if isinstance(c.tag, str)):
        operation = node.attrib.pop(f"{{{NC_NS}}}operation", "merge")
        qname = etree.QName(node)
        target = f"/{_MODULES.get(qname.namespace, 'nfmig-nat')}:{qname.localname}"
        if qname.localname == "nat-session":
            target += "=" + ",".join(quote((node.findtext(f"{{{NAT_NS}}}{k}") or "").strip(),
                                           safe="") for k in KEY_LEAVES)
        own = _entries_with_operations(node, target)
        etree.cleanup_namespaces(node)
        if not own or len(node):
            value = None if operation in ("delete", "remove") else \
                etree.tostring(node, encoding="unicode", with_tail=False)
            edits.append((operation, target, value))
        edits += own
    return [_edit(number, *edit) for number, edit in enumerate(edits, 1)]


def _entries_with_operations(node: etree._Element, parent: str
                             ) -> list[tuple[str, str, str | None]]:
    """Take the list entries that carry nc:operation out of ``node``: (operation, target,
    value) of each."""
    found = []
    for child in list(node):
        operation = child.attrib.get(f"{{{NC_NS}}}operation") if isinstance(child.tag, str) \
            else None
        key = _POLICY_LIST_KEYS.get(etree.QName(child).localname) if operation else None
        if key is None:
            continue
        del child.attrib[f"{{{NC_NS}}}operation"]
        node.remove(child)
        value_of_key = (child.findtext(f"{{{NAT_NS}}}{key}") or "").strip()
        target = f"{parent}/{etree.QName(child).localname}={quote(value_of_key, safe='')}"
        etree.cleanup_namespaces(child)
        value = None if operation in ("delete", "remove") else \
            etree.tostring(child, encoding="unicode", with_tail=False)
        found.append((operation, target, value))
    return found


def _resource_text(text: str) -> str:
    """The content of a RESTCONF XML reply as top-level nodes (a datastore's <data> opened)."""
    start = text.find("<data")
    if start >= 0 and f'xmlns="{RESTCONF_NS}"' in text[start:start + 120]:
        inner = text[text.find(">", start) + 1:]
        return inner[:inner.rfind("</data>")] if not text.rstrip().endswith("/>") else ""
    return text


def _rpc_error(status: int, text: str, patch: str | None = None) -> RPCError:
    """A RESTCONF errors document, or a failed patch's yang-patch-status, as the NETCONF
    client's RPCError (first error); an edit's error names the edit and its target."""
    try:
        root = etree.fromstring(text.encode(), parser=_PARSER)
        error, edit_id = _first_error(root)
    except etree.XMLSyntaxError:
        error, edit_id = None, None
    fields = {"error-type": "application", "error-tag": "operation-failed",
              "error-message": f"HTTP {status}: {text[:200]}"}
    if error is not None:
        for child in error:
            if isinstance(child.tag, str):
                name = etree.QName(child).localname
                fields[name] = (child.text or "").strip() if name != "error-info" else ""
    if edit_id is not None:
        message = fields["error-message"].removeprefix(f"edit {edit_id}: ")
        fields["error-message"] = f"{_edit_name(edit_id, patch)}: {message}"
    parts = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in fields.items()
                    if k != "error-info")
    element = etree.fromstring(f'<rpc-error xmlns="{NC_NS}">{parts}<error-severity>error'
                               "</error-severity></rpc-error>")
    return RPCError(element)


def _first_error(root: etree._Element) -> tuple[etree._Element | None, str | None]:
    """The first error of an errors document or of a yang-patch-status (its global errors
    before the edits'), and the edit-id when it is an edit's."""
    if root.tag == f"{{{RESTCONF_NS}}}errors":
        return root.find(f"{{{RESTCONF_NS}}}error"), None
    yp = f"{{{YANG_PATCH_NS}}}"
    error = root.find(f"{yp}errors/{yp}error")
    if error is not None:
        return error, None
    edit = root.find(f"{yp}edit-status/{yp}edit[{yp}errors]")
    if edit is None:
        return None, None
    return edit.find(f"{yp}errors/{yp}error"), (edit.findtext(f"{yp}edit-id") or "").strip()


def _edit_name(edit_id: str, patch: str | None) -> str:
    """'edit N (operation target)' as our own patch (see _edit) wrote that edit."""
    found = re.search(rf"<edit-id>{re.escape(escape(edit_id))}</edit-id><operation>(\w+)"
                      r"</operation><target>([^<]*)</target>", patch or "")
    return f"edit {edit_id} ({found.group(1)} {found.group(2)})" if found else \
        f"edit {edit_id}"
