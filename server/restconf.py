"""RESTCONF (RFC 8040, RFC 8527 datastores, RFC 8072 YANG Patch) over HTTPS on aiohttp, in the
server's process and over its datastores.

The web server runs in its own thread with its own event loop; datastore work, which blocks
(locks, the backend, libyang), runs in the loop's executor so one large request does not stall
the others. Authentication is HTTP Basic against the users file SSH uses, throttled and
counted together with SSH's logins (login_guard.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import json
import logging
import re
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from urllib.parse import unquote

from aiohttp import web
from lxml import etree

from . import errors, nacm
from .auth import User
from .errors import RpcError, RpcErrors
from .gc_pause import collector_paused
from .login_guard import BasicAuth, Logins, Outcome
from .login_policy import LoginPolicy
from .operations import Operations
from .request_limits import read_body
from .restconf_codec import (
    JSON,
    RESTCONF_NS,
    XML,
    Step,
    Target,
    errors_json,
    errors_xml,
    media_type,
    parse_api_path,
    remember_namespaces,
    status_of,
)
from .restconf_handlers import Resources, check_datastore, etag, uri_of
from .restconf_patch import apply_yang_patch
from .restconf_query import Query, check_insert, not_found
from .restconf_streams import BASE_MARK, EventStreams

log = logging.getLogger(__name__)

REALM = 'Basic realm="restconf", charset="UTF-8"'
# Representations from this size on are gzipped for clients that accept it (below it the
# saving is a packet or less).
GZIP_FROM = 1400


def error_response(errs: list[RpcError], accept: str | None, status: int | None = None,
                   headers: dict | None = None) -> web.Response:
    media = media_type(accept) or JSON
    text = errors_xml(errs) if media == XML else errors_json(errs)
    return web.Response(status=status or status_of(errs[0]), text=text, content_type=media,
                        charset=None, headers=headers)


@web.middleware
async def _errors_middleware(request: web.Request,
                             handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                             ) -> web.StreamResponse:
    accept = request.headers.get("Accept")
    try:
        return await handler(request)
    except RpcError as exc:
        return error_response([exc], accept)
    except RpcErrors as exc:
        return error_response(exc.errors, accept)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        tag = {404: "invalid-value", 405: "operation-not-supported", 413: "too-big",
               415: "invalid-value", 406: "invalid-value"}.get(exc.status, "invalid-value")
        error = RpcError(tag, exc.reason or "request refused", type="protocol")
        return error_response([error], accept, exc.status,
                              {k: v for k, v in exc.headers.items() if k == "Allow"})
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("RESTCONF: %s %s failed unexpectedly", request.method, request.path)
        error = RpcError("operation-failed", "internal error; the server log has details")
        return error_response([error], accept, 500)


def _auth_middleware(auth: BasicAuth):
    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        if request.path == "/.well-known/host-meta":
            return await handler(request)
        outcome = await auth.check(request.headers.get("Authorization"),
                                   request.remote or "unknown")
        if not outcome.ok:
            return _refusal(outcome, request.headers.get("Accept"))
        request["user"] = outcome.user
        return await handler(request)
    return middleware


def _nacm_middleware(operations: Operations):
    """The request's user, as access control knows them, for the rest of the request (the
    executor threads get it with the request's context: see _blocking)."""
    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        if operations.nacm is None or "user" not in request:
            return await handler(request)
        with nacm.acting(operations.nacm.access_of(request["user"], request.remote or "")):
            return await handler(request)
    return middleware


def _refusal(outcome: Outcome, accept: str | None) -> web.Response:
    """401 for wrong credentials; 429 while the address or user is locked out after
    failed logins, 503 while every password worker is busy (each with Retry-After)."""
    retry = {"Retry-After": str(max(1, round(outcome.retry_after)))}
    if outcome.reason == "locked":
        return error_response([RpcError("access-denied", "too many failed logins from this "
                                         "address or for this user; try again later",
                                         type="protocol")], accept, 429, retry)
    if outcome.reason == "busy":
        return error_response([RpcError("resource-denied", "too many logins being checked; "
                                         "try again shortly", type="protocol")], accept, 503,
                              retry)
    return error_response([RpcError("access-denied", "authentication required: HTTP Basic "
                                    "with a user of the server's users file",
                                    type="protocol")], accept, 401, {"WWW-Authenticate": REALM})


class RestconfListener:
    """The RESTCONF web server of one nfmig server, running in its own thread."""

    def __init__(self, operations: Operations, users: dict[str, User], listen: str, port: int,
                 tls: ssl.SSLContext | None, max_message_size: int,
                 logins: Logins | None = None):
        if tls is None and not _is_loopback(listen):
            raise ValueError("plain HTTP RESTCONF is allowed only on a loopback address")
        self.resources = Resources(operations)
        remember_namespaces(self.resources.index)
        self.routes = Routes(self.resources, operations)
        self.routes.body_limit = max_message_size
        self.tls = tls
        self.listen = listen
        self.port = port
        self._max = max_message_size
        self._auth = BasicAuth(logins or Logins(users, LoginPolicy()))
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, name="restconf", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=self._max,
                              middlewares=[_errors_middleware, _auth_middleware(self._auth),
                                           _nacm_middleware(self.routes.ops)])
        self.routes.add_to(app)
        app.on_response_prepare.append(_advertise_codings)
        return app

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start())
        except BaseException as exc:  # reported to the starting thread
            self._failure = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        self._runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.listen, self.port, ssl_context=self.tls,
                           reuse_address=True)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        log.info("RESTCONF over %s on %s port %d", "HTTPS" if self.tls else "plain HTTP",
                 self.listen, self.port)

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def stop() -> None:
            self.routes.streams.close()
            if self._runner is not None:
                await self._runner.cleanup()

        try:
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        except Exception:  # stopping must go on whatever a client left behind
            log.debug("RESTCONF: cleanup failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def http_date(when: float | None = None) -> str:
    return formatdate(time.time() if when is None else when, usegmt=True)



# -- routes --------------------------------------------------------------------------------
HOST_META = ("<XRD xmlns='http://docs.oasis-open.org/ns/xri/xrd-1.0'>"
             "<Link rel='restconf' href='/restconf'/></XRD>")
YANG_LIBRARY_VERSION = "2019-01-04"
YANG_PATCH = {"application/yang-patch+json": JSON, "application/yang-patch+xml": XML}
PLAIN = {JSON: JSON, XML: XML, "application/json": JSON, "application/xml": XML}
READ_PARAMS = ("content", "depth", "fields", "with-defaults")
DATA_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
_ETAG_MEMORY = 4096


class Routes:
    """One handler per resource; each method of a data resource in its own function."""

    def __init__(self, resources: Resources, operations: Operations):
        self.r = resources
        self.ops = operations
        self.body_limit = 256 << 20  # the listener's --max-message-size
        self._first_seen: dict[str, float] = {}  # entity tag -> when first served
        self.streams = EventStreams(operations.hub, resources.index, resources.json)
        resources.state_extra.append(self.streams.state_node())
        # The yang-library names the modules' files; RESTCONF clients get them by URL
        # instead (RFC 8040 §3.7), from /restconf/modules.
        self._schema_files = f"file://{resources.schema.yang_dir}/"
        self._schema_urls = re.compile(re.escape(self._schema_files)
                                       + r"([\w.-]+?)@([0-9-]+)\.yang")

    def add_to(self, app: web.Application) -> None:
        router = app.router
        router.add_get("/.well-known/host-meta", self.host_meta)
        router.add_get("/restconf", self.root)
        router.add_get("/restconf/", self.root)
        router.add_get("/restconf/yang-library-version", self.yang_library_version)
        router.add_get("/restconf/operations", self.operations)
        router.add_route("*", "/restconf/operations/{name}", self.operation)
        router.add_get("/restconf/modules/{name}", self.module)
        router.add_get("/restconf/modules/{name}/{revision}", self.module)
        router.add_get("/restconf/streams/{stream}/{encoding}", self.streams.stream)
        router.add_route("*", r"/restconf/data{rest:(/.*)?}", self.data)
        router.add_route("*", r"/restconf/ds/{ds:[^/]+}{rest:(/.*)?}", self.datastore)

    # -- small resources ---------------------------------------------------------------
    async def host_meta(self, request: web.Request) -> web.Response:
        return web.Response(text=HOST_META, content_type="application/xrd+xml")

    async def root(self, request: web.Request) -> web.Response:
        media = _accept(request)
        if media == XML:
            return _reply(f'<restconf xmlns="{RESTCONF_NS}"><data/><operations/>'
                          f"<yang-library-version>{YANG_LIBRARY_VERSION}</yang-library-version>"
                          "</restconf>", XML)
        return _reply(json.dumps({"ietf-restconf:restconf": {
            "data": {}, "operations": {}, "yang-library-version": YANG_LIBRARY_VERSION}}),
            JSON)

    async def yang_library_version(self, request: web.Request) -> web.Response:
        if _accept(request) == XML:
            return _reply(f'<yang-library-version xmlns="{RESTCONF_NS}">{YANG_LIBRARY_VERSION}'
                          "</yang-library-version>", XML)
        return _reply(json.dumps({"ietf-restconf:yang-library-version": YANG_LIBRARY_VERSION}),
                      JSON)

    async def operations(self, request: web.Request) -> web.Response:
        if _accept(request) == XML:
            return _reply(self.r.operations_xml(), XML)
        return _reply(self.r.operations_json(), JSON)

    async def module(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        revision = request.match_info.get("revision")
        text = await _blocking(self.r.schema.schema_text, name, revision)
        if text is None:
            raise not_found(f"no module {name}{'@' + revision if revision else ''} here")
        return web.Response(text=text, content_type="application/yang")

    async def operation(self, request: web.Request) -> web.StreamResponse:
        if request.method == "OPTIONS":
            return web.Response(headers={"Allow": "POST, OPTIONS"})
        if request.method != "POST":
            raise web.HTTPMethodNotAllowed(request.method, ["POST", "OPTIONS"])
        name = request.match_info["name"]
        media = _content_type(request, PLAIN) if request.can_read_body else JSON
        body = await self._body(request)
        session = self.r.session_info(request["user"], request.remote or "")
        reply = await _blocking(self.r.invoke, name, body, media, session)
        if reply.strip() in ("", "<ok/>"):
            return web.Response(status=204)
        # the operation's output, wrapped in "output" as RFC 8040 §3.6.2 has it
        namespace = self.r.index.ns_of[name.partition(":")[0]]
        if _accept(request) == XML:
            return _reply(f'<output xmlns="{namespace}">{reply}</output>', XML)
        return _reply(await _blocking(self.r.schema.output_json, name, namespace, reply), JSON)

    # -- data resources ----------------------------------------------------------------
    async def data(self, request: web.Request) -> web.StreamResponse:
        return await self._resource(request, None, _rest(request, "/restconf/data"))

    async def datastore(self, request: web.Request) -> web.StreamResponse:
        name = unquote(request.match_info["ds"])
        module, _, store = name.partition(":")
        if module != "ietf-datastores":
            raise not_found(f"{name!r} is not a datastore (ietf-datastores:NAME)")
        check_datastore(store)
        raw = request.rel_url.raw_path
        rest = raw[raw.index("/ds/") + 4:]
        return await self._resource(request, store, rest[rest.find("/"):] if "/" in rest
                                    else "")

    async def _resource(self, request: web.Request, store: str | None,
                        path: str) -> web.StreamResponse:
        method = request.method
        if method == "OPTIONS":
            allow = await _blocking(self.r.allowed_methods, store, path)
            headers = {"Allow": allow}
            if "PATCH" in allow:
                headers["Accept-Patch"] = ", ".join([JSON, XML, *YANG_PATCH])
            return web.Response(headers=headers)
        if method in ("GET", "HEAD"):
            return await self.get(request, store or "operational", path)
        writable = store or "running"
        if store == "operational":
            raise errors.not_supported("the operational datastore is read-only",
                                       type="application")
        handler = {"PUT": self.put, "POST": self.post, "PATCH": self.patch,
                   "DELETE": self.delete}.get(method)
        if handler is None:
            raise web.HTTPMethodNotAllowed(method, DATA_METHODS.split(", "))
        target = parse_api_path(self.r.index, path)
        await self._preconditions(request, writable, target)
        return await handler(request, writable, target)

    async def get(self, request: web.Request, store: str, path: str) -> web.StreamResponse:
        media = _accept(request)
        query = Query.parse(request.rel_url.query, READ_PARAMS)
        body = await _blocking(self.r.read, store, path, query, media)
        if self._schema_files in (body.text or ""):
            body.text = self._schema_urls.sub(
                f"{request.scheme}://{request.host}/restconf/modules/\\1/\\2", body.text)
        if BASE_MARK in (body.text or ""):
            body.text = body.text.replace(BASE_MARK, f"{request.scheme}://{request.host}")
        tag = etag(body.text or "")
        if tag in _tags(request.headers.get("If-None-Match")):
            return web.Response(status=304, headers={"ETag": tag})
        matches = request.headers.get("If-Match")
        if matches is not None and tag not in _tags(matches) and matches.strip() != "*":
            raise _precondition("the resource's entity tag is not one If-Match names")
        return _reply(body.text or "", media, {"ETag": tag,
                                               "Last-Modified": self._last_modified(tag)})

    async def put(self, request: web.Request, store: str, target: Target) -> web.Response:
        media = _content_type(request, PLAIN)
        body = await self._body(request)
        check_insert(request.rel_url.query, target.node)
        if not target.steps:
            inner = await _blocking(self.r.body_elements, body, media, None,
                                    "ietf-restconf:data")
            await _blocking(self.r.replace_datastore, store, inner)
            return web.Response(status=204)
        if store == "startup":
            raise errors.not_supported("startup is replaced whole: PUT the datastore",
                                       type="application")
        parent = target.steps[-2].node if len(target.steps) > 1 else None
        inner = await _blocking(self.r.body_elements, body, media, parent)
        self.r.check_same_node(target, inner)
        existed = await _blocking(self.r.exists, store, target)
        await _blocking(self.r.edit, store, target, inner, "replace")
        return web.Response(status=204 if existed else 201)

    async def post(self, request: web.Request, store: str, target: Target) -> web.Response:
        media = _content_type(request, PLAIN)
        body = await self._body(request)
        if store == "startup":
            raise errors.not_supported("startup is replaced whole: PUT the datastore",
                                       type="application")
        node = target.node
        if node is not None and node.kind not in ("container", "list"):
            raise errors.invalid_value(f"{node.name} has no children to create",
                                       info={"bad-element": node.name})
        if node is not None and node.kind == "list" and not target.steps[-1].keys:
            raise errors.invalid_value("name the list entry to create a child in, or POST "
                                       "the entry to the list's parent",
                                       info={"bad-element": node.name})
        if target.steps and not await _blocking(self.r.exists, store, target):
            raise not_found(f"{target.instance_path()} does not exist",
                            target.instance_path())
        inner = await _blocking(self.r.body_elements, body, media, node)
        if len(inner) != 1:
            raise errors.invalid_value("POST creates exactly one child resource",
                                       info={"bad-element": "body"})
        child = self._child_target(target, inner[0])
        check_insert(request.rel_url.query, child.node)
        await _blocking(self.r.edit, store, child, inner, "create")
        return web.Response(status=201, headers={"Location": self._location(request, child)})

    async def patch(self, request: web.Request, store: str, target: Target) -> web.Response:
        kind = (request.content_type or "").lower()
        body = await self._body(request)
        if kind in YANG_PATCH:
            reply = _accept(request, YANG_PATCH[kind])  # yang-patch-status as asked
            status, text = await _blocking(apply_yang_patch, self.r, store, target, body,
                                           YANG_PATCH[kind], reply)
            return _reply(text, reply, status=status)
        media = _content_type(request, PLAIN)
        if not await _blocking(self.r.exists, store, target):
            raise not_found(f"{target.instance_path()} does not exist; PATCH does not "
                            "create it (use PUT or POST)", target.instance_path())
        if not target.steps:
            inner = await _blocking(self.r.body_elements, body, media, None,
                                    "ietf-restconf:data")
            # No operation set on the nodes: merge, and any nc:operation they carry holds.
            await _blocking(self.r.edit, store, target, inner, None, 0)
            return web.Response(status=204)
        parent = target.steps[-2].node if len(target.steps) > 1 else None
        inner = await _blocking(self.r.body_elements, body, media, parent)
        self.r.check_same_node(target, inner)
        await _blocking(self.r.edit, store, target, inner, "merge")
        return web.Response(status=204)

    async def delete(self, request: web.Request, store: str, target: Target) -> web.Response:
        if not target.steps:
            raise errors.not_supported("a datastore cannot be deleted; delete its nodes",
                                       type="application")
        if not await _blocking(self.r.exists, store, target):
            raise not_found(f"{target.instance_path()} does not exist",
                            target.instance_path())
        node, keys = target.node, target.steps[-1].keys
        element = etree.Element(f"{{{node.ns}}}{node.name}")
        if node.kind == "list":
            for name, value in zip(node.keys, keys or (), strict=False):
                etree.SubElement(element, f"{{{node.ns}}}{name}").text = value
        elif node.kind == "leaf-list" and keys:
            element.text = keys[0]
        await _blocking(self.r.edit, store, target, [element], "delete")
        return web.Response(status=204)

    def _child_target(self, target: Target, element: etree._Element) -> Target:
        qname = etree.QName(element)
        if target.node is None:
            module = self.r.index.module_of.get(qname.namespace or "")
            if module is None:
                raise errors.unknown_namespace(
                    f"{qname.localname}: no module of this server has the namespace "
                    f"{qname.namespace or '(none)'}", qname.localname, qname.namespace or "")
            node = self.r.index.top.get(f"{module}:{qname.localname}")
        else:
            node = self.r.index.children(target.node).get(qname.localname)
        if node is None:
            raise errors.unknown_element(f"{qname.localname} is not a data node here",
                                         qname.localname, target.instance_path() or "/")
        keys = None
        if node.kind == "list":
            keys = tuple((element.findtext(f"{{{node.ns}}}{k}")  # a nested entry's keys
                          or element.findtext(k) or "").strip() for k in node.keys)
        elif node.kind == "leaf-list":
            keys = ((element.text or "").strip(),)
        return Target([*target.steps, Step(node, keys)])

    async def _body(self, request: web.Request) -> bytes:
        """The request's body, its limits held while it arrives (request_limits); one of
        a type no resource takes is refused before it is read."""
        media = _content_type(request, {**PLAIN, **YANG_PATCH}) if request.can_read_body \
            else None
        return await read_body(request, self.body_limit, media == JSON, media == XML)

    @staticmethod
    def _location(request: web.Request, target: Target) -> str:
        raw = request.rel_url.raw_path
        base = raw[:raw.index("/restconf/") + len("/restconf/")]
        rest = raw[len(base):]
        head = rest.split("/")[0] if rest.startswith("data") else "/".join(rest.split("/")[:2])
        return f"{request.scheme}://{request.host}{base}{head}/{uri_of(target)}"

    async def _preconditions(self, request: web.Request, store: str, target: Target) -> None:
        """If-Match and If-None-Match on a write (RFC 7232 §3.1, §3.2)."""
        match = request.headers.get("If-Match")
        none_match = request.headers.get("If-None-Match")
        if match is None and none_match is None:
            return
        tags = await _blocking(self.r.etags, store, target)
        if match is not None:
            if (match.strip() == "*" and not tags) or (match.strip() != "*" and
                                                       not tags & _tags(match)):
                raise _precondition("the resource changed since the entity tag If-Match "
                                    "names (or does not exist)")
        if none_match is not None:
            if (none_match.strip() == "*" and tags) or tags & _tags(none_match):
                raise _precondition("the resource exists (If-None-Match)")

    def _last_modified(self, tag: str) -> str:
        seen = self._first_seen.get(tag)
        if seen is None:
            if len(self._first_seen) >= _ETAG_MEMORY:
                self._first_seen.clear()
            seen = self._first_seen[tag] = time.time()
        return http_date(seen)


async def _blocking(fn, *args):
    # in the request's context: who is asking (nacm) goes along
    return await asyncio.get_running_loop().run_in_executor(
        None, contextvars.copy_context().run, _paused, fn, *args)


def _paused(fn, *args):
    # As a NETCONF request runs: no cyclic collection meanwhile, the heap tidied after a
    # long one (gc_pause), so a large body's memory goes back once it is handled.
    with collector_paused():
        return fn(*args)


def _rest(request: web.Request, prefix: str) -> str:
    raw = request.rel_url.raw_path
    return raw[raw.index(prefix) + len(prefix):]


def _accept(request: web.Request, default: str = JSON) -> str:
    media = media_type(request.headers.get("Accept"), default)
    if media is None:
        raise web.HTTPNotAcceptable(reason=f"this server answers in {JSON} or {XML}")
    return media


def _content_type(request: web.Request, allowed: dict[str, str]) -> str:
    coding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("identity", "gzip", "deflate"):  # what the HTTP layer inflates
        raise web.HTTPUnsupportedMediaType(reason=f"Content-Encoding {coding} is not one of "
                                           "gzip, deflate, identity")
    kind = (request.content_type or "").lower()
    if kind not in allowed:
        raise web.HTTPUnsupportedMediaType(reason=f"Content-Type {kind or 'none'} is not "
                                           f"one of {', '.join(allowed)}")
    return allowed[kind]


def _reply(text: str, media: str, headers: dict | None = None, status: int = 200
           ) -> web.Response:
    """A representation, gzipped when the client accepts gzip and it is large enough for
    that to save a packet (off the event loop when large)."""
    body = text.encode()
    response = web.Response(body=body, status=status, content_type=media, headers=headers)
    if len(body) >= GZIP_FROM:
        response.enable_compression()
    return response


async def _advertise_codings(request: web.Request, response: web.StreamResponse) -> None:
    """Every response says which content codings request bodies may have (RFC 7694): a
    client may then gzip a large edit."""
    response.headers.setdefault("Accept-Encoding", "gzip, deflate")


def _tags(header: str | None) -> set[str]:
    if not header:
        return set()
    return {t.strip().removeprefix("W/") for t in header.split(",") if t.strip()}


def _precondition(message: str) -> RpcError:
    error = RpcError("operation-failed", message, type="protocol")
    error.status = 412
    return error
