"""Replies checked by yanglint against the modules the server itself lists.

A :class:`Library` is read from a server's own ietf-yang-library (NETCONF XML or RESTCONF
JSON): the modules it implements, their revisions and features, and those it imports
only. :meth:`Library.check` writes a reply's data to a file and has yanglint parse it
strictly with exactly those modules from yang/ (each at the revision listed, with the
features listed and no other), so an element, a value, a missing list key or a module the
server uses without listing it fails the test with yanglint's own message.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree
from nfmig.yang import YANG_DIR

YANGLIB = "urn:ietf:params:xml:ns:yang:ietf-yang-library"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NCDS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
RESTCONF = "urn:ietf:params:xml:ns:yang:ietf-restconf"
# RFC 6243 §6 names the default attribute in this namespace in XML; libyang knows the
# annotation by the namespace of the module that defines it (ietf-netconf-with-defaults,
# RFC 7952), so the checked copy of a reply carries it there.
WD_XML = "urn:ietf:params:xml:ns:netconf:default:1.0"
WD_MODULE = "urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults"
# yanglint's data types (-t): a reply to get or get-data of operational, and one of a
# configuration datastore.
GET, GETCONFIG = "get", "getconfig"


@dataclass
class Module:
    name: str
    revision: str
    features: list[str] = field(default_factory=list)
    implemented: bool = True

    @property
    def file(self) -> Path:
        return YANG_DIR / f"{self.name}@{self.revision}.yang"


@dataclass
class Library:
    """The modules one server's yang-library lists."""

    modules: list[Module]
    content_id: str

    @classmethod
    def from_xml(cls, data: str | bytes | etree._Element) -> Library:
        """From a reply's data holding /yang-library (the <data> element, or its text)."""
        root = data if isinstance(data, etree._Element) else etree.fromstring(
            data.encode() if isinstance(data, str) else data)
        ns = {"y": YANGLIB}
        library = root if root.tag == f"{{{YANGLIB}}}yang-library" else \
            root.find(".//y:yang-library", ns)
        assert library is not None, "the reply holds no yang-library"
        modules = []
        for kind, implemented in (("module", True), ("import-only-module", False)):
            for m in library.iterfind(f"y:module-set/y:{kind}", ns):
                modules.append(Module(m.findtext("y:name", namespaces=ns),
                                      m.findtext("y:revision", namespaces=ns) or "",
                                      [f.text for f in m.iterfind("y:feature", ns)],
                                      implemented))
        return cls(modules, library.findtext("y:content-id", namespaces=ns))

    @classmethod
    def from_json(cls, data: dict) -> Library:
        """From RESTCONF JSON holding ietf-yang-library:yang-library."""
        data = data.get("ietf-restconf:data", data)
        library = data["ietf-yang-library:yang-library"]
        modules = []
        for module_set in library["module-set"]:
            for kind, implemented in (("module", True), ("import-only-module", False)):
                for m in module_set.get(kind, []):
                    modules.append(Module(m["name"], m.get("revision", ""),
                                          m.get("feature", []), implemented))
        return cls(modules, library["content-id"])

    def implemented(self) -> list[Module]:
        return [m for m in self.modules if m.implemented]

    def names(self) -> set[str]:
        return {m.name for m in self.modules}

    def check(self, data: str | bytes | etree._Element | dict | list, tmp_path: Path,
              kind: str = GET) -> None:
        """Assert that yanglint accepts ``data``: XML (a reply's <data>, <rpc-reply> or
        RESTCONF <data> element, or a forest of top-level nodes as text) or RESTCONF JSON
        (ietf-restconf:data, or a top-level resource), as ``kind`` (GET, GETCONFIG)."""
        if isinstance(data, dict | list):
            text, fmt = json.dumps(data.get("ietf-restconf:data", data)
                                   if isinstance(data, dict) else data), "json"
        else:
            text, fmt = _xml_forest(data), "xml"
        if fmt == "xml" and not text.strip():
            return  # no data: nothing for yanglint to refuse (it reads no empty file)
        path = tmp_path / f"reply-{time.monotonic_ns()}.{fmt}"
        path.write_text(text)
        result = self.yanglint(fmt, kind, path)
        assert result.returncode == 0, f"yanglint refuses the reply:\n{result.stderr}\n" \
                                       f"reply: {text[:3000]}"

    def yanglint(self, fmt: str, kind: str, path: Path) -> subprocess.CompletedProcess:
        schemas = []
        features = []
        for m in self.implemented():
            assert m.file.exists(), f"{m.name}@{m.revision} is listed but not in yang/"
            schemas.append(str(m.file))
            features += ["-F", f"{m.name}:{','.join(m.features)}"]
        # -D: imports are found in yang/ only, not in the working directory
        return subprocess.run(["yanglint", "-D", "-p", str(YANG_DIR), "-f", fmt,
                               "-t", kind, *features, *schemas, str(path)],
                              capture_output=True, text=True, timeout=60)


def _xml_forest(data: str | bytes | etree._Element) -> str:
    """The top-level data nodes of an XML reply, as text (any wrapper dropped)."""
    if isinstance(data, etree._Element):
        nodes = [data]
    else:
        raw = re.sub(rb"^\s*<\?xml[^>]*\?>", b"", data.encode() if isinstance(data, str)
                     else data)
        nodes = [c for c in etree.fromstring(b"<x>" + raw + b"</x>") if isinstance(c.tag, str)]
    while len(nodes) == 1 and nodes[0].tag in _WRAPPERS:
        nodes = [c for c in nodes[0] if isinstance(c.tag, str)]
    out = []
    for node in nodes:
        copy = etree.fromstring(etree.tostring(node))
        for el in copy.iter():
            value = el.attrib.pop(f"{{{WD_XML}}}default", None)
            if value is not None:
                assert value == "true", f"a default attribute is {value!r}, not true"
                el.set(f"{{{WD_MODULE}}}default", "true")
        out.append(etree.tostring(copy, encoding="unicode"))
    return "".join(out)


_WRAPPERS = {f"{{{NC}}}rpc-reply", f"{{{NC}}}data", f"{{{NCDS}}}data", f"{{{RESTCONF}}}data"}
