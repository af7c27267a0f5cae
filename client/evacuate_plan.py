"""A site evacuation's plan (which NAT goes where, with which options) and the job's state
on disk (how far each pair got), for :mod:`nfmig.client.evacuate`.

A plan is a YAML or JSON mapping::

    defaults:                       # all optional
      user: admin                   # for endpoints written without user@
      password-env: SITE_PASSWORD   # else --password-file, NFMIG_PASSWORD, keys, a prompt
      known-hosts: ~/.ssh/known_hosts
      freeze-timeout: 60
    pairs:                          # explicit: each source to its target
      - {source: netconf://nat-a1:830, target: netconf://nat-b1:830}
      - {source: netconf://nat-a2:830, target: netconf://nat-b1:830,
         select: subscriber=10.0.2.0/24}

or, instead of ``pairs``, a pool: ``sources: [URL, ...]`` and ``targets: [{endpoint: URL,
capacity: N}, ...]``; each source then goes to a target with room for its sessions. A
``targets`` list beside ``pairs`` gives their targets a capacity that admission respects.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .endpoints import Credentials, Endpoint, EndpointError
from .ends import Options
from .selection import Selection, SelectionError

STATE_VERSION = 1
# Where a pair stands in the job: pending (not started, or to be run again), running (a
# migration under way, or interrupted if found so on resume), done, failed.
STATES = ("pending", "running", "done", "failed")


class PlanError(ValueError):
    """A plan that cannot be used; the message names the file, line and field."""


@dataclass(frozen=True)
class Defaults:
    """The plan's ``defaults`` section: how to log in, and each migration's options."""

    user: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    key_file: Path | None = None
    known_hosts: Path | None = None
    ca_file: Path | None = None
    insecure_no_host_key_check: bool = False
    compression: str = "auto"  # auto | on | off
    timeout: int = 600  # longest wait for one reply, seconds
    connect_timeout: int = 30
    freeze_timeout: int = 60
    confirm_timeout: int = 120
    keep_source: bool = False
    dry_run: bool = False
    freeze: bool = True
    partial: bool = False
    with_policy: bool = False
    switchover: str = "gateway"
    model: str = "nfmig-nat"
    select: tuple[str, ...] = ()  # the selection of pairs that name none

    def options(self) -> Options:
        """A migration's options from these defaults (credentials, id and hooks unset)."""
        return Options(keep_source=self.keep_source, dry_run=self.dry_run,
                       freeze=self.freeze, freeze_timeout=self.freeze_timeout,
                       confirm_timeout=self.confirm_timeout, switchover=self.switchover,
                       partial=self.partial, with_policy=self.with_policy, model=self.model,
                       rpc_timeout=self.timeout, connect_timeout=self.connect_timeout)

    def compress(self) -> bool | None:
        return {"on": True, "off": False}.get(self.compression)

    def credentials(self, interactive: bool = False) -> Credentials:
        """Credentials from these defaults, through the same sources as ``nfmig migrate``
        (a password file, else NFMIG_PASSWORD, else keys, else a prompt): the variable
        named by password-env, when set, takes NFMIG_PASSWORD's place."""
        credentials = Credentials.from_sources(
            self.password_file, interactive=interactive, key_file=self.key_file,
            known_hosts=self.known_hosts or Path("~/.ssh/known_hosts"),
            ca_file=self.ca_file, verify_host_keys=not self.insecure_no_host_key_check,
            compress=self.compress())
        password = self.env_password()
        if password is not None and self.password_file is None:
            credentials.password, credentials.prompt = password, None
        return credentials

    def env_password(self) -> str | None:
        """The password from the variable password-env names; None without one."""
        if self.password_env is None:
            return None
        value = os.environ.get(self.password_env)
        if not value:
            raise PlanError(f"defaults.password-env: the environment variable "
                            f"{self.password_env} is not set")
        return value


@dataclass(frozen=True)
class Pair:
    """One NAT to move: its source, its target (None until a pool assigns one) and what."""

    id: str
    source: Endpoint
    target: Endpoint | None
    selection: Selection = field(default_factory=Selection.all)


@dataclass(frozen=True)
class Target:
    endpoint: Endpoint
    capacity: int | None = None  # sessions it may hold in all; None: no limit


@dataclass
class Plan:
    """A parsed, checked plan. ``pool``: the targets are assigned when it runs."""

    pairs: list[Pair]
    targets: list[Target]
    defaults: Defaults
    pool: bool
    origin: str  # the file, or "<plan>" for a mapping
    digest: str  # of what the plan says, to tie a state file to it

    @classmethod
    def load(cls, plan: str | Path | Mapping[str, Any]) -> Plan:
        """A plan from a YAML or JSON file, or from a mapping of the same shape."""
        if isinstance(plan, Mapping):
            return _Reader("<plan>", {}).plan(plan)
        path = Path(plan)
        try:
            text = path.read_text()
        except OSError as exc:
            raise PlanError(f"{path}: cannot read the plan: {exc.strerror or exc}") from None
        data, lines = _parse(text, str(path))
        return _Reader(str(path), lines).plan(data)

    def capacity_of(self, endpoint: Endpoint) -> int | None:
        return next((t.capacity for t in self.targets if t.endpoint == endpoint), None)


# -- reading ---------------------------------------------------------------------------
_DEFAULT_KEYS = {f.name.replace("_", "-"): f for f in fields(Defaults)}
_PATHS = ("password_file", "key_file", "known_hosts", "ca_file")
_CHOICES = {"compression": ("auto", "on", "off"), "model": ("nfmig-nat", "ietf-nat")}
_RANGES = {"timeout": (1, 86400), "connect_timeout": (1, 3600), "freeze_timeout": (1, 3600),
           "confirm_timeout": (1, 86400)}


def _parse(text: str, origin: str) -> tuple[Any, dict[tuple, int]]:
    """The document and the line of each field (by its path of keys and indices)."""
    data: Any = None
    is_json = origin.endswith(".json") or text.lstrip().startswith(("{", "["))
    if is_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"{origin}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    try:
        import yaml
    except ImportError:
        if is_json:
            return data, {}
        raise PlanError(f"{origin}: reading a YAML plan needs PyYAML (pip install pyyaml); "
                        "or write the plan as JSON") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        value = data if is_json else yaml.safe_load(text)
    except yaml.YAMLError as exc:
        if is_json:  # JSON that YAML reads otherwise: the fields' lines are unknown
            return data, {}
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PlanError(f"{origin}{where}: not valid YAML: {problem}") from None
    lines: dict[tuple, int] = {}
    _lines(node, (), lines)
    return value, lines


def _lines(node: Any, path: tuple, out: dict[tuple, int]) -> None:
    if node is None:
        return
    out.setdefault(path, node.start_mark.line + 1)  # a key's line, for a mapping's value
    if node.id == "mapping":
        for key, value in node.value:
            child = (*path, key.value)
            out[child] = key.start_mark.line + 1
            _lines(value, child, out)
    elif node.id == "sequence":
        for index, item in enumerate(node.value):
            _lines(item, (*path, index), out)


class _Reader:
    def __init__(self, origin: str, lines: dict[tuple, int]):
        self.origin = origin
        self.lines = lines

    def fail(self, path: tuple, message: str) -> PlanError:
        line = next((self.lines[path[:n]] for n in range(len(path), -1, -1)
                     if path[:n] in self.lines), None)
        where = f"{self.origin}:{line}" if line else self.origin
        name = _path_text(path)
        return PlanError(f"{where}: {name + ': ' if name else ''}{message}")

    def plan(self, data: Any) -> Plan:
        if not isinstance(data, Mapping):
            raise self.fail((), "a plan is a mapping with pairs, or sources and targets")
        unknown = set(data) - {"defaults", "pairs", "sources", "targets"}
        if unknown:
            raise self.fail((sorted(map(str, unknown))[0],), "unknown section (a plan has "
                            "defaults, pairs, sources, targets)")
        defaults = self.defaults(data.get("defaults") or {})
        targets = [self.target(item, ("targets", i), defaults)
                   for i, item in enumerate(self.listed(data, "targets"))]
        if "pairs" in data:
            if "sources" in data:
                raise self.fail(("sources",), "give pairs, or sources with a pool of "
                                "targets, not both")
            pool = False
            pairs = [self.pair(item, ("pairs", i), defaults)
                     for i, item in enumerate(self.listed(data, "pairs"))]
            if not pairs:
                raise self.fail(("pairs",), "no pair to move")
        elif "sources" in data:
            pool = True
            if not targets:
                raise self.fail(("targets",), "a pool of sources needs targets with "
                                "their capacity")
            select = self.selection(list(defaults.select), ("defaults", "select"))
            pairs = [Pair(str(i + 1), self.endpoint(item, ("sources", i), defaults), None,
                          select) for i, item in enumerate(self.listed(data, "sources"))]
            if not pairs:
                raise self.fail(("sources",), "no source to move")
        else:
            raise self.fail((), "no pairs, and no sources: nothing to move")
        self.check(pairs, targets, pool)
        return Plan(pairs, targets, defaults, pool, self.origin,
                    _digest(pairs, targets, defaults, pool))

    def listed(self, data: Mapping, key: str) -> list:
        value = data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail((key,), "must be a list")
        return value

    def defaults(self, data: Any) -> Defaults:
        if not isinstance(data, Mapping):
            raise self.fail(("defaults",), "must be a mapping")
        values: dict[str, Any] = {}
        for key, value in data.items():
            path = ("defaults", key)
            spec = _DEFAULT_KEYS.get(str(key))
            if spec is None:
                raise self.fail(path, "unknown option (known: " + ", ".join(
                    sorted(_DEFAULT_KEYS)) + ")")
            name = spec.name
            if name == "select":
                values[name] = tuple(self.texts(value, path))
                self.selection(list(values[name]), path)
            elif spec.type == "bool":
                if not isinstance(value, bool):
                    raise self.fail(path, "must be true or false")
                values[name] = value
            elif spec.type == "int":
                low, high = _RANGES[name]
                if isinstance(value, bool) or not isinstance(value, int) or \
                        not low <= value <= high:
                    raise self.fail(path, f"must be a whole number of seconds in "
                                    f"{low}..{high}")
                values[name] = value
            else:
                if not isinstance(value, str) or not value.strip():
                    raise self.fail(path, "must be a non-empty string")
                if name in _CHOICES and value not in _CHOICES[name]:
                    raise self.fail(path, f"must be one of {', '.join(_CHOICES[name])}")
                values[name] = Path(value).expanduser() if name in _PATHS else value.strip()
        return Defaults(**values)

    def texts(self, value: Any, path: tuple) -> list[str]:
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(x, str) and x.strip() for x in items):
            raise self.fail(path, "must be a selection (all, subscriber=PREFIX, xpath=EXPR) "
                            "or a list of them")
        return items

    def selection(self, texts: list[str], path: tuple) -> Selection:
        try:
            return Selection.parse(texts)
        except SelectionError as exc:
            raise self.fail(path, str(exc).replace("--select ", "")) from None

    def endpoint(self, value: Any, path: tuple, defaults: Defaults) -> Endpoint:
        if not isinstance(value, str):
            raise self.fail(path, "must be an endpoint, netconf://[user@]host[:port]")
        try:
            endpoint = Endpoint.parse(value.strip())
        except EndpointError as exc:
            raise self.fail(path, str(exc)) from None
        if endpoint.user is None and defaults.user:
            endpoint = replace(endpoint, user=defaults.user)
        return endpoint

    def mapping(self, item: Any, path: tuple, allowed: set[str], required: set[str]) -> Mapping:
        if not isinstance(item, Mapping):
            raise self.fail(path, "must be a mapping with " + ", ".join(sorted(required)))
        unknown = set(item) - allowed
        if unknown:
            raise self.fail((*path, sorted(map(str, unknown))[0]),
                            "unknown field (known: " + ", ".join(sorted(allowed)) + ")")
        missing = required - set(item)
        if missing:
            raise self.fail(path, f"{sorted(missing)[0]} is missing")
        return item

    def pair(self, item: Any, path: tuple, defaults: Defaults) -> Pair:
        item = self.mapping(item, path, {"source", "target", "select"}, {"source", "target"})
        select = self.texts(item["select"], (*path, "select")) if "select" in item \
            else list(defaults.select)
        return Pair(str(path[1] + 1), self.endpoint(item["source"], (*path, "source"), defaults),
                    self.endpoint(item["target"], (*path, "target"), defaults),
                    self.selection(select, (*path, "select")))

    def target(self, item: Any, path: tuple, defaults: Defaults) -> Target:
        item = self.mapping(item, path, {"endpoint", "capacity"}, {"endpoint"})
        capacity = item.get("capacity")
        if capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                     or capacity < 0):
            raise self.fail((*path, "capacity"), "must be a number of sessions (0 or more)")
        return Target(self.endpoint(item["endpoint"], (*path, "endpoint"), defaults), capacity)

    def check(self, pairs: list[Pair], targets: list[Target], pool: bool) -> None:
        """What would make the plan's outcome depend on the order its pairs run in."""
        seen_targets: dict[Endpoint, int] = {}
        for i, t in enumerate(targets):
            if t.endpoint in seen_targets:
                raise self.fail(("targets", i, "endpoint"), f"{t.endpoint} is listed twice")
            seen_targets[t.endpoint] = i
            if pool and t.capacity is None:
                raise self.fail(("targets", i), "a pool target needs its capacity")
        where = "pairs" if not pool else "sources"
        sources: dict[Endpoint, list[int]] = {}
        for i, p in enumerate(pairs):
            sources.setdefault(p.source, []).append(i)
        for endpoint, indices in sources.items():
            if len(indices) > 1 and (pool or any(pairs[i].selection.kind == "all"
                                                 for i in indices)):
                raise self.fail((where, indices[1]), f"{endpoint} is a source more than once; "
                                "each of its pairs needs a select of its own")
        ends = {p.target for p in pairs} | set(seen_targets)
        for i, p in enumerate(pairs):
            field_path = (where, i) if pool else (where, i, "source")
            if p.source in ends:
                raise self.fail(field_path, f"{p.source} is both a source and a target; "
                                "evacuate it in a plan of its own")
        if not pool:
            for i, t in enumerate(targets):
                if t.endpoint not in {p.target for p in pairs}:
                    raise self.fail(("targets", i), f"{t.endpoint} is the target of no pair")


def _path_text(path: tuple) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _digest(pairs: list[Pair], targets: list[Target], defaults: Defaults, pool: bool) -> str:
    document = {"pool": pool,
                "pairs": [[str(p.source), str(p.target), str(p.selection)] for p in pairs],
                "targets": [[str(t.endpoint), t.capacity] for t in targets],
                "defaults": {k: str(v) if isinstance(v, Path) else v
                             for k, v in asdict(defaults).items()}}
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# -- the job's state ---------------------------------------------------------------------
@dataclass
class PairState:
    """How far one pair got, as the state file keeps it."""

    id: str
    source: str
    target: str | None
    select: str
    state: str = "pending"
    migration_id: str | None = None
    persist_id: str | None = None  # names its targets' confirmed commit while it runs
    attempts: int = 0
    interrupted: bool = False  # found running on resume: settled before it runs again
    estimate: int | None = None  # sessions on its source when it was assigned a target
    summary: dict[str, Any] | None = None  # of its last migration's report


class JobState:
    """Every pair's state, written to ``path`` (when given) after each change, atomically:
    a reader, or the job resumed after a crash, sees the state before or after a change,
    never half of one."""

    def __init__(self, plan: Plan, path: Path | None = None):
        self.plan = plan
        self.path = path
        self.pairs = {p.id: PairState(p.id, str(p.source), str(p.target) if p.target else
                                      None, str(p.selection)) for p in plan.pairs}
        self._lock = threading.Lock()

    @classmethod
    def resume(cls, plan: Plan, path: Path) -> JobState:
        """The state a previous run of ``plan`` left in ``path``; a pair it left running
        was interrupted."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise PlanError(f"{path}: no state file to resume from") from None
        except (OSError, ValueError) as exc:
            raise PlanError(f"{path}: not a state file of nfmig evacuate: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise PlanError(f"{path}: not a state file of nfmig evacuate (version "
                            f"{STATE_VERSION})")
        if data.get("plan_digest") != plan.digest:
            raise PlanError(f"{path}: this state file belongs to another plan "
                            f"({data.get('plan', '?')}, or this one changed since); give "
                            "its plan, or a new state file")
        job = cls(plan, path)
        names = {f.name for f in fields(PairState)}
        for item in data.get("pairs", []):
            pair = job.pairs.get(str(item.get("id")))
            if pair is None or item.get("state") not in STATES:
                raise PlanError(f"{path}: pair {item.get('id')!r} is not one of the plan's")
            for key, value in item.items():
                if key in names:
                    setattr(pair, key, value)
            if pair.state == "running":
                pair.state, pair.interrupted = "pending", True
        return job

    def update(self, pair_id: str, **changes: Any) -> PairState:
        with self._lock:
            pair = self.pairs[pair_id]
            for key, value in changes.items():
                setattr(pair, key, value)
            self._save()
            return replace(pair)

    def get(self, pair_id: str) -> PairState:
        with self._lock:
            return replace(self.pairs[pair_id])

    def save(self) -> None:
        with self._lock:
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        document = {"version": STATE_VERSION, "plan": self.plan.origin,
                    "plan_digest": self.plan.digest,
                    "pairs": [asdict(p) for p in self.pairs.values()]}
        directory = self.path.parent
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=directory)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(document, out, indent=2)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        try:  # the rename itself survives a crash of the host only once the directory is
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass
