"""The libyang context every datastore of one server shares, and thin typed wrappers over it.

libyang is the authority on the model: it loads the modules, parses and validates every
edit (the bulk list's entries too: :meth:`Schema.canonical_xml`), answers get-schema and
builds the yang-library. For the bulk list (``nat-session``), :class:`ListEntryChecker`
compiles per-leaf checks *from the libyang schema*: the exact canonical forms the bulk
reader may take without asking libyang, and checked conversions of single values.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import libyang
from _libyang import ffi, lib
from nfmig.yang import NAT_MODULE, YANG_DIR

from .errors import RpcError

# Modules the server implements, with the features it supports.
IMPLEMENTED: dict[str, tuple[str, ...]] = {
    NAT_MODULE: (),
    "ietf-netconf": ("writable-running", "candidate", "confirmed-commit", "rollback-on-error",
                     "validate", "startup", "xpath"),
    "ietf-netconf-monitoring": (),
    # with-defaults: get-data takes the with-defaults parameter (the :with-defaults
    # capability is advertised, RFC 8526 §3.1.1)
    "ietf-netconf-nmda": ("with-defaults",),
    "ietf-datastores": (),
    "ietf-origin": (),
    "ietf-netconf-with-defaults": (),
    "ietf-restconf-monitoring": (),
    "ietf-netconf-acm": (),  # RFC 8341: /nacm in running, enforced by nacm.py
    # RFC 8512: the sessions again, as mapping-entries (server/ietf_nat.py). napt44: the
    # NATs translate ports (TCP, UDP, ICMP identifiers); dst-nat: the kernel NAT holds
    # destination NAT sessions. No basic-nat44 (address only), nat64, siit, clat, nptv6.
    "ietf-nat": ("napt44", "dst-nat"),
    "nfmig-nat-ietf": (),  # what a mapping-entry lacks of a session (its augment)
    # YANG-Push (server/yang_push.py): dynamic subscriptions of the nat-session list, XML,
    # subtree and XPath filters, on-change. No configured subscriptions, replay, QoS
    # (dscp), interface-designation or supports-vrf.
    "ietf-subscribed-notifications": ("encode-xml", "subtree", "xpath"),
    "ietf-yang-push": ("on-change",),
    "nfmig-push-state": (),  # each receiver's backlog in /subscriptions (push_state.py)
}

# A stateful firewall's model: its policy and pinholes; its connections are nfmig-nat's
# sessions with nothing translated (yang/nfmig-firewall).
FIREWALL_MODULES: dict[str, tuple[str, ...]] = {"nfmig-firewall": ()}

# libyang's own modules (YANG extensions and annotations it parses with, schema mount): in
# its context, but not modules this server implements or needs, so never listed.
LIBYANG_OWN = frozenset({"yang", "ietf-yang-schema-mount", "ietf-yang-structure-ext"})
YANGLIB_NS = "urn:ietf:params:xml:ns:yang:ietf-yang-library"
DS_NS = "urn:ietf:params:xml:ns:yang:ietf-datastores"
DATASTORES = ("running", "candidate", "startup", "operational")
# A module's URL from its name and revision.
Location = Callable[[str, str], str]

# libyang keeps its error list per context, so parses on one context are serialised.
_PARSE_LOCK = threading.Lock()


@dataclass
class YangError(Exception):
    """A libyang validation failure, with the data path it names when it names one."""

    message: str
    path: str | None = None
    app_tag: str | None = None
    validation_code: int = 0

    def __str__(self) -> str:
        return self.message

    def to_rpc_error(self) -> RpcError:
        tag = "invalid-value"
        msg = self.message
        if msg.startswith("Missing XML namespace"):
            return RpcError("unknown-namespace", msg, path=self.path,
                            info={"bad-namespace": ""})
        if msg.startswith("No module with namespace"):
            return RpcError("unknown-namespace", msg, path=self.path,
                            info={"bad-namespace": _quoted(msg)})
        if " not found as a child of " in msg or msg.startswith("Node \""):
            return RpcError("unknown-element", msg, path=self.path,
                            info={"bad-element": _quoted(msg)})
        if "is missing its key" in msg or "does not exist" in msg and "Mandatory" in msg:
            return RpcError("missing-element", msg, path=self.path,
                            info={"bad-element": _quoted(msg)})
        if self.app_tag in ("must-violation", "too-many-elements", "too-few-elements"):
            tag = "operation-failed"
        return RpcError(tag, msg, path=self.path, app_tag=self.app_tag)


def _enable_features(module: libyang.Module, features: tuple[str, ...]) -> None:
    """Enable the features together: libyang takes the whole set in one call (one at a time,
    each call replaces the last, and a feature depending on another cannot be enabled)."""
    names = [ffi.new("char[]", f.encode()) for f in features]
    if lib.lys_set_implemented(module.cdata, ffi.new("char *[]", [*names, ffi.NULL])):
        raise RuntimeError(f"cannot enable features {', '.join(features)} of {module.name()}")


def _load_with_features(ctx: libyang.Context, name: str, features: tuple[str, ...]) -> None:
    """Load a module with its features enabled from the start: one whose schema does not
    compile without some of them (ietf-nat: an enumeration all of whose values depend on
    features) cannot be loaded first and given them afterwards."""
    names = [ffi.new("char[]", f.encode()) for f in features]
    if not lib.ly_ctx_load_module(ctx.cdata, name.encode(), ffi.NULL,
                                  ffi.new("char *[]", [*names, ffi.NULL])):
        raise RuntimeError(f"cannot load {name} with features {', '.join(features)}")


def module_revision(module: libyang.Module) -> str:
    """The module's latest revision date, or "" when it has none."""
    return next((r.date() for r in module.revisions()), "")


def module_ns(module: libyang.Module) -> str:
    return ffi.string(module.cdata.ns).decode()


def is_yang_1_1(module: libyang.Module) -> bool:
    parsed = module.cdata.parsed
    return bool(parsed) and parsed.version == 2  # LYS_VERSION_1_1


def _quoted(message: str) -> str:
    """The first double-quoted word of a libyang message (the node or namespace it names)."""
    parts = message.split('"')
    return parts[1] if len(parts) > 2 else ""


def _take_errors(ctx: libyang.Context) -> YangError:
    err = lib.ly_err_first(ctx.cdata)
    first = None
    while err:
        msg = ffi.string(err.msg).decode() if err.msg else "invalid data"
        path = ffi.string(err.path).decode() if err.path else None
        if path:
            # libyang says 'Data location "/x", line number 1.'; keep only the path itself.
            quoted = path.split('"')
            path = quoted[1] if len(quoted) > 2 and quoted[0].endswith("location ") else None
        apptag = ffi.string(err.apptag).decode() if err.apptag else None
        if first is None:
            first = YangError(msg, path, apptag, err.vecode)
        err = err.next
    lib.ly_err_clean(ctx.cdata, ffi.NULL)
    return first or YangError("invalid data")


class Schema:
    """The loaded modules; parse, validate and print through one libyang context."""

    def __init__(self, yang_dir: Path = YANG_DIR, nf: str = "nat"):
        """``nf``: the kind of network function served; a firewall implements its own
        module (FIREWALL_MODULES) beside the NAT's."""
        libyang.configure_logging(False)
        lib.ly_set_log_clb(ffi.NULL, True)  # store data paths with every error
        self.yang_dir = Path(yang_dir)
        self.ctx = libyang.Context(str(self.yang_dir))
        implemented = {**IMPLEMENTED, **(FIREWALL_MODULES if nf == "firewall" else {})}
        for name, features in implemented.items():
            if name == "ietf-nat":  # see _load_with_features
                _load_with_features(self.ctx, name, features)
                continue
            module = self.ctx.load_module(name)
            if features:
                _enable_features(module, features)
        self.nat = self.ctx.get_module(NAT_MODULE)
        self.nat_ns = module_ns(self.nat)

    # -- data --------------------------------------------------------------------------
    def parse_xml(self, text: str | bytes, *, config: bool = True,
                  validate: bool = True) -> libyang.DNode | None:
        """Parse (and by default fully validate) an XML data forest; raise YangError."""
        flags = lib.LYD_PARSE_STRICT
        if not validate:
            flags |= lib.LYD_PARSE_ONLY
        # Only the modules the text has data of: validating the others would add their
        # default containers (/nacm) beside what was parsed.
        vflags = lib.LYD_VALIDATE_PRESENT
        if config:
            flags |= lib.LYD_PARSE_NO_STATE
            vflags |= lib.LYD_VALIDATE_NO_STATE
        data = text.encode() if isinstance(text, str) else text
        with _PARSE_LOCK:
            tree = self._parse(data, flags, vflags)
        if tree is None:
            return None
        return libyang.DNode.new(self.ctx, tree)

    def check_config(self, text: str | bytes) -> None:
        """Raise the RpcError libyang's verdict makes when the configuration forest
        ``text`` is not valid."""
        try:
            tree = self.parse_xml(text)
        except YangError as exc:
            raise exc.to_rpc_error() from None
        if tree is not None:
            tree.free()

    def canonical_xml(self, text: str) -> str:
        """A forest of configuration nodes as libyang reads it strictly (every element,
        attribute and value checked against the model, the forest as a whole not
        validated), printed back: each value in its canonical form, each node's children
        in schema order. Raises YangError."""
        flags = lib.LYD_PARSE_STRICT | lib.LYD_PARSE_ONLY | lib.LYD_PARSE_NO_STATE
        with _PARSE_LOCK:
            tree = self._parse(text.encode(), flags, 0)
            if tree is None:
                return ""
            try:
                out = ffi.new("char **")
                if lib.lyd_print_mem(out, tree, lib.LYD_XML, lib.LYD_PRINT_WITHSIBLINGS
                                     | lib.LYD_PRINT_SHRINK) != lib.LY_SUCCESS:
                    raise _take_errors(self.ctx)
                try:
                    return ffi.string(out[0]).decode()
                finally:
                    lib.free(out[0])
            finally:
                lib.lyd_free_all(tree)

    def _parse(self, data: bytes, flags: int, vflags: int):
        """The tree libyang parses from ``data`` (NULL as None); the caller holds the lock
        and frees the tree."""
        inp = ffi.new("struct ly_in **")
        if lib.ly_in_new_memory(data, inp) != lib.LY_SUCCESS:
            raise YangError("cannot read the data")
        tree = ffi.new("struct lyd_node **")
        ret = lib.lyd_parse_data(self.ctx.cdata, ffi.NULL, inp[0], lib.LYD_XML, flags, vflags,
                                 tree)
        lib.ly_in_free(inp[0], 0)
        if ret != lib.LY_SUCCESS:
            if tree[0]:
                lib.lyd_free_all(tree[0])
            raise _take_errors(self.ctx)
        return tree[0] or None

    def check_value(self, snode: libyang.SNode, value: str) -> str | None:
        """libyang's verdict on one leaf value: None if valid, else its message."""
        raw = value.encode()
        with _PARSE_LOCK:
            ret = lib.lyd_value_validate(self.ctx.cdata, snode.cdata, raw, len(raw), ffi.NULL,
                                         ffi.NULL, ffi.NULL)
            if ret in (lib.LY_SUCCESS, lib.LY_EINCOMPLETE):
                return None
            return _take_errors(self.ctx).message

    def output_json(self, name: str, namespace: str, output: str) -> str:
        """An rpc's output (its children as XML text) as RFC 8040's JSON reply,
        ``{"module:output": {...}}``, with libyang's RFC 7951 encoding of every leaf."""
        module, _, local = name.partition(":")
        with _PARSE_LOCK:
            try:
                node = self.ctx.parse_op_mem(
                    "xml", f'<{local} xmlns="{namespace}">{output}</{local}>',
                    libyang.DataType.REPLY_YANG)
            except libyang.LibyangError as exc:
                lib.ly_err_clean(self.ctx.cdata, ffi.NULL)
                raise YangError(str(exc)) from None
            try:
                text = node.print_mem("json", with_siblings=True)
            finally:
                node.free()
        body = json.loads(text).get(name, {})
        return json.dumps({f"{module}:output": body})

    def parse_operation(self, element: str, *, notification: bool = False) -> dict[str, Any]:
        """An rpc's input (or a notification) checked by libyang, leaf by leaf: types,
        patterns, ranges. Returns its content as a dict; raises YangError."""
        kind = libyang.DataType.NOTIF_YANG if notification else libyang.DataType.RPC_YANG
        with _PARSE_LOCK:
            try:
                node = self.ctx.parse_op_mem("xml", element, kind)
            except libyang.LibyangError as exc:
                lib.ly_err_clean(self.ctx.cdata, ffi.NULL)
                message = str(exc).removeprefix("failed to parse input data: ")
                raise YangError(message.split(": Data location")[0]) from None
            try:
                return next(iter(node.print_dict(strip_prefixes=True).values()))
            finally:
                node.free()

    def find(self, path: str) -> libyang.SNode:
        return next(self.ctx.find_path(path))

    # -- modules -----------------------------------------------------------------------
    def modules(self) -> list[libyang.Module]:
        """The modules the yang-library lists: those implemented, and those they import.
        libyang's own modules are left out: the server implements none of them."""
        return [m for m in self.ctx if m.name() not in LIBYANG_OWN]

    def features(self, module: libyang.Module) -> list[str]:
        return [f.name() for f in module.features() if f.state()]

    def schema_text(self, name: str, revision: str | None) -> str | None:
        """The YANG source of a module the server has, or None."""
        for module in self.modules():
            if module.name() != name:
                continue
            rev = module_revision(module)
            if revision and revision != rev:
                continue
            for candidate in (self.yang_dir / f"{name}@{rev}.yang", self.yang_dir / f"{name}.yang"):
                if candidate.exists():
                    return candidate.read_text()
            return module.print_mem("yang")
        return None

    def yang_library_xml(self, content_id: str, location: Location | None = None) -> str:
        """/yang-library (RFC 8525): one module-set and schema, every datastore with it.
        ``location`` gives a module's URL; None leaves locations out, which tells a NETCONF
        client to use get-schema (RFC 8525: present only when there is a URL to give)."""
        implemented, imported = [], []
        for m in self.modules():
            rev = module_revision(m)
            where = f"<location>{escape(location(m.name(), rev))}</location>" if location \
                else ""
            head = f"<name>{m.name()}</name><revision>{rev}</revision>" \
                   f"<namespace>{escape(module_ns(m))}</namespace>{where}"
            if m.implemented():
                features = "".join(f"<feature>{f}</feature>" for f in self.features(m))
                implemented.append(f"<module>{head}{features}</module>")
            else:
                imported.append(f"<import-only-module>{head}</import-only-module>")
        stores = "".join(f"<datastore><name>ds:{d}</name><schema>complete</schema></datastore>"
                         for d in DATASTORES)
        return (f'<yang-library xmlns="{YANGLIB_NS}" xmlns:ds="{DS_NS}"><module-set>'
                f"<name>complete</name>{''.join(implemented)}{''.join(imported)}</module-set>"
                "<schema><name>complete</name><module-set>complete</module-set></schema>"
                f"{stores}<content-id>{content_id}</content-id></yang-library>")

    def modules_state_xml(self, module_set_id: str, location: Location | None = None) -> str:
        """/modules-state (RFC 7895, deprecated by RFC 8525 but what clients of the
        yang-library:1.0 capability read): the same modules, ``module-set-id`` the
        yang-library's content-id."""
        entries = []
        for m in self.modules():
            rev = module_revision(m)
            where = f"<schema>{escape(location(m.name(), rev))}</schema>" if location else ""
            features = "".join(f"<feature>{f}</feature>" for f in self.features(m))
            kind = "implement" if m.implemented() else "import"
            entries.append(f"<module><name>{m.name()}</name><revision>{rev}</revision>{where}"
                           f"<namespace>{escape(module_ns(m))}</namespace>{features}"
                           f"<conformance-type>{kind}</conformance-type></module>")
        return (f'<modules-state xmlns="{YANGLIB_NS}"><module-set-id>{module_set_id}'
                f"</module-set-id>{''.join(entries)}</modules-state>")

    def content_id(self) -> str:
        """An identifier of the module set: changes whenever what the library lists does."""
        text = self.yang_library_xml("") + self.modules_state_xml("")
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- bulk list entries ---------------------------------------------------------------------
Converter = Callable[[str], Any]
_INT_BOUNDS = {
    libyang.Type.UINT8: (0, 2**8 - 1), libyang.Type.UINT16: (0, 2**16 - 1),
    libyang.Type.UINT32: (0, 2**32 - 1), libyang.Type.UINT64: (0, 2**64 - 1),
}
_DIGITS_AND_COMMAS = re.compile("[0-9,]*")


def _unsigned_list(csv: str) -> list[int] | None:
    """The integers of comma-separated ASCII digits, or None when it is anything else. JSON
    refuses what a plain decimal would not be (an empty value, leading zeros), and the
    pattern keeps out all else JSON would accept (signs, fractions, exponents, literals)."""
    if not _DIGITS_AND_COMMAS.fullmatch(csv):
        return None
    try:
        return json.loads(f"[{csv}]")
    except ValueError:
        return None


class LeafCheck:
    """One leaf of a bulk list: :meth:`convert` turns its XML text into its Python value, or
    raises ValueError with libyang's own message (fast paths for unrestricted unsigned
    integers, enumerations and RFC 6991 addresses; everything else asks libyang, remembered
    since values repeat). :meth:`canonical_column` is the bulk reader's stricter check."""

    def __init__(self, schema: Schema, snode: libyang.SNode):
        self.schema = schema
        self.snode = snode
        self.name = snode.name()
        ytype = snode.type()
        self.numeric = ytype.base() in _INT_BOUNDS or ytype.base() in (
            libyang.Type.INT8, libyang.Type.INT16, libyang.Type.INT32, libyang.Type.INT64)
        self._cache: dict[str, Any] = {}
        self.convert: Converter = self._by_libyang
        self._range = _unsigned_range(ytype)
        self._enums: frozenset[str] | None = None
        self._address = False
        self._canonical_seen: set[str] = set()  # addresses found canonical before
        if ytype.base() in _INT_BOUNDS and not list(ytype.all_ranges()):
            self._bounds = _INT_BOUNDS[ytype.base()]
            self.convert = self._unsigned
        elif ytype.base() == libyang.Type.ENUM:
            self._enums = frozenset(e.name() for e in ytype.all_enums())
            self.convert = self._enum
        elif ytype.name().endswith(":ip-address-no-zone"):
            self._address = True
            self.convert = self._address_value
        # A valid value of the leaf, for a leaf whose value does not matter (one an edit
        # only names, to take it away).
        candidates = [str(self._range[0])] if self._range else sorted(self._enums or ()) \
            or (["0.0.0.0"] if self._address else [])
        self.placeholder = next((c for c in candidates if schema.check_value(snode, c) is None),
                                None)

    def canonical_column(self, texts: list[str]) -> list[Any] | None:
        """Each text's value, when every text is written exactly as libyang writes that
        value (its canonical form); else None, and libyang reads them. The forms accepted
        are few and exact: decimal digits without leading zeros inside the range, an enum's
        name, a dotted quad, an IPv6 address as the C library prints it."""
        if self._range is not None:
            values = _unsigned_list(",".join(texts))
            if values is None or len(values) != len(texts):
                return None
            low, high = self._range
            return values if not values or (min(values) >= low and max(values) <= high) \
                else None
        if self._enums is not None:
            return list(texts) if self._enums.issuperset(texts) else None
        if self._address:
            new = set(texts).difference(self._canonical_seen)
            if not all(map(_canonical_address, new)):
                return None
            if len(self._canonical_seen) < 65536:
                self._canonical_seen.update(new)
            return list(texts)
        return None

    def _unsigned(self, text: str) -> int:
        if text.isascii() and text.isdigit():
            value = int(text)
            if value <= self._bounds[1]:
                return value
        return self._by_libyang(text)

    def _enum(self, text: str) -> str:
        if text in self._enums:
            return text
        return self._by_libyang(text)

    def _address_value(self, text: str) -> str:
        cached = self._cache.get(text)
        if cached is not None:
            return cached
        try:
            if ":" in text:
                if "%" in text:
                    raise ValueError
                value = _canonical_ipv6(text)
            else:
                socket.inet_pton(socket.AF_INET, text)  # strict dotted quad, no leading zeros
                value = text
        except (ValueError, OSError):
            return self._by_libyang(text)
        if len(self._cache) < 65536:
            self._cache[text] = value
        return value

    def _by_libyang(self, text: str) -> Any:
        if text in self._cache:
            return self._cache[text]
        problem = self.schema.check_value(self.snode, text)
        if problem:
            raise ValueError(problem)
        value: Any = int(text) if self.numeric else text
        if isinstance(value, str) and ":" in value:
            try:
                value = _canonical_ipv6(value)
            except (OSError, ValueError):
                pass
        if len(self._cache) < 65536:
            self._cache[text] = value
        return value


def _canonical_ipv6(text: str) -> str:
    """The form libyang prints an IPv6 address in: the C library's (so ::ffff:10.0.0.1
    stays dotted, where Python's ipaddress would write ::ffff:a00:1)."""
    return socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, text))


_DOTTED_QUAD = re.compile(r"(?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}"
                          r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])")


def _canonical_address(text: str) -> bool:
    """Whether ``text`` is an address without zone as libyang prints one."""
    if _DOTTED_QUAD.fullmatch(text):
        return True
    if ":" not in text or not text.isascii():
        return False
    try:
        return _canonical_ipv6(text) == text
    except (OSError, ValueError):
        return False


def _unsigned_range(ytype: libyang.Type) -> tuple[int, int] | None:
    """The one interval an unsigned integer type allows, or None (another type, or a range
    of several parts)."""
    bounds = _INT_BOUNDS.get(ytype.base())
    if bounds is None:
        return None
    ranges = list(ytype.all_ranges())
    if not ranges:
        return bounds
    parts = [r.strip() for r in " ".join(ranges).split("|")]
    if len(ranges) != 1 or len(parts) != 1:
        return None
    low, _, high = parts[0].partition("..")
    low, high = low.strip(), (high or low).strip()
    try:
        return (bounds[0] if low == "min" else int(low),
                bounds[1] if high == "max" else int(high))
    except ValueError:
        return None


class ListEntryChecker:
    """Checks for every leaf of one top-level list, compiled from its libyang schema node."""

    def __init__(self, schema: Schema, list_path: str):
        snode = schema.find(list_path)
        self.schema = schema
        self.name = snode.name()
        self.prefix = list_path.split(":")[0].lstrip("/")
        self.keys = [k.name() for k in snode.keys()]
        self.leaves: dict[str, LeafCheck] = {}
        for child in snode.children():
            if child.nodetype() != libyang.SNode.LEAF:
                raise TypeError(f"{list_path}: only leaves are supported in a bulk list")
            self.leaves[child.name()] = LeafCheck(schema, child)

    def entry_path(self, key_values: dict[str, str]) -> str:
        predicate = "".join(f"[{k}='{key_values.get(k, '')}']" for k in self.keys)
        return f"/{self.prefix}:{self.name}{predicate}"
