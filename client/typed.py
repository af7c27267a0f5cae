"""Typed nat-session objects for scripts that build or inspect a few sessions.

The classes behind them are generated from yang/ by pyangbind (client/nat_bindings.py, written
by ``make bindings`` and checked for freshness by ``make lint``), so every value is checked
against the model the moment it is set, before anything reaches a server. Building one entry
costs milliseconds (34 s for 10k): this module is never on the bulk path, which moves text
(:meth:`NatClient.get_sessions`, :meth:`NatClient.edit`).

    from nfmig.client.typed import NatSession, fetch_sessions, push_sessions, to_xml
    s = NatSession(protocol="TCP", src_address="10.0.0.7", src_port=40000,
                   dst_address="198.51.100.9", dst_port=443, tcp_state="established")
    s.translated_address = "192.0.2.1"
    push_sessions(client, s)          # edit-config on running
    fetch_sessions(client, src_address="10.0.0.7")

``python -m nfmig.client.typed generate FILE`` writes the bindings; ``... check`` fails when
the committed ones no longer match what pyangbind generates from the model.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree
from nfmig.yang import NAT_MODULE, NAT_NS, YANG_DIR

if TYPE_CHECKING:
    from nfmig.client.netconf import NatClient

BINDINGS_FILE = Path(__file__).with_name("nat_bindings.py")
BINDINGS_NAME = "client/nat_bindings.py"  # as the repository names it, for messages
KEYS = ("protocol", "src_address", "src_port", "dst_address", "dst_port")
FETCH_LIMIT = 100  # beyond this, the bulk path is the right tool
HEADER = ("# Generated from yang/{module} by `make bindings` (pyangbind's pyang plugin).\n"
          "# Do not edit: `make lint` fails when this file no longer matches the model.\n")


class TypedValueError(ValueError):
    """A value, leaf or document the model does not allow; names the leaf when there is one."""

    def __init__(self, message: str, leaf: str | None = None):
        super().__init__(message)
        self.leaf = leaf


# -- the bindings ----------------------------------------------------------------------------
def _bindings():
    try:
        from nfmig.client import nat_bindings
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("pyangbind", "regex"):
            raise ImportError("typed objects need pyangbind: pip install 'nfmig[typed]'") \
                from exc
        raise
    return nat_bindings


@functools.cache
def _entry_class() -> type:
    # A standalone entry, outside any list: building the module's root as well would triple
    # the cost of a session (pyangbind builds every container's type checks per instance).
    return _bindings().nfmig_nat().nat_session._contained_class


def leaf_names() -> tuple[str, ...]:
    """The leaves of a nat-session, in the model's order."""
    return tuple(_entry_class()._pyangbind_elements)


def _expected(info: Any) -> str:
    """What a leaf accepts, from the details pyangbind puts in its ValueError."""
    if not isinstance(info, dict):
        return "a valid value"
    generated = str(info.get("generated-type", ""))
    enums = re.search(r"restriction_arg=\{(.*?)\},\)", generated)
    if enums:
        names = re.findall(r"'([^']+)':\s*\{", enums.group(1))
        return "one of " + ", ".join(names)
    what = str(info.get("defined-type", "value")).removeprefix(f"{NAT_MODULE}:")
    ranges = re.findall(r"'range':\s*\['([^']+)'\]", generated)
    return f"a valid {what}" + (f" ({ranges[-1]})" if ranges else "")


def _set_leaf(entry: Any, name: str, value: Any) -> None:
    """Set one leaf of a binding object, or say in plain words why the model refuses it."""
    if name not in entry._pyangbind_elements:
        raise TypedValueError(f"nat-session has no leaf {name!r} (it has: "
                              f"{', '.join(entry._pyangbind_elements)})", name)
    if value is None:
        getattr(entry, f"_unset_{name}")()
        return
    # pyangbind would store True as 1 and truncate 4.5 to 4; the model has neither.
    if isinstance(getattr(entry, name), int) and (
            isinstance(value, bool) or not isinstance(value, int | str)):
        raise TypedValueError(f"{name}: {value!r} is not an integer", name)
    try:
        setattr(entry, name, value)
    except (ValueError, TypeError) as exc:
        info = exc.args[0] if exc.args else None
        raise TypedValueError(f"{name}: {value!r} is not {_expected(info)}",
                              name) from None


def _plain(value: Any) -> int | str | None:
    if not value._changed():
        return None
    return int(value) if isinstance(value, int) else str(value)


# -- one session -----------------------------------------------------------------------------
class NatSession:
    """One nat-session list entry; every leaf is an attribute, checked when set.

    The key leaves (the 5-tuple) are fixed when the object is built; any other leaf can be
    set, and set to None to leave it out.
    """

    __slots__ = ("_entry",)

    # The leaves, for readers and type checkers (a test keeps them equal to the model's);
    # reading one that is not set gives None.
    protocol: str
    src_address: str
    src_port: int
    dst_address: str
    dst_port: int
    translated_address: str | None
    translated_port: int | None
    translated_dst_address: str | None
    translated_dst_port: int | None
    tcp_state: str | None
    src_window_scale: int | None
    dst_window_scale: int | None
    timeout: int | None
    orig_packets: int | None
    orig_bytes: int | None
    reply_packets: int | None
    reply_bytes: int | None

    def __init__(self, *, protocol: str, src_address: str, src_port: int, dst_address: str,
                 dst_port: int, **leaves: Any):
        keys = {"protocol": protocol, "src_address": src_address, "src_port": src_port,
                "dst_address": dst_address, "dst_port": dst_port}
        entry = _entry_class()()
        for name, value in keys.items():
            if value is None:
                raise TypedValueError(f"{name} is a key of nat-session: it needs a value", name)
            _set_leaf(entry, name, value)
        object.__setattr__(self, "_entry", entry)
        for name, value in leaves.items():
            setattr(self, name, value)

    def __getattr__(self, name: str) -> int | str | None:
        entry = object.__getattribute__(self, "_entry")
        if name.startswith("_") or name not in entry._pyangbind_elements:
            raise AttributeError(f"nat-session has no leaf {name!r}")
        return _plain(getattr(entry, name))

    def __setattr__(self, name: str, value: Any) -> None:
        if name in KEYS:
            raise TypedValueError(f"{name} is a key of nat-session: build a new NatSession "
                                  "for another 5-tuple", name)
        _set_leaf(self._entry, name, value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NatSession) and self.as_dict() == other.as_dict()

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        leaves = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"NatSession({leaves})"

    @property
    def key(self) -> tuple[str, str, int, str, int]:
        """The 5-tuple that names the session: protocol, source, destination."""
        return tuple(getattr(self, k) for k in KEYS)  # type: ignore[return-value]

    def as_dict(self) -> dict[str, int | str]:
        """The leaves that are set, in the model's order."""
        values = {name: _plain(getattr(self._entry, name))
                  for name in self._entry._pyangbind_elements}
        return {k: v for k, v in values.items() if v is not None}

    def to_xml(self) -> str:
        """The entry as a ``<nat-session>`` element, ready for an edit-config ``<config>``."""
        from pyangbind.lib.serialise import pybindIETFXMLEncoder

        return etree.tostring(pybindIETFXMLEncoder.encode(self._entry), encoding="unicode")

    def json_entry(self) -> dict[str, Any]:
        """The entry as RFC 7951 JSON (uint64 counters as strings), one member of the list."""
        from pyangbind.lib import pybindJSON

        # pyangbind qualifies every member of an entry serialised on its own; inside the
        # list RFC 7951 wants the simple names (all leaves are of this one module).
        members = json.loads(pybindJSON.dumps(self._entry, mode="ietf"))
        return {name.removeprefix(f"{NAT_MODULE}:"): value for name, value in members.items()}


def to_xml(*sessions: NatSession) -> str:
    """The sessions as ``<nat-session>`` elements: the content of an edit-config
    ``<config>``, or the ``config_body`` of :meth:`NatClient.edit`."""
    return "".join(s.to_xml() for s in sessions)


def to_json(*sessions: NatSession) -> str:
    """The sessions as an RFC 7951 JSON document of the model's top-level list."""
    return json.dumps({f"{NAT_MODULE}:nat-session": [s.json_entry() for s in sessions]},
                      indent=2)


# -- from XML and from a server --------------------------------------------------------------
def from_xml(text: str | bytes) -> list[NatSession]:
    """Every nat-session entry in a get-data / get-config reply, its ``<data>``, or bare
    ``<nat-session>`` elements (as :meth:`NatClient.get_sessions` returns them)."""
    raw = text.encode() if isinstance(text, str) else text
    raw = re.sub(rb"^\s*<\?xml[^>]*\?>", b"", raw)
    if raw.lstrip().startswith(b"<nat-session"):
        raw = f'<data xmlns="{NAT_NS}">'.encode() + raw + b"</data>"
    try:
        root = etree.fromstring(raw or b"<empty/>", etree.XMLParser(resolve_entities=False))
    except etree.XMLSyntaxError as exc:
        raise TypedValueError(f"not an XML document: {exc}") from None
    entries = [root] if root.tag == f"{{{NAT_NS}}}nat-session" else \
        root.iter(f"{{{NAT_NS}}}nat-session")
    return [_from_element(e) for e in entries]


def session_from_xml(text: str | bytes) -> NatSession:
    """The one nat-session entry in ``text``; an error when there is none or several."""
    found = from_xml(text)
    if len(found) != 1:
        raise TypedValueError(f"expected one nat-session, found {len(found)}")
    return found[0]


def _from_element(element: etree._Element) -> NatSession:
    values: dict[str, str] = {}
    for child in element:
        if not isinstance(child.tag, str):
            continue  # comments, processing instructions
        name = etree.QName(child)
        if name.namespace != NAT_NS:
            raise TypedValueError(f"nat-session has no leaf {name.localname!r} in "
                                  f"namespace {name.namespace}", name.localname)
        values[name.localname] = child.text or ""
    missing = [k for k in KEYS if k not in values]
    if missing:
        raise TypedValueError(f"a nat-session without its key leaves {', '.join(missing)}",
                              missing[0])
    return NatSession(**values)


def fetch_sessions(client: NatClient, datastore: str = "operational",
                   limit: int = FETCH_LIMIT, **match: str | int) -> list[NatSession]:
    """A few sessions of a server as typed objects, e.g. ``fetch_sessions(c,
    src_address="10.0.0.7")``: the entries whose leaves have these values. Refuses more than
    ``limit`` of them: for many, read text with :meth:`NatClient.get_sessions`."""
    probe = _entry_class()()
    for name, value in match.items():
        _set_leaf(probe, name, value)  # a value the model refuses never reaches the server
    body, _ = client.get_sessions(datastore, {k: str(v) for k, v in match.items()})
    count = body.count("<nat-session")
    if count > limit:
        raise TypedValueError(f"{count} sessions match, more than the {limit} typed objects "
                              "are for: narrow the match, raise limit, or read them in bulk "
                              "with NatClient.get_sessions")
    return from_xml(body)


def push_sessions(client: NatClient, *sessions: NatSession, target: str = "running") -> int:
    """Merge the sessions into a datastore with edit-config; returns the request's size."""
    return client.edit(to_xml(*sessions), target)


# -- generating the bindings -----------------------------------------------------------------
def model_file(yang_dir: Path = YANG_DIR) -> Path:
    """The newest revision of the model in ``yang_dir``."""
    found = sorted(yang_dir.glob(f"{NAT_MODULE}@*.yang"))
    if not found:
        raise FileNotFoundError(f"no {NAT_MODULE}@*.yang in {yang_dir}")
    return found[-1]


def bindings_source(yang_dir: Path = YANG_DIR) -> str:
    """What pyangbind generates from the model: the text client/nat_bindings.py must hold."""
    try:
        import pyangbind
    except ImportError:
        raise ImportError("generating the bindings needs pyang and pyangbind: pip install "
                          "'nfmig[typed]'") from None
    module = model_file(yang_dir)
    plugin = Path(pyangbind.__file__).resolve().parent / "plugin"
    run = subprocess.run([sys.executable, "-m", "pyang", "--plugindir", str(plugin),
                          "-f", "pybind", "-p", str(yang_dir), str(module)],
                         capture_output=True, text=True, check=False)
    if run.returncode != 0 or not run.stdout:
        raise RuntimeError(f"pyang -f pybind failed on {module.name}:\n{run.stderr.strip()}")
    return HEADER.format(module=module.name) + run.stdout


def stale_bindings(path: Path = BINDINGS_FILE, yang_dir: Path = YANG_DIR) -> str | None:
    """Why the bindings in ``path`` do not match the model, or None when they are fresh."""
    try:
        current = path.read_text()
    except FileNotFoundError:
        return f"{BINDINGS_NAME} is missing: run make bindings"
    if current != bindings_source(yang_dir):
        return (f"{BINDINGS_NAME} is stale: run make bindings (it differs from what "
                f"pyangbind generates from {model_file(yang_dir).name})")
    return None


def write_bindings(path: Path = BINDINGS_FILE, yang_dir: Path = YANG_DIR) -> None:
    text = bindings_source(yang_dir)
    # Written beside the target and renamed, so a failed run never leaves half a module.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nfmig.client.typed",
                                     description="Generate or check the typed bindings.")
    parser.add_argument("action", choices=("generate", "check"))
    parser.add_argument("file", nargs="?", type=Path, default=BINDINGS_FILE)
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        if args.action == "generate":
            write_bindings(args.file)
            return 0
        problem = stale_bindings(args.file)
    except (ImportError, RuntimeError, OSError) as exc:
        print(f"nfmig: {exc}", file=sys.stderr)
        return 1
    if problem:
        print(problem, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
