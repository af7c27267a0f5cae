"""NETCONF operations, one small function each: parse the rpc's parameters, call the
datastores, return the reply's body as XML text (or raise RpcError)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from xml.sax.saxutils import escape

from lxml import etree

from . import errors, nacm
from .datastore import CONFIG_DATASTORES, Datastores, EditOptions
from .errors import RpcError
from .filters import (
    BASIC_MODE,
    WITH_DEFAULTS,
    Defaults,
    TopNode,
    content_matches,
    limit_depth,
    select_top_nodes,
    selects_by_own_leaves,
    subtree_filter,
    xpath_filter,
)
from .migration import MigrationChanges, MigrationWindows, SessionDigests
from .monitoring import NCM, NetconfStatistics, netconf_state_xml
from .notifications import NOTIF_NS, NotificationHub, parse_subscription
from .restconf_codec import SchemaIndex
from .schema import Location, Schema, is_yang_1_1, module_ns, module_revision
from .session_codec import HollowEdit
from .yang_push import YangPush

NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NCDS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
DS = "urn:ietf:params:xml:ns:yang:ietf-datastores"
NCWD = "urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults"
YANGLIB = "urn:ietf:params:xml:ns:yang:ietf-yang-library"
YANGLIB_REV = "2019-01-04"
CAP = "urn:ietf:params:netconf:capability:"
OK = "<ok/>"
# A reply body: text, or pieces of text for large data sent while it is produced.
Reply = str | Iterable[str]


@dataclass
class SessionInfo:
    """What operations need to know about the session that sent an rpc."""

    session_id: int
    username: str
    source_host: str
    login_time: str = field(default_factory=lambda: datetime.now(UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"))
    in_rpcs: int = 0
    in_bad_rpcs: int = 0
    out_rpc_errors: int = 0
    out_notifications: int = 0
    bad_hello: bool = False  # ended because its hello was not a valid one
    ended_by_request: bool = False  # close-session or kill-session (not dropped)
    close: Callable[[], None] | None = None
    notify: Callable[[str], None] | None = None  # sends one notification message
    # the text of the rpc being handled, for bulk readers; a HollowEdit for a large edit
    request: bytes | HollowEdit | None = None


class Operations:
    def __init__(self, datastores: Datastores, schema: Schema, hub: NotificationHub,
                 windows: MigrationWindows, changes: MigrationChanges | None = None):
        self.ds = datastores
        self.schema = schema
        self.hub = hub
        self.sessions: dict[int, SessionInfo] = {}
        self.nacm: nacm.Nacm | None = None  # access control (server/nacm.py); None: none
        self.content_id = schema.content_id()
        self.index = SchemaIndex(schema)
        self.defaults = Defaults(schema)
        self.stats = NetconfStatistics()
        self._handlers: dict[str, Callable[[SessionInfo, etree._Element], Reply]] = {
            f"{{{NC}}}get": self.get,
            f"{{{NC}}}get-config": self.get_config,
            f"{{{NC}}}edit-config": self.edit_config,
            f"{{{NC}}}copy-config": self.copy_config,
            f"{{{NC}}}delete-config": self.delete_config,
            f"{{{NC}}}lock": self.lock,
            f"{{{NC}}}unlock": self.unlock,
            f"{{{NC}}}validate": self.validate,
            f"{{{NC}}}commit": self.commit,
            f"{{{NC}}}discard-changes": self.discard_changes,
            f"{{{NC}}}cancel-commit": self.cancel_commit,
            f"{{{NC}}}close-session": self.close_session,
            f"{{{NC}}}kill-session": self.kill_session,
            f"{{{NCM}}}get-schema": self.get_schema,
            f"{{{NCDS}}}get-data": self.get_data,
            f"{{{NCDS}}}edit-data": self.edit_data,
            f"{{{NOTIF_NS}}}create-subscription": self.create_subscription,
            f"{{{datastores.ns}}}freeze": windows.freeze,
            f"{{{datastores.ns}}}thaw": windows.thaw,
            f"{{{datastores.ns}}}announce-migration": windows.announce,
        }
        if changes is not None:
            self._handlers[f"{{{datastores.ns}}}track-changes"] = changes.track_changes
            self._handlers[f"{{{datastores.ns}}}changes"] = changes.changes
        digests = SessionDigests(datastores.backend, schema, datastores.ns)
        self._handlers[f"{{{datastores.ns}}}session-digest"] = digests.session_digest
        # YANG-Push (RFC 8639/8641): establish-, modify-, delete-, kill-, resync-subscription
        self.push = YangPush(datastores.backend, hub.feed, schema, datastores.ns)
        self._handlers.update(self.push.handlers())

    # -- capabilities ------------------------------------------------------------------
    def capabilities(self) -> list[str]:
        caps = [
            "urn:ietf:params:netconf:base:1.0",
            "urn:ietf:params:netconf:base:1.1",
            "urn:ietf:params:netconf:capability:writable-running:1.0",
            "urn:ietf:params:netconf:capability:candidate:1.0",
            "urn:ietf:params:netconf:capability:confirmed-commit:1.0",
            "urn:ietf:params:netconf:capability:confirmed-commit:1.1",
            "urn:ietf:params:netconf:capability:rollback-on-error:1.0",
            "urn:ietf:params:netconf:capability:validate:1.0",
            "urn:ietf:params:netconf:capability:validate:1.1",
            "urn:ietf:params:netconf:capability:startup:1.0",
            "urn:ietf:params:netconf:capability:xpath:1.0",
            "urn:ietf:params:netconf:capability:notification:1.0",
            "urn:ietf:params:netconf:capability:interleave:1.0",
            # RFC 6243: what a read reports without with-defaults, and the other modes
            f"{CAP}with-defaults:1.0?basic-mode={BASIC_MODE}&also-supported="
            + ",".join(m for m in WITH_DEFAULTS if m != BASIC_MODE),
            # RFC 8526 §2: the NMDA yang-library (/yang-library, with the datastores).
            f"{CAP}yang-library:1.1?revision={YANGLIB_REV}&content-id={self.content_id}",
            # RFC 7950 §5.6.4's, for clients that only know RFC 7895: the only way they
            # learn of YANG 1.1 modules (nfmig-nat), which the hello cannot list, is
            # /modules-state, and they look for it only under this capability. RFC 8526
            # has NMDA servers announce :1.1 instead; announcing both costs the NMDA
            # clients nothing (they take :1.1) and keeps the older ones working. The
            # revision is that of the ietf-yang-library module implemented, as §5.6.4
            # says: its deprecated modules-state is what RFC 7895 defined, and get-schema
            # returns that module (2016-06-21 is nowhere here to be fetched).
            f"{CAP}yang-library:1.0?revision={YANGLIB_REV}&module-set-id={self.content_id}",
        ]
        # YANG 1.0 modules are announced in the hello too (RFC 7950 §5.6.4), so clients
        # that do not read the yang-library still find get-schema and friends.
        for m in self.schema.modules():
            if m.implemented() and not is_yang_1_1(m) and m.name() != "ietf-netconf":
                caps.append(f"{module_ns(m)}?module={m.name()}&revision={module_revision(m)}")
        return caps

    # -- dispatch ----------------------------------------------------------------------
    def dispatch(self, session: SessionInfo, operation: etree._Element) -> Reply:
        handler = self._handlers.get(operation.tag)
        if handler is None:
            qname = etree.QName(operation)
            raise errors.not_supported(
                f"operation {qname.localname} ({qname.namespace or 'no namespace'}) is not "
                "supported by this server")
        if self.nacm is None:
            return handler(session, operation)
        access = self.nacm.access_of(session.username, session.source_host)
        qname = etree.QName(operation)
        with nacm.acting(access):
            self.nacm.check_exec(access, qname.namespace or "", qname.localname)
            return handler(session, operation)

    def prepare(self, request: HollowEdit) -> None:
        """The part of handling a bulk edit that needs no datastore (reading its entries),
        done ahead while the session's previous request is still being handled."""
        self.ds.decoder.prepare(request)

    # -- reads -------------------------------------------------------------------------
    def get(self, session: SessionInfo, op: etree._Element) -> Reply:
        _only(op, "filter", also=(f"{{{NCWD}}}with-defaults",))
        nodes = [*self.ds.config_nodes("running"), *self.state_nodes()]
        return self._reply_data(NC, nodes, op.find(f"{{{NC}}}filter"),
                                defaults=_with_defaults(op, NCWD), content="all")

    def get_config(self, session: SessionInfo, op: etree._Element) -> Reply:
        _only(op, "source", "filter", also=(f"{{{NCWD}}}with-defaults",))
        source = _datastore_choice(op, "source", CONFIG_DATASTORES)
        return self._reply_data(NC, self.ds.config_nodes(source), op.find(f"{{{NC}}}filter"),
                                defaults=_with_defaults(op, NCWD))

    def get_data(self, session: SessionInfo, op: etree._Element) -> Reply:
        known = ("datastore", "subtree-filter", "xpath-filter", "config-filter", "max-depth",
                 "origin-filter", "negated-origin-filter", "with-origin", "with-defaults")
        _only(op, *known, ns=NCDS)
        datastore = _identity(op.find(f"{{{NCDS}}}datastore"))
        config_filter = _text(op, "config-filter", NCDS)
        nodes: list[TopNode] = []
        if datastore == "operational":
            if config_filter != "false":
                nodes += self.ds.config_nodes("running")
            if config_filter != "true":
                nodes += self.state_nodes()
        elif datastore in CONFIG_DATASTORES:
            if config_filter != "false":
                nodes += self.ds.config_nodes(datastore)
        else:
            raise errors.invalid_value(f"unknown datastore {datastore!r}",
                                       info={"bad-element": "datastore"})
        for unsupported in ("with-origin", "origin-filter", "negated-origin-filter"):
            if op.find(f"{{{NCDS}}}{unsupported}") is not None:
                raise errors.not_supported(f"{unsupported} is not supported (the origin "
                                           "feature is not implemented)", type="application")
        depth = _text(op, "max-depth", NCDS)
        max_depth = None
        if depth not in (None, "unbounded"):
            if not depth.isdigit() or int(depth) < 1:
                raise errors.invalid_value(f"max-depth {depth!r} is not a positive integer "
                                           "or 'unbounded'", info={"bad-element": "max-depth"})
            max_depth = int(depth)
        defaults = _with_defaults(op, NCDS)
        if defaults is not None and datastore == "operational":
            # RFC 8526 §3.1.1: only with :with-operational-defaults, not announced here
            raise errors.invalid_value("with-defaults applies to the configuration "
                                       "datastores here, not to operational",
                                       info={"bad-element": "with-defaults"})
        xpath = op.find(f"{{{NCDS}}}xpath-filter")
        subtree = op.find(f"{{{NCDS}}}subtree-filter")
        return self._reply_data(NCDS, nodes, None, subtree=subtree, xpath=xpath,
                                max_depth=max_depth, defaults=defaults)

    def _reply_data(self, ns: str, nodes: list[TopNode], nc_filter: etree._Element | None, *,
                    subtree: etree._Element | None = None, xpath: etree._Element | None = None,
                    max_depth: int | None = None, defaults: str | None = None,
                    content: str = "config") -> Reply:
        nodes = nacm.readable(nodes)  # what the user may not read is left out
        nodes = self.defaults.apply(nodes, defaults, content, nacm.reads_whole)
        if nc_filter is not None:
            kind = nc_filter.get("type", "subtree")
            if kind == "xpath":
                xpath = nc_filter
            elif kind == "subtree":
                subtree = nc_filter
            else:
                raise RpcError("bad-attribute", f"filter type {kind!r} is not subtree or xpath",
                               type="protocol",
                               info={"bad-attribute": "type", "bad-element": "filter"})
        if xpath is None and max_depth is None:
            if subtree is None:
                return _stream_data(ns, nodes, "")
            return self._subtree_reply(ns, nodes, subtree)
        if xpath is not None and max_depth is None:
            picked = self._entries_by_test(ns, nodes, xpath)
            if picked is not None:
                return picked
        data = self._parse_data(ns, (n.text() for n in nodes))
        if xpath is not None:
            select = xpath.get("select") if xpath.tag.endswith("}filter") else xpath.text
            data = xpath_filter(data, select or "", xpath.nsmap)
        elif subtree is not None:
            data = subtree_filter(data, subtree)
        if max_depth is not None:
            limit_depth(data, max_depth, self._schema_node, self.index.children)
        return etree.tostring(data, encoding="unicode")

    def _entries_by_test(self, ns: str, nodes: list[TopNode], xpath: etree._Element
                         ) -> str | None:
        """An XPath filter that picks nat-session entries by their own leaves (a selection
        of subscribers' prefixes, say), run on each run of entries as it is read instead of
        on a tree of the whole table; None for any other filter."""
        select = (xpath.get("select") if xpath.tag.endswith("}filter") else xpath.text) or ""
        lists = [n for n in nodes if n.namespace == self.ds.ns and n.name == "nat-session"]
        if len(lists) != 1 or not selects_by_own_leaves(select, xpath.nsmap, self.ds.ns,
                                                   "nat-session"):
            return None
        picked = []
        for run in lists[0].produce():
            found = xpath_filter(self._parse_data(ns, [run]), select, xpath.nsmap)
            picked += (etree.tostring(entry, encoding="unicode") for entry in found)
        return f'<data xmlns="{ns}">{"".join(picked)}</data>'

    def _subtree_reply(self, ns: str, nodes: list[TopNode], subtree: etree._Element
                       ) -> Iterator[str]:
        """Whole nodes the filter selects go out as produced; only the rest is parsed."""
        whole: list[TopNode] = []
        partial: list[str] = []
        for node, is_whole in select_top_nodes(nodes, subtree):
            # A list that selects its own entries by content matches is never parsed.
            wanted = content_matches(subtree, node.namespace, node.name or "") \
                if node.select is not None and not is_whole else None
            produce = node.select(wanted) if node.select is not None and wanted else None
            if is_whole or produce is not None:
                whole.append(node if produce is None else
                             TopNode(node.namespace, node.name, produce))
            else:
                partial.append(node.text())
        rest = ""
        if partial:
            filtered = subtree_filter(self._parse_data(ns, partial), subtree)
            rest = "".join(etree.tostring(c, encoding="unicode") for c in filtered)
        return _stream_data(ns, whole, rest)

    def _schema_node(self, top: etree._Element):
        qname = etree.QName(top)
        return self.index.top.get(f"{self.index.module_of.get(qname.namespace)}:"
                                  f"{qname.localname}")

    @staticmethod
    def _parse_data(ns: str, parts: Iterable[str]) -> etree._Element:
        return etree.fromstring(f'<data xmlns="{ns}">{"".join(parts)}</data>'.encode(),
                                parser=_PARSER)

    def state_nodes(self, location: Location | None = None) -> list[TopNode]:
        """The state data; ``location`` gives the yang-library's module URLs. NETCONF has
        none: its clients fetch modules with get-schema, and netconf-state/schemas says
        so (location "NETCONF", RFC 6022) without naming the server's files."""
        return [*self.ds.state_nodes(),
                TopNode(YANGLIB, "yang-library", lambda: [
                    self.schema.yang_library_xml(self.content_id, location)]),
                TopNode(YANGLIB, "modules-state", lambda: [
                    self.schema.modules_state_xml(self.content_id, location)]),
                TopNode(NCM, "netconf-state", lambda: [self._netconf_state()]),
                self.push.state_node(),
                *([self.nacm.state_node()] if self.nacm is not None else [])]

    def _netconf_state(self) -> str:
        with self.stats.lock:  # a session ends into the totals under this lock
            current = list(self.sessions.values())
            statistics = self.stats.xml(current)
        locks = {d: self.ds.locks.get(d) for d in CONFIG_DATASTORES}
        return netconf_state_xml(self.capabilities(), locks, self.schema.modules(), current,
                                 statistics)

    def get_schema(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op, "identifier", "version", "format", ns=NCM)
        identifier = _text(op, "identifier", NCM)
        if not identifier:
            raise errors.missing_element("get-schema needs an identifier", "identifier",
                                         type="protocol")
        fmt = _text(op, "format", NCM) or "yang"
        if fmt.split(":")[-1] != "yang":
            raise errors.invalid_value(f"format {fmt!r} is not available; only yang",
                                       info={"bad-element": "format"})
        text = self.schema.schema_text(identifier, _text(op, "version", NCM))
        if text is None:
            raise errors.invalid_value(f"no schema {identifier!r} with that version here",
                                       info={"bad-element": "identifier"})
        return f'<data xmlns="{NCM}">{escape(text)}</data>'

    # -- writes ------------------------------------------------------------------------
    def edit_config(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op, "target", "default-operation", "test-option", "error-option", "config", "url")
        target = _datastore_choice(op, "target", ("running", "candidate"))
        options = EditOptions(
            default_operation=_choice(op, "default-operation", NC,
                                      ("merge", "replace", "none"), "merge"),
            test_option=_choice(op, "test-option", NC, ("test-then-set", "set", "test-only"),
                                "test-then-set"),
            error_option=_choice(op, "error-option", NC, ("stop-on-error", "continue-on-error",
                                                          "rollback-on-error"), "stop-on-error"))
        self.ds.edit(target, _config_param(op, NC), options, session.session_id,
                     source=session.request)
        return OK

    def edit_data(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op, "datastore", "default-operation", "config", "url", ns=NCDS)
        datastore = _identity(op.find(f"{{{NCDS}}}datastore"))
        options = EditOptions(default_operation=_choice(
            op, "default-operation", NCDS, ("merge", "replace", "none"), "merge"))
        self.ds.edit(datastore, _config_param(op, NCDS), options, session.session_id,
                     source=session.request)
        return OK

    def copy_config(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op, "target", "source")
        target = _datastore_choice(op, "target", CONFIG_DATASTORES)
        source_el = _required(op, "source")
        inline = source_el.find(f"{{{NC}}}config")
        if inline is None:
            inline = source_el.find("config")
        source = inline if inline is not None else _datastore_choice(op, "source",
                                                                     CONFIG_DATASTORES)
        if source == target:
            raise errors.invalid_value("copy-config source and target are the same datastore",
                                       info={"bad-element": "target"})
        self.ds.copy_config(source, target, session.session_id)
        return OK

    def delete_config(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op, "target")
        self.ds.delete_config(_datastore_choice(op, "target", CONFIG_DATASTORES),
                              session.session_id)
        return OK

    def lock(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op, "target")
        self.ds.lock(_datastore_choice(op, "target", CONFIG_DATASTORES), session.session_id)
        return OK

    def unlock(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op, "target")
        self.ds.unlock(_datastore_choice(op, "target", CONFIG_DATASTORES), session.session_id)
        return OK

    def validate(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op, "source")
        source_el = _required(op, "source")
        inline = source_el.find(f"{{{NC}}}config")
        if inline is not None:
            self.ds.edit("candidate", inline, EditOptions(default_operation="replace",
                                                          test_option="test-only"),
                         session.session_id)
            return OK
        self.ds.validate(_datastore_choice(op, "source", CONFIG_DATASTORES))
        return OK

    def commit(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op, "confirmed", "confirm-timeout", "persist", "persist-id")
        confirmed = op.find(f"{{{NC}}}confirmed") is not None
        timeout = _text(op, "confirm-timeout", NC)
        if timeout is not None and (not confirmed or not timeout.strip().isdigit()
                                    or not 0 < int(timeout) < 2**32):
            raise errors.invalid_value("confirm-timeout is a number of seconds from 1 to "
                                       "4294967295, and only goes with confirmed",
                                       info={"bad-element": "confirm-timeout"})
        persist = _text(op, "persist", NC)
        if persist is not None and not confirmed:
            raise errors.invalid_value("persist only goes with confirmed",
                                       info={"bad-element": "persist"})
        self.ds.commit(session.session_id, confirmed=confirmed,
                       timeout=int(timeout) if timeout else 600, persist=persist,
                       persist_id=_text(op, "persist-id", NC))
        return OK

    def cancel_commit(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op, "persist-id")
        self.ds.cancel_commit(session.session_id, _text(op, "persist-id", NC))
        return OK

    def discard_changes(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op)
        self.ds.discard_changes(session.session_id)
        return OK

    def close_session(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op)
        session.ended_by_request = True
        return OK  # the transport closes the session after sending this reply

    def kill_session(self, session: SessionInfo, op: etree._Element) -> str:
        _only(op, "session-id")
        text = _text(op, "session-id", NC)
        if not text or not text.isdigit():
            raise errors.missing_element("kill-session needs a numeric session-id",
                                         "session-id", type="protocol")
        victim = int(text)
        if victim == session.session_id:
            raise errors.invalid_value("a session cannot kill itself; use close-session",
                                       info={"bad-element": "session-id"})
        target = self.sessions.get(victim)
        if target is None:
            raise errors.invalid_value(f"no session {victim}", info={"bad-element": "session-id"})
        target.ended_by_request = True
        if target.close:
            target.close()
        self.ds.release_locks(victim)
        self.hub.unsubscribe(victim)
        return OK

    def create_subscription(self, session: SessionInfo, op: etree._Element) -> str:
        selector = parse_subscription(op)
        if session.notify is None:
            raise errors.operation_failed("this session cannot receive notifications")
        send = session.notify
        access = nacm.current()
        if access is not None:  # each notification judged as it is delivered
            send = access.engine.filtered(access, send)
        self.hub.subscribe(session.session_id, send, selector)
        return OK

    def session_started(self, info: SessionInfo) -> None:
        """A NETCONF session whose hello (with its session-id) is being sent: known from
        then on (a client may name it in kill-session before it has sent its own)."""
        with self.stats.lock:
            self.sessions[info.session_id] = info
            self.stats.in_sessions += 1

    def end_session(self, session_id: int) -> list[str]:
        """Forget a closed session: its subscription ends, its locks are released."""
        with self.stats.lock:
            info = self.sessions.pop(session_id, None)
            if info is not None:
                self.stats.ended(info)
        self.hub.unsubscribe(session_id)
        self.push.session_ended(session_id)
        self.ds.session_ended(session_id)
        return self.ds.release_locks(session_id)


_PARSER = etree.XMLParser(huge_tree=True, resolve_entities=False, no_network=True)


def _stream_data(ns: str, nodes: list[TopNode], tail: str) -> Iterator[str]:
    """A data element as pieces, so a large reply is sent while it is still being produced."""
    yield f'<data xmlns="{ns}">'
    for node in nodes:
        yield from node.produce()
    yield f"{tail}</data>"


def _only(op: etree._Element, *names: str, ns: str = NC, also: tuple[str, ...] = ()) -> None:
    """Refuse parameters the operation does not define (RFC 6241: unknown-element);
    ``also``: parameters other modules add to it, by their qualified names."""
    for child in op:
        if not isinstance(child.tag, str) or child.tag in also:
            continue
        qname = etree.QName(child)
        if qname.localname not in names or qname.namespace not in (ns, None):
            raise errors.unknown_element(
                f"{etree.QName(op).localname} has no parameter {qname.localname}",
                qname.localname, type="protocol")


def _with_defaults(op: etree._Element, ns: str) -> str | None:
    """The with-defaults parameter (RFC 6243 §4.5), checked; None when absent."""
    mode = _text(op, "with-defaults", ns)
    if mode is not None and mode not in WITH_DEFAULTS:
        raise errors.invalid_value(f"with-defaults {mode!r} is not one of "
                                   f"{', '.join(WITH_DEFAULTS)}",
                                   info={"bad-element": "with-defaults"})
    return mode


def _required(op: etree._Element, name: str, ns: str = NC) -> etree._Element:
    el = op.find(f"{{{ns}}}{name}")
    if el is None:
        el = op.find(name)
    if el is None:
        raise errors.missing_element(f"{etree.QName(op).localname} needs <{name}>", name,
                                     type="protocol")
    return el


def _text(op: etree._Element, name: str, ns: str) -> str | None:
    el = op.find(f"{{{ns}}}{name}")
    return None if el is None else (el.text or "").strip()


def _choice(op: etree._Element, name: str, ns: str, allowed: tuple, default: str) -> str:
    value = _text(op, name, ns)
    if value is None:
        return default
    if value not in allowed:
        raise errors.invalid_value(f"{name} {value!r} is not one of {', '.join(allowed)}",
                                   info={"bad-element": name})
    return value


def _datastore_choice(op: etree._Element, name: str, allowed: tuple) -> str:
    holder = _required(op, name)
    chosen = [c for c in holder if isinstance(c.tag, str)]
    if len(chosen) != 1:
        raise errors.missing_element(f"<{name}> must name exactly one datastore", name,
                                     type="protocol")
    which = etree.QName(chosen[0]).localname
    if which not in allowed:
        raise errors.invalid_value(f"{which} cannot be used as {name} here (choose from "
                                   f"{', '.join(allowed)})", info={"bad-element": name})
    return which


def _identity(el: etree._Element | None) -> str:
    """The datastore identity named by a get-data/edit-data <datastore> leaf."""
    if el is None or not (el.text or "").strip():
        raise errors.missing_element("<datastore> is required", "datastore", type="protocol")
    prefix, _, name = el.text.strip().rpartition(":")
    if prefix and el.nsmap.get(prefix) != DS:
        raise errors.invalid_value(f"datastore {el.text.strip()!r} is not an "
                                   "ietf-datastores identity", info={"bad-element": "datastore"})
    return name


def _config_param(op: etree._Element, ns: str) -> etree._Element:
    if op.find(f"{{{ns}}}url") is not None:
        raise errors.not_supported("the :url capability is not supported", type="application")
    config = op.find(f"{{{ns}}}config")
    if config is None:
        config = op.find("config")  # clients that send <config> without a namespace
    if config is None:
        raise errors.missing_element(f"{etree.QName(op).localname} needs <config>", "config",
                                     type="protocol")
    return config
