"""Requests built to hurt the server, against a real `nfmig serve` (NETCONF with a 1 MiB
--max-message-size, and RESTCONF): each gets its error within a second, the server's memory
does not grow with what the attacker sends (the limits hold while the bytes arrive), and
other clients are served meanwhile.

Memory is the server's VmRSS from /proc: a refused payload may raise it by at most
RSS_TOLERANCE_MB while it arrives, and it must be back within that of where it was once
the payload is through (read buffers are given back, big blocks are unmapped on free).
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from lxml import etree
from nfmig.server.framing import frame_chunks

from .conftest import NAT_NS, NC_NS, RunningServer
from .rawclient import RawClient
from .restconf_client import JSON, XML, Restconf, start_with_restconf

ERROR_WITHIN = 1.0  # seconds from the offending bytes to the error reply
RSS_TOLERANCE_MB = 24
LIMIT = 1 << 20  # the server's --max-message-size
GET_CONFIG = "<get-config><source><running/></source></get-config>"
SESSION_PATH = "/restconf/data/nfmig-nat:nat-session"


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[RunningServer, Restconf]]:
    started, port = start_with_restconf(tmp_path_factory.mktemp("hostile"),
                                        "--max-message-size", "1m")
    server = RunningServer(**vars(started))
    yield server, Restconf(server, port)
    server.stop()


@pytest.fixture
def server(served) -> RunningServer:
    return served[0]


@pytest.fixture
def rc(served) -> Restconf:
    return served[1]


def rss_mb(server: RunningServer) -> float:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def settled_rss(server: RunningServer, target: float, timeout: float = 5.0) -> float:
    """The server's RSS once it is back within the tolerance of ``target`` (the heap is
    tidied when a request ends, not at once), or where it is after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (now := rss_mb(server)) > target + RSS_TOLERANCE_MB and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    return now


@contextmanager
def watched(server: RunningServer) -> Iterator[dict]:
    """Meanwhile: the peak RSS, a bystander client whose requests must each be answered
    promptly, and a new client that must get in. Yields a dict the checks read after."""
    seen = {"peak": rss_mb(server), "answered": 0, "slowest": 0.0, "errors": [],
            "login": None}
    stop = threading.Event()
    bystander = RawClient(server.port, server.user, server.password, base11=True)

    def sample() -> None:
        while not stop.is_set():
            seen["peak"] = max(seen["peak"], rss_mb(server))
            time.sleep(0.01)

    def serve_bystander() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                reply = bystander.rpc(GET_CONFIG)
            except Exception as exc:  # noqa: BLE001 - reported by the checks below
                seen["errors"].append(repr(exc))
                return
            seen["slowest"] = max(seen["slowest"], time.monotonic() - started)
            if b"<data" in reply:
                seen["answered"] += 1
            time.sleep(0.02)

    def newcomer() -> None:
        started = time.monotonic()
        try:
            client = RawClient(server.port, server.user, server.password, base11=True)
            try:
                if b"<data" in client.rpc(GET_CONFIG):
                    seen["login"] = time.monotonic() - started
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - reported by the checks below
            seen["errors"].append(repr(exc))

    threads = [threading.Thread(target=sample, daemon=True),
               threading.Thread(target=serve_bystander, daemon=True),
               threading.Thread(target=newcomer, daemon=True)]
    for thread in threads:
        thread.start()
    try:
        yield seen
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        bystander.close()
    assert not seen["errors"], seen["errors"]
    assert seen["answered"] >= 1, "the bystander got no answer during the attack"
    assert seen["slowest"] < 3.0, f"a bystander request took {seen['slowest']:.2f} s"
    assert seen["login"] is not None and seen["login"] < 5.0, seen["login"]


def rpc_text(inner: str = GET_CONFIG, attrs: str = 'message-id="1"') -> bytes:
    return f'<rpc xmlns="{NC_NS}" {attrs}>{inner}</rpc>'.encode()


def framed(body: bytes) -> bytes:
    """``body`` as one base-1.1 message in 32 KiB chunks, as a streaming client sends."""
    return frame_chunks(body) + b"\n##\n"


def timed_reply(client: RawClient, data: bytes) -> tuple[bytes, float]:
    """Send ``data`` from another thread (the server answers before it is all sent) and
    return the next reply and the seconds it took from the first byte."""
    failure: list[BaseException] = []

    def send() -> None:
        view = memoryview(data)  # slices of a bytes object would be copies
        try:
            for start in range(0, len(data), 1 << 20):
                client.chan.sendall(view[start:start + (1 << 20)])
        except Exception as exc:  # noqa: BLE001 - re-raised below
            failure.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    started = time.monotonic()
    sender.start()
    reply = client._read_chunked() if client.base11 else client._read_eom()
    elapsed = time.monotonic() - started
    sender.join(timeout=60)
    assert not failure, failure
    return reply, elapsed


def error_of(reply: bytes) -> tuple[str, str]:
    root = etree.fromstring(reply)
    nc = {"nc": NC_NS}
    return (root.findtext("nc:rpc-error/nc:error-tag", namespaces=nc),
            root.findtext("nc:rpc-error/nc:error-message", namespaces=nc))


def check_figures(name: str, elapsed: float, before: float, peak: float, after: float,
                  limit: float = ERROR_WITHIN) -> None:
    """The time to the error and the RSS around a payload, printed (pytest -s shows
    them) and checked against the limits."""
    text = (f"{name}: error after {elapsed * 1000:.0f} ms; RSS {before:.0f} -> peak "
            f"{peak:.0f} -> {after:.0f} MB")
    print(text)
    assert elapsed < limit, text
    assert peak - before < RSS_TOLERANCE_MB, text
    assert after - before < RSS_TOLERANCE_MB, text


def still_serves(client: RawClient) -> None:
    assert b"<data" in client.rpc(GET_CONFIG, "after"), "the session did not go on"


# -- NETCONF: many attributes on <rpc> -----------------------------------------------------
@pytest.mark.parametrize("count", [40_000, 60_000, 100_000])
def test_reproducer_rpc_with_tens_of_thousands_of_attributes_is_refused_within_1s(
        server, count):
    attrs = " ".join(f'a{i}="x"' for i in range(count))  # 60,000: 633 KB as reported
    body = rpc_text(attrs=f'message-id="many" {attrs}')
    client = RawClient(server.port, server.user, server.password, base11=True)
    try:
        before = rss_mb(server)
        with watched(server) as seen:
            reply, elapsed = timed_reply(client, framed(body))
        tag, message = error_of(reply)
        assert tag == "too-big" and "start tag" in message, message
        still_serves(client)
    finally:
        client.close()
    check_figures(f"<rpc> with {count} attributes ({len(body) >> 10} KiB)", elapsed, before,
                  seen["peak"], settled_rss(server, before))


def test_rpc_with_more_attributes_than_the_limit_is_too_big_and_echoes_only_its_id(server):
    attrs = " ".join(f'a{i}="x"' for i in range(1000))  # a start tag of 12 KB
    client = RawClient(server.port, server.user, server.password, base11=True)
    try:
        started = time.monotonic()
        reply = client.send_raw(rpc_text(attrs=f'message-id="m1000" {attrs}'))
        assert time.monotonic() - started < ERROR_WITHIN
        tag, message = error_of(reply)
        assert tag == "too-big" and "attributes" in message
        assert etree.fromstring(reply).attrib == {"message-id": "m1000"}
        still_serves(client)
    finally:
        client.close()


def entry_with_attributes(count: int, where: str = "entry") -> str:
    attrs = " ".join(f'a{i}="x"' for i in range(count))
    entry_attrs, leaf_attrs = (attrs, "") if where == "entry" else ("", attrs)
    return (f'<nat-session xmlns="{NAT_NS}" {entry_attrs}><protocol {leaf_attrs}>UDP'
            "</protocol><src_address>10.66.0.9</src_address><src_port>7200</src_port>"
            "<dst_address>192.0.2.66</dst_address><dst_port>53</dst_port></nat-session>")


@pytest.mark.parametrize("where", ["entry", "leaf"])
def test_an_edit_with_an_element_of_60000_attributes_is_refused_in_linear_time(server,
                                                                               where):
    # lxml reads attributes one walk each: handling them all was quadratic (17 s)
    client = RawClient(server.port, server.user, server.password, base11=True)
    try:
        started = time.monotonic()
        reply = client.send_raw(rpc_text(
            f"<edit-config><target><running/></target><config>"
            f"{entry_with_attributes(60_000, where)}</config></edit-config>"))
        elapsed = time.monotonic() - started
        tag, message = error_of(reply)
        assert tag == "too-big" and "more than 64 attributes" in message
        assert elapsed < ERROR_WITHIN, f"{elapsed:.2f} s"
        still_serves(client)
    finally:
        client.close()


def test_namespaced_rpc_attributes_are_echoed_with_each_prefix_declared_once(server):
    client = RawClient(server.port, server.user, server.password, base11=True)
    try:
        reply = client.send_raw(rpc_text(attrs=(
            'xmlns:x="urn:example:x" xmlns:y="urn:example:x" xmlns:z="urn:example:z" '
            'message-id="ns" x:a="1" y:b="2" z:c="3" xml:lang="en"')))
    finally:
        client.close()
    root = etree.fromstring(reply)  # well-formed: one declaration per prefix
    assert dict(root.attrib) == {"message-id": "ns", "{urn:example:x}a": "1",
                                 "{urn:example:x}b": "2", "{urn:example:z}c": "3",
                                 "{http://www.w3.org/XML/1998/namespace}lang": "en"}
    start_tag = reply[:reply.index(b">", reply.index(b"<rpc-reply"))]
    assert start_tag.count(b'"urn:example:x"') == 1
    assert b"xmlns:xml" not in start_tag
    assert root.find(f"{{{NC_NS}}}data") is not None


# -- NETCONF: sizes announced and sent -----------------------------------------------------
def test_reproducer_chunk_header_of_4294967295_is_refused_at_the_header(server):
    client = RawClient(server.port, server.user, server.password, base11=True)
    start = rpc_text(inner="<get-config><source><running/></source><filter>",
                     attrs='message-id="huge-chunk"')[:-len("</rpc>")]
    try:
        before = rss_mb(server)
        with watched(server) as seen:
            client.chan.sendall(b"\n#4294967295\n" + start)
            # 96 MB of the chunk follow; the error must not wait for them
            reply, elapsed = timed_reply(client, b" " * (96 << 20))
        tag, message = error_of(reply)
        assert tag == "too-big" and "4294967295" in message
        assert etree.fromstring(reply).get("message-id") == "huge-chunk"
    finally:
        client.close()
    check_figures("chunk header #4294967295, then 96 MB", elapsed, before, seen["peak"],
                  settled_rss(server, before))


def test_reproducer_10mb_message_id_is_refused_before_it_is_held(server):
    body = rpc_text(attrs='message-id="' + "m" * (10 << 20) + '"')
    client = RawClient(server.port, server.user, server.password, base11=True)
    try:
        before = rss_mb(server)
        with watched(server) as seen:
            reply, elapsed = timed_reply(client, framed(body))
        tag, message = error_of(reply)
        assert tag == "too-big" and "first 65536 bytes" in message
        assert len(reply) < 1024, "the message-id came back"
        still_serves(client)  # the rest of that message was read and dropped
    finally:
        client.close()
    check_figures("10 MB message-id", elapsed, before, seen["peak"],
                  settled_rss(server, before))


def test_message_id_longer_than_the_limit_is_too_big_and_not_echoed(server):
    client = RawClient(server.port, server.user, server.password, base11=True)
    try:
        reply = client.send_raw(rpc_text(attrs='message-id="' + "m" * 5000 + '"'))
        tag, message = error_of(reply)
        assert tag == "too-big" and "message-id is 5000 characters" in message
        assert etree.fromstring(reply).get("message-id") is None
        still_serves(client)
    finally:
        client.close()


def test_message_over_the_limit_on_base10_is_too_big_and_the_session_goes_on(server):
    client = RawClient(server.port, server.user, server.password, base11=False)
    try:
        body = rpc_text(inner=f"<get-config><source><running/></source><filter>"
                              f"{'<x/>' * (LIMIT // 4)}</filter></get-config>",
                        attrs='message-id="eom"')
        reply, elapsed = timed_reply(client, body + b"]]>]]>")
        tag, _ = error_of(reply)
        assert tag == "too-big" and etree.fromstring(reply).get("message-id") == "eom"
        assert elapsed < ERROR_WITHIN + 1.0  # the client sends 1.3 MB first
        still_serves(client)
    finally:
        client.close()


# -- NETCONF: what only a parser sees -------------------------------------------------------
def nested_filter(depth: int) -> str:
    return ("<get-config><source><running/></source><filter type='subtree'>"
            + "<a>" * depth + "</a>" * depth + "</filter></get-config>")


@pytest.mark.parametrize(("depth", "tag"), [(100, "too-big"), (3000, "malformed-message")])
def test_xml_nested_deeper_than_the_limit_is_refused(server, depth, tag):
    client = RawClient(server.port, server.user, server.password, base11=True)
    try:
        started = time.monotonic()
        reply = client.send_raw(rpc_text(inner=nested_filter(depth), attrs='message-id="d"'))
        assert time.monotonic() - started < ERROR_WITHIN
        assert error_of(reply)[0] == tag
        still_serves(client)
    finally:
        client.close()


def test_document_type_declaration_in_an_rpc_is_malformed(server):
    client = RawClient(server.port, server.user, server.password, base11=True)
    try:
        reply = client.send_raw(b'<!DOCTYPE rpc [<!ENTITY p "running">]>'
                                + rpc_text(inner="<get-config><source><running/></source>"
                                                 "</get-config>"))
        tag, message = error_of(reply)
        assert tag == "malformed-message" and "document type" in message
        still_serves(client)
    finally:
        client.close()


def test_a_message_in_one_byte_chunks_is_read_in_linear_time(server):
    body = rpc_text(attrs='message-id="tiny"') + b" " * 100_000
    data = b"".join(b"\n#1\n" + body[i:i + 1] for i in range(len(body))) + b"\n##\n"
    client = RawClient(server.port, server.user, server.password, base11=True)
    try:
        reply, elapsed = timed_reply(client, data)
        assert b"<data" in reply
        assert elapsed < 5.0, f"{elapsed:.2f} s for {len(body)} one-byte chunks"
    finally:
        client.close()


# -- RESTCONF: every bad body is a 4xx ------------------------------------------------------
def entry(sport: int, **extra) -> dict:
    return {"protocol": "TCP", "src_address": "10.66.0.1", "src_port": sport,
            "dst_address": "192.0.2.66", "dst_port": 443, **extra}


def session_uri(protocol: str, sport: int) -> str:
    return f"{SESSION_PATH}={protocol},10.66.0.1,{sport},192.0.2.66,443"


def assert_4xx(reply, status: int, tag: str) -> None:
    assert reply.status == status, (reply.status, reply.text)
    assert reply.error_tag == tag, reply.text


def post(rc: Restconf, body: str | bytes, content_type: str = JSON):
    started = time.monotonic()
    reply = rc.request("POST", "/restconf/data", body, content_type=content_type)
    elapsed = time.monotonic() - started
    print(f"POST of {len(body)} bytes: {reply.status} after {elapsed * 1000:.0f} ms")
    assert elapsed < ERROR_WITHIN + 1.0  # a new connection's TLS handshake included
    return reply


def test_reproducer_internal_dtd_entity_in_an_xml_body_is_400(rc):
    body = (f'<!DOCTYPE nat-session [<!ENTITY p "7010">]><nat-session xmlns="{NAT_NS}">'
            "<protocol>TCP</protocol><src_address>10.66.0.1</src_address>"
            "<src_port>&p;</src_port><dst_address>192.0.2.66</dst_address>"
            "<dst_port>443</dst_port></nat-session>")
    assert_4xx(post(rc, body, XML), 400, "malformed-message")
    assert rc.get(session_uri("TCP", 7010)).status == 404


def test_reproducer_json_nested_1000_deep_is_4xx(rc):
    body = '{"nfmig-nat:nat-policy":' + "[" * 1000 + "]" * 1000 + "}"
    assert_4xx(post(rc, body), 413, "too-big")


def test_reproducer_lone_surrogate_in_json_is_400(rc):
    body = json.dumps({"nfmig-nat:nat-session": [entry(7011, tcp_state="\ud800")]})
    assert "\\ud800" in body
    assert_4xx(post(rc, body), 400, "malformed-message")


def test_reproducer_duplicate_json_members_are_refused_and_nothing_is_stored(rc):
    body = ('{"nfmig-nat:nat-session":[{"protocol":"TCP","protocol":"UDP",'
            '"src_address":"10.66.0.1","src_port":7012,"dst_address":"192.0.2.66",'
            '"dst_port":443}]}')
    reply = post(rc, body)
    assert_4xx(reply, 400, "invalid-value")
    assert "protocol" in reply.text
    assert rc.get(session_uri("UDP", 7012)).status == 404
    assert rc.get(session_uri("TCP", 7012)).status == 404


def test_yang_patch_with_an_element_of_60000_attributes_is_refused_before_it_is_read(rc):
    patch = ('<yang-patch xmlns="urn:ietf:params:xml:ns:yang:ietf-yang-patch"><patch-id>p'
             "</patch-id><edit><edit-id>1</edit-id><operation>merge</operation><target>"
             "/nfmig-nat:nat-session=UDP,10.66.0.9,7200,192.0.2.66,53</target><value>"
             f"{entry_with_attributes(60_000)}</value></edit></yang-patch>")
    started = time.monotonic()
    reply = rc.request("PATCH", "/restconf/data", patch,
                       content_type="application/yang-patch+xml")
    assert time.monotonic() - started < ERROR_WITHIN + 1.0  # a TLS handshake included
    assert_4xx(reply, 413, "too-big")


def test_duplicate_members_in_a_json_yang_patch_are_refused(rc):
    body = ('{"ietf-yang-patch:yang-patch":{"patch-id":"p","patch-id":"q","edit":[]}}')
    reply = rc.request("PATCH", "/restconf/data", body,
                       content_type="application/yang-patch+json")
    assert_4xx(reply, 400, "invalid-value")


@pytest.mark.parametrize(("sport", "member", "value", "accepted"), [
    (7101, "orig_packets", 5, False),  # uint64: RFC 7951 wants a string
    (7102, "orig_packets", "5", True),
    (7103, "src_window_scale", "7", False),  # uint8: a JSON number, not a string
    (7104, "src_window_scale", 7, True),
])
def test_reproducer_json_numbers_follow_rfc_7951_as_libyang_applies_it(rc, sport, member,
                                                                       value, accepted):
    reply = post(rc, json.dumps({"nfmig-nat:nat-session": [entry(sport, **{member: value})]}))
    if accepted:
        assert reply.status == 201, reply.text
        assert rc.request("DELETE", session_uri("TCP", sport)).status == 204
    else:
        assert_4xx(reply, 400, "invalid-value")
        assert rc.get(session_uri("TCP", sport)).status == 404


def test_json_nan_and_invalid_utf8_are_400(rc):
    assert_4xx(post(rc, '{"nfmig-nat:nat-policy":{"port-min":NaN}}'), 400,
               "malformed-message")
    assert_4xx(post(rc, b'{"nfmig-nat:nat-policy":{"inside-interface":"\xff"}}'), 400,
               "malformed-message")


# -- RESTCONF: a body over the limit is refused while it arrives ----------------------------
def raw_https(rc: Restconf) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", rc.port), timeout=10)
    return rc.tls.wrap_socket(sock, server_hostname="127.0.0.1")


def request_head(rc: Restconf, headers: str) -> bytes:
    auth = base64.b64encode(f"{rc.server.user}:{rc.server.password}".encode()).decode()
    return (f"POST /restconf/data HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Basic {auth}\r\nContent-Type: {JSON}\r\n"
            f"Accept: {JSON}\r\n{headers}\r\n").encode()


def status_within(sock: ssl.SSLSocket, started: float) -> tuple[int, bytes, float]:
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    elapsed = time.monotonic() - started
    return int(data.split(b" ", 2)[1]), data, elapsed


def http_chunks(pieces: int, size: int = 64 << 10) -> Iterator[bytes]:
    """The start of a JSON body in HTTP/1.1 chunks: ``pieces`` of ``size`` bytes."""
    head = b'{"nfmig-nat:nat-policy":{"inside-interface":"'
    yield b"%x\r\n" % len(head) + head + b"\r\n"
    for _ in range(pieces):
        yield b"%x\r\n" % size + b"a" * size + b"\r\n"


def test_reproducer_body_larger_than_declared_limit_is_413_before_it_is_sent(server, rc):
    sock = raw_https(rc)
    try:
        started = time.monotonic()
        sock.sendall(request_head(rc, f"Content-Length: {60 << 20}\r\n"))
        status, reply, elapsed = status_within(sock, started)
    finally:
        sock.close()
    assert status == 413 and b"too-big" in reply
    assert elapsed < ERROR_WITHIN


def refuse_a_chunked_body(server: RunningServer, rc: Restconf) -> None:
    before = rss_mb(server)
    sock = raw_https(rc)
    try:
        sock.sendall(request_head(rc, "Transfer-Encoding: chunked\r\n"))
        for piece in http_chunks(LIMIT // (64 << 10) + 2):
            sock.sendall(piece)
        started = time.monotonic()  # past the limit: nothing more is sent
        status, reply, elapsed = status_within(sock, started)
    finally:
        sock.close()
    assert status == 413 and b"too-big" in reply
    assert elapsed < ERROR_WITHIN
    assert settled_rss(server, before) - before < RSS_TOLERANCE_MB


def test_chunked_body_over_the_limit_is_413_while_it_arrives(server, rc):
    refuse_a_chunked_body(server, rc)


def test_restconf_and_netconf_are_served_while_large_bodies_are_refused(server, rc):
    answers: list[tuple[int, float]] = []
    stop = threading.Event()

    def bystander() -> None:
        while not stop.is_set():
            started = time.monotonic()
            status = rc.get("/restconf/data/nfmig-nat:nat-policy").status
            answers.append((status, time.monotonic() - started))

    thread = threading.Thread(target=bystander, daemon=True)
    thread.start()
    try:
        with watched(server):
            for _ in range(3):
                refuse_a_chunked_body(server, rc)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert answers and all(status in (200, 404) for status, _ in answers), answers
    assert max(seconds for _, seconds in answers) < 3.0
