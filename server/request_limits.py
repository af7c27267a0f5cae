"""What one request may hold, and the checks that hold it to that as early as its bytes
allow, for NETCONF and RESTCONF alike.

Size is checked while a request arrives (framing.py for NETCONF, :func:`read_body` for
RESTCONF), so a refused request is never held whole. What only a parser can see (depth,
attribute counts, a document type declaration, duplicate JSON members) is checked by
linear passes before the request's content is walked by any recursive or per-node code:
parsing itself is linear, but code that recurses per level or looks attributes up one by
one is not, and those limits keep it so.
"""

from __future__ import annotations

import asyncio
import json
import re

from aiohttp import web
from lxml import etree

from . import errors
from .errors import RpcError
from .gc_pause import collector_paused, release_memory

# The rpc element's attributes are echoed in every reply to it (RFC 6241 §4.2); their
# number and the message-id's length are bounded so the echo is.
MAX_RPC_ATTRIBUTES = 64
MAX_MESSAGE_ID = 4096
# Any element's: lxml finds each attribute's value by a walk over the element's attributes,
# so reading them all is quadratic in their number. Content has a few at most (operation,
# insert, key, value, the with-defaults tag).
MAX_ATTRIBUTES = 64
# The start tag of a message's root element must end within its first HEAD bytes: checked
# while the message arrives, so a start tag of megabytes (a huge message-id, attribute
# after attribute) is refused before it is held.
HEAD = 64 << 10
# Deeper than any node of the server's models (with the rpc and filter around it); the
# request-walking code recurses per level.
MAX_XML_DEPTH = 64
MAX_JSON_DEPTH = 64
# JSON is held as Python objects while it is converted, some twenty times its size: a JSON
# body is bounded below --max-message-size. Bulk writes go as XML (YANG Patch or edits).
MAX_JSON_BODY = 16 << 20

# The XML declaration, comments and processing instructions before the root element.
_PROLOG = re.compile(rb"(?:\xef\xbb\xbf)?(?:\s|<\?(?:[^?]|\?(?!>))*\?>|<!--(?:[^-]|-(?!->))*-->)*")
# A start tag: its name, then attributes (a quoted value may hold ">").
_START_TAG = re.compile(rb"<([^\s/>?!\"']+)(?:[^\"'>]|\"[^\"]*\"|'[^']*')*>")
_DOCTYPE = b"<!DOCTYPE"


def head_problem(head: bytes) -> RpcError | None:
    """Why a message whose first bytes are ``head`` (HEAD of them, the message being
    longer) cannot be an acceptable request, or None."""
    prolog = _PROLOG.match(head).end()
    if head.startswith(_DOCTYPE, prolog):
        return errors.malformed("document type declarations are not accepted")
    if _START_TAG.match(head, prolog):
        return None
    if head[prolog:prolog + 1] == b"<":
        return errors.too_big(f"the root element's start tag does not end within the "
                              f"message's first {HEAD} bytes")
    return errors.malformed("the message is not XML")


def root_start_tag(head: bytes) -> bytes | None:
    """The root element's start tag in ``head`` as a document of its own (closed at once),
    to read the attributes of a request refused before it was parsed; None if the tag
    does not end in ``head``."""
    match = _START_TAG.match(head, _PROLOG.match(head).end())
    if match is None:
        return None
    tag = match.group(0)
    return tag if tag.endswith(b"/>") else tag + b"</" + match.group(1) + b">"


# True when some element lies deeper than MAX_XML_DEPTH, or has more than MAX_ATTRIBUTES:
# one pass over the elements each, in C.
_TOO_DEEP = etree.XPath("boolean(/" + "/".join(["*"] * (MAX_XML_DEPTH + 1)) + ")")
_TOO_MANY_ATTRIBUTES = etree.XPath(f"boolean(//@*[{MAX_ATTRIBUTES + 1}])")
# The same in XML text, where it must be found before a parser's tree is walked (a YANG
# Patch): a start tag with more, tag by tag (8 ns a byte), only where a screen in C (0.7 ns
# a byte) finds it possible. Each attribute's "=" lies between its element's "<" and the
# next "<" (a value holds none), so an element with more has more "=" in a row once all
# but "<" and "=" is removed.
_MANY_ATTRIBUTES = re.compile(rb"<[^\s/>?!]+(?:\s+[^\s=>/]+\s*=\s*(?:\"[^\"]*\"|'[^']*')){%d}"
                              % (MAX_ATTRIBUTES + 1))
_ALL_BUT_TAGS_AND_EQUALS = bytes(b for b in range(256) if b not in b"<=")


def too_many_attributes(text: bytes) -> bool:
    """Whether the XML ``text`` has a start tag with more than MAX_ATTRIBUTES attributes
    (namespace declarations count too); linear."""
    return b"=" * (MAX_ATTRIBUTES + 1) in text.translate(None, _ALL_BUT_TAGS_AND_EQUALS) \
        and _MANY_ATTRIBUTES.search(text) is not None


def xml_problem(root: etree._Element, text: bytes | None = None) -> RpcError | None:
    """What makes a parsed request unacceptable before it is walked: a document type
    declaration (no request needs one, and the entities it declares would reach the
    handlers unexpanded), nesting deeper than MAX_XML_DEPTH, an element with more than
    MAX_ATTRIBUTES attributes. ``text``, the document's source, spares the search over
    the tree for attributes where a screen of the text rules them out."""
    if root.getroottree().docinfo.doctype:
        return errors.malformed("document type declarations are not accepted")
    if _TOO_DEEP(root):
        return errors.too_big(f"the document nests elements more than {MAX_XML_DEPTH} "
                              "deep")
    if (text is None or too_many_attributes(text)) and _TOO_MANY_ATTRIBUTES(root):
        return errors.too_big(f"an element has more than {MAX_ATTRIBUTES} attributes")
    return None


def check_rpc_attributes(rpc: etree._Element) -> RpcError | None:
    """An rpc element's attributes within the bounds of what a reply echoes; counted
    before any is read (see MAX_ATTRIBUTES)."""
    count = len(rpc.attrib)
    if count > MAX_RPC_ATTRIBUTES:
        return errors.too_big(f"the rpc element has {count} attributes; this server "
                              f"accepts at most {MAX_RPC_ATTRIBUTES}")
    message_id = rpc.get("message-id")
    if message_id is not None and len(message_id) > MAX_MESSAGE_ID:
        return errors.too_big(f"the message-id is {len(message_id)} characters long; this "
                              f"server accepts at most {MAX_MESSAGE_ID}")
    return None


# -- JSON ----------------------------------------------------------------------------------
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_ESCAPE = re.compile(r"\\(?:u([dD][89abAB][0-9a-fA-F]{2})|u([dD][c-fC-F][0-9a-fA-F]{2})|.)",
                     re.S)


class JsonBody(bytes):
    """A JSON body checked by :func:`read_body`, with what it holds (parsed once)."""

    value: object


def load_json(body: bytes) -> object:
    """RFC 8259 JSON as RFC 7951 wants it: UTF-8, no duplicate member names, no lone
    surrogates, nested at most MAX_JSON_DEPTH deep, no NaN or Infinity; RpcError (400)
    otherwise. The depth is found before parsing: the parser recurses per level."""
    if isinstance(body, JsonBody):
        return body.value
    try:
        text = body.decode("utf-8") if isinstance(body, bytes | bytearray) else body
    except UnicodeDecodeError as exc:
        raise errors.malformed(f"the body is not UTF-8: {exc}") from None
    _check_nesting(text)
    if "\\u" in text:
        _check_surrogates(text)
    try:
        return json.loads(text or "null", object_pairs_hook=_object,
                          parse_constant=_no_constant)
    except _Duplicate as exc:
        raise errors.invalid_value(f"the member {exc.name!r} appears twice in one JSON "
                                   "object", info={"bad-element": exc.name}) from None
    except (ValueError, RecursionError) as exc:
        raise errors.malformed(f"the body is not JSON: {exc}") from None


def _check_nesting(text: str) -> None:
    # Brackets outside strings, then matched pairs removed level by level: what is left
    # after MAX_JSON_DEPTH rounds is deeper than that (or does not match at all).
    brackets = _structure(text)
    for _ in range(MAX_JSON_DEPTH):
        if not brackets:
            return
        inner = brackets.replace("[]", "").replace("{}", "")
        if inner == brackets:
            raise errors.malformed("the body is not JSON: its brackets do not match")
        brackets = inner
    if brackets:
        raise errors.too_big(f"the body nests JSON arrays and objects more than "
                             f"{MAX_JSON_DEPTH} deep")


def _structure(text: str) -> str:
    """The brackets of ``text`` outside its strings, in order."""
    # Fast (every step in C): without escaped quotes and backslashes, then with nothing but
    # quotes and brackets, a string without brackets is two quotes in a row. Where a string
    # holds brackets, quotes remain, and the strings are cut out one by one instead.
    bare = text.replace("\\\\", "").replace('\\"', "").translate(_QUOTES_AND_BRACKETS)
    bare = bare.replace('""', "")
    if '"' not in bare:
        return bare
    return _NOT_BRACKET.sub("", _STRING.sub("", text))


class _KeepOnly(dict):
    """A str.translate table deleting every character but ``kept``."""

    def __init__(self, kept: str):
        super().__init__()
        self.kept = {ord(c) for c in kept}

    def __missing__(self, code: int) -> int | None:
        value = code if code in self.kept else None
        self[code] = value
        return value


_QUOTES_AND_BRACKETS = _KeepOnly('"[]{}')


def _check_surrogates(text: str) -> None:
    # A \uD800-\uDBFF escape must be followed at once by a \uDC00-\uDFFF one and nothing
    # else may come before the latter: Python's parser lets a lone one through, and it
    # would fail as text much later.
    expect_low = -1
    for escape in _ESCAPE.finditer(text):
        if expect_low >= 0:
            if escape.start() != expect_low or not escape.group(2):
                break
            expect_low = -1
        elif escape.group(1):
            expect_low = escape.end()
        elif escape.group(2):
            break
    else:
        if expect_low < 0:
            return
    raise errors.malformed("the body is not JSON: it holds a lone UTF-16 surrogate escape")


class _Duplicate(ValueError):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _object(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _Duplicate(name)
            seen.add(name)
    return obj


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON value")


# -- RESTCONF bodies -----------------------------------------------------------------------
async def read_body(request: web.Request, limit: int, as_json: bool = False,
                    as_xml: bool = False) -> bytes:
    """A request's body, refused (413 too-big) as soon as more than ``limit`` bytes of it
    have arrived (or its Content-Length says so) rather than once it is all held. A JSON
    body is also no larger than MAX_JSON_BODY and checked by :func:`load_json` (off the
    event loop; the result goes along, see :class:`JsonBody`), an XML body is UTF-8 without
    a document type declaration."""
    if as_json:
        limit = min(limit, MAX_JSON_BODY)
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(declared, limit)
    body = bytearray()
    async for piece in request.content.iter_any():
        body += piece
        if len(body) > limit:
            size = len(body)
            del body, piece
            # What the refused body took goes back now; off the event loop, as a
            # handler's would (nothing waits for it).
            asyncio.get_running_loop().run_in_executor(None, release_memory)
            raise _too_large(size, limit)
    data = bytes(body)
    del body
    if as_json:
        checked = JsonBody(data)
        checked.value = await _off_loop(_load_paused, data)
        return checked
    if as_xml and data:
        _check_xml_prolog(data)
    return data


def _too_large(size: int, limit: int) -> RpcError:
    error = errors.too_big(f"the request body is {size} bytes or more; this server accepts "
                           f"at most {limit} bytes here")
    error.status = 413
    return error


def _check_xml_prolog(data: bytes) -> None:
    # Other encodings than UTF-8 would hide a declaration from this check (and RFC 6241's
    # XML is UTF-8); UTF-16 and UTF-32 show NUL bytes or their byte order mark at once.
    if b"\0" in data[:4] or data[:2] in (b"\xfe\xff", b"\xff\xfe"):
        raise errors.malformed("an XML body is UTF-8")
    end = _PROLOG.match(data, 0, HEAD).end()
    if data.startswith(_DOCTYPE, end):
        raise errors.malformed("document type declarations are not accepted")
    if len(data) > HEAD and data[end:end + 2] in (b"<!", b"<?"):
        raise errors.too_big(f"the XML declaration and comments before the root element "
                             f"do not end within the body's first {HEAD} bytes")
    if too_many_attributes(data):
        raise errors.too_big(f"an element has more than {MAX_ATTRIBUTES} attributes")


def _load_paused(data: bytes) -> object:
    # As a request's handling: the many objects a large body becomes are not scanned by
    # the cyclic collector over and over, and the heap is tidied after.
    with collector_paused():
        return load_json(data)


async def _off_loop(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
