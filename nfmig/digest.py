"""The session digest of rpc session-digest (yang/nfmig-nat): a count and an order-independent
hash of a set of sessions, computed the same way by the server (from Session tuples) and by a
migrator (from the entries a get-data returned), so that either can predict the other's.

A session's hash covers what a migration must carry over exactly: its key and its
translation. Counters, the remaining lifetime and the TCP state change with traffic, and
would make two reads of an unchanged table disagree.

The sum of the sessions' hashes (modulo 2**64) is the digest: adding or removing one session
adds or subtracts its hash, so a migrator derives the digest a target must have after a
write from the one it had before, without reading the target again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from hashlib import blake2b

from nfmig.nf_backends.base import SESSION_FIELDS

# The leaves of a session's canonical text, in the nat-session list's order: its key, then
# its translation (the first nine fields of nf_backends.base.Session, in that order).
DIGEST_LEAVES = SESSION_FIELDS[:SESSION_FIELDS.index("translated_dst_port") + 1]
SEPARATOR = " "  # no enum name, address or port number contains one
MODULUS = 1 << 64
EMPTY = "0" * 16  # the digest of no session
_TEMPLATE = SEPARATOR.join(["%s"] * len(DIGEST_LEAVES))
_SUFFIXES = tuple(name.removeprefix("translated_") for name in DIGEST_LEAVES[5:])
_KNOWN_SUFFIXES = frozenset(_SUFFIXES)
_TRANSLATION = re.compile(r"<(?:[\w.-]+:)?(translated_address|translated_port|"
                          r"translated_dst_address|translated_dst_port)(?=[\s/>])[^>]*>"
                          r"\s*([^<]*?)\s*<")
_OUTPUT_COUNT = re.compile(r"<(?:[\w.-]+:)?count(?=[\s>])[^>]*>\s*(\d+)\s*<")
_OUTPUT_DIGEST = re.compile(r"<(?:[\w.-]+:)?digest(?=[\s>])[^>]*>\s*([0-9a-f]{16})\s*<")


def session_hash(values: Sequence) -> int:
    """The 64-bit hash of one session from its DIGEST_LEAVES values (at least those, in that
    order: a Session tuple will do); None or "" for an absent leaf."""
    return _hash(_TEMPLATE % tuple("" if v is None else v
                                   for v in values[:len(DIGEST_LEAVES)]))


def digest_sum(sessions: Iterable[Sequence]) -> tuple[int, int]:
    """(how many, the sum of their hashes modulo 2**64) of sessions given as values."""
    count = total = 0
    for values in sessions:
        total += session_hash(values)
        count += 1
    return count, total % MODULUS


def digest_text(total: int) -> str:
    """The digest leaf's value: 16 lowercase hex digits, most significant first."""
    return f"{total % MODULUS:016x}"


def entry_values(key: Sequence[str], xml: str) -> tuple[str, ...]:
    """A session's DIGEST_LEAVES values from a nat-session entry as XML text (its key
    already read from it): the server writes each value in the form it hashes."""
    # Cut at the start tags as nfmig servers write them: a regular expression over each of
    # 100k entries would cost more than the rest of a migration's verify.
    parts = xml.split("<translated_")
    found = {}
    for part in parts[1:]:
        name, _, rest = part.partition(">")
        found[name] = rest[:rest.find("<")].strip()
    if found.keys() <= _KNOWN_SUFFIXES and xml.count("translated_") == 2 * len(found):
        return (*key, *(found.get(suffix, "") for suffix in _SUFFIXES))
    # prefixed or with attributes (not as nfmig servers write them)
    found = dict(_TRANSLATION.findall(xml))
    return (*key, *(found.get(name, "") for name in DIGEST_LEAVES[len(key):]))


def entry_hash(key: Sequence[str], xml: str) -> int:
    """The hash of a nat-session entry given as XML text (e.g. from a get-data reply)."""
    return _hash(SEPARATOR.join(entry_values(key, xml)))


def _hash(text: str) -> int:
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "little")


def entries_digest(entries: Iterable[tuple[Sequence[str], str]]) -> tuple[int, int]:
    """(how many, the sum of their hashes modulo 2**64) of nat-session entries given as
    (key, XML text)."""
    count = total = 0
    for key, xml in entries:
        total += entry_hash(key, xml)
        count += 1
    return count, total % MODULUS


def parse_output(text: str) -> tuple[int, int] | None:
    """(count, digest as a number) from rpc session-digest's output (its leaves as XML
    text); None when it holds no such pair."""
    count = _OUTPUT_COUNT.search(text)
    digest = _OUTPUT_DIGEST.search(text)
    if count is None or digest is None:
        return None
    return int(count.group(1)), int(digest.group(1), 16)
