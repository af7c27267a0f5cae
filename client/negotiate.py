"""Capability negotiation: what each end of a migration implements, from its hello and its
ietf-yang-library, and whether the ends agree well enough to move sessions between them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from lxml import etree

from .endpoints import Connection

NAT_MODULE = "nfmig-nat"
YANGLIB = "urn:ietf:params:xml:ns:yang:ietf-yang-library"
CAP = "urn:ietf:params:netconf:capability:"
CANDIDATE = CAP + "candidate:1.0"
VALIDATE = (CAP + "validate:1.0", CAP + "validate:1.1")
CONFIRMED_COMMIT = CAP + "confirmed-commit:1.1"
YANGLIB_11 = CAP + "yang-library:1.1"
YANGLIB_10 = CAP + "yang-library:1.0"
_PARSER = etree.XMLParser(huge_tree=True, resolve_entities=False, no_network=True)


@dataclass(frozen=True)
class ModuleInfo:
    revision: str | None
    features: frozenset[str] = frozenset()
    deviations: frozenset[str] = frozenset()

    def __str__(self) -> str:
        text = f"{NAT_MODULE}@{self.revision or 'no-revision'}"
        if self.features:
            text += f" features {','.join(sorted(self.features))}"
        if self.deviations:
            text += f" deviated by {','.join(sorted(self.deviations))}"
        return text


@dataclass
class Facts:
    """What one endpoint implements."""

    capabilities: frozenset[str]
    modules: dict[str, ModuleInfo] = field(default_factory=dict)  # implemented modules
    source: str = "yang-library"  # where the module list came from

    @property
    def nat(self) -> ModuleInfo | None:
        return self.modules.get(NAT_MODULE)

    def has(self, *capabilities: str) -> bool:
        return any(c in self.capabilities for c in capabilities)

    @property
    def confirmed_commit(self) -> bool:
        return self.has(CONFIRMED_COMMIT)


def read_facts(conn: Connection) -> Facts:
    caps = frozenset(c.strip() for c in conn.capabilities)
    if any(c.startswith(YANGLIB_11) for c in caps):
        data = conn.get_data("operational", f'<subtree-filter><yang-library xmlns="{YANGLIB}"/>'
                                            "</subtree-filter>")
        return Facts(caps, yang_library_modules(data))
    return Facts(caps, hello_modules(caps), source="hello")


def yang_library_modules(data_text: str) -> dict[str, ModuleInfo]:
    """Implemented modules of an RFC 8525 yang-library (every module-set, as XML text)."""
    root = etree.fromstring(f"<data>{data_text}</data>".encode(), parser=_PARSER)
    ns = {"y": YANGLIB}
    modules: dict[str, ModuleInfo] = {}
    for module in root.iterfind(".//y:module-set/y:module", ns):
        name = module.findtext("y:name", namespaces=ns)
        if name:
            modules[name] = ModuleInfo(
                module.findtext("y:revision", namespaces=ns),
                frozenset(f.text.strip() for f in module.iterfind("y:feature", ns) if f.text),
                frozenset(d.text.strip() for d in module.iterfind("y:deviation", ns)
                          if d.text))
    return modules


def hello_modules(capabilities: Iterable[str]) -> dict[str, ModuleInfo]:
    """Modules announced in a hello as ``NS?module=NAME&revision=R&features=A,B``
    (RFC 6020 §5.6.4), for servers without a yang-library."""
    modules = {}
    for cap in capabilities:
        _, sep, query = cap.partition("?")
        params = parse_qs(query) if sep else {}
        if "module" not in params:
            continue
        modules[params["module"][0]] = ModuleInfo(
            params.get("revision", [None])[0],
            frozenset(",".join(params.get("features", [])).split(",")) - {""},
            frozenset(",".join(params.get("deviations", [])).split(",")) - {""})
    return modules


def problems(ends: Sequence[tuple[str, str, Facts]], require_revision: str | None = None,
             require_features: Iterable[str] = ()) -> list[str]:
    """Why these ends cannot take part in one migration (empty: they can).

    ``ends`` are (endpoint, role, facts); the first source is the reference every other end
    must match: the same nfmig-nat revision, features and deviations, so an entry read on
    one end means the same on the other.
    """
    found: list[str] = []
    required = frozenset(require_features)
    reference: tuple[str, ModuleInfo] | None = None
    for endpoint, role, facts in ends:
        nat = facts.nat
        if nat is None:
            found.append(f"{role} {endpoint} does not implement the {NAT_MODULE} module "
                         f"(not in its {facts.source})")
            continue
        if require_revision and nat.revision != require_revision:
            found.append(f"{role} {endpoint} implements {NAT_MODULE} revision {nat.revision}, "
                         f"{require_revision} is required")
        missing = sorted(required - nat.features)
        if missing:
            found.append(f"{role} {endpoint}: {NAT_MODULE}@{nat.revision} lacks the "
                         f"feature{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        if reference is None:
            reference = (endpoint, nat)
        else:
            found += _compare(reference, endpoint, role, nat)
        if role == "source" and "ietf-netconf-nmda" not in facts.modules:
            found.append(f"source {endpoint} does not implement ietf-netconf-nmda "
                         "(get-data on the operational datastore, RFC 8526)")
        if role == "target":
            if not facts.has(CANDIDATE):
                found.append(f"target {endpoint} lacks the :candidate capability (sessions "
                             "are staged in the candidate and committed at once)")
            if not facts.has(*VALIDATE):
                found.append(f"target {endpoint} lacks the :validate capability")
    return found


def _compare(reference: tuple[str, ModuleInfo], endpoint: str, role: str,
             nat: ModuleInfo) -> list[str]:
    ref_endpoint, ref = reference
    found = []
    if nat.revision != ref.revision:
        found.append(f"{role} {endpoint} implements {NAT_MODULE} revision {nat.revision}, "
                     f"{ref_endpoint} revision {ref.revision}; every end must implement the "
                     "same revision")
    if nat.features != ref.features:
        found.append(f"{role} {endpoint} supports the {NAT_MODULE} features "
                     f"{_names(nat.features)}, {ref_endpoint} {_names(ref.features)}; "
                     "every end must support the same features")
    if nat.deviations != ref.deviations:
        found.append(f"{role} {endpoint} deviates {NAT_MODULE} by {_names(nat.deviations)}, "
                     f"{ref_endpoint} by {_names(ref.deviations)}")
    return found


def _names(items: frozenset[str]) -> str:
    return "{" + ", ".join(sorted(items)) + "}" if items else "none"
