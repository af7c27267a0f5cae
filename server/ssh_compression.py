"""SSH compression (RFC 4253 section 6.2) as OpenSSH does it: ``zlib@openssh.com``, which
starts only once the client has logged in, so nobody can make the server inflate data
before it knows who they are. Plain ``zlib`` (from the first packet) is not offered.

A session's table crosses the wire as XML whose tags repeat in every entry: compressed, a
bulk transfer shrinks about tenfold. The server offers it; a client that does not ask for
it (OpenSSH without -C, say) gets none.

A compressed packet is inflated with a bound: one packet of a few kilobytes could otherwise
become gigabytes in memory before anything looks at it.
"""

from __future__ import annotations

import zlib

import paramiko
from paramiko.compress import ZlibCompressor

DELAYED_ZLIB = "zlib@openssh.com"
# In preference order, as both the server and the migrator announce them.
METHODS = (DELAYED_ZLIB, "none")
# The largest payload one packet may inflate to: well above the largest packet either side
# of a channel asks for (server.ssh_server.MAX_PACKET), as RFC 4253's limits allow.
MAX_INFLATED = 1 << 20


class BoundedInflater:
    """paramiko's inflater for one direction of a connection, refusing a packet that would
    inflate beyond MAX_INFLATED (the connection is then closed)."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj()

    def __call__(self, data: bytes) -> bytes:
        out = self._z.decompress(data, MAX_INFLATED)
        if self._z.unconsumed_tail:
            raise paramiko.SSHException(
                f"a compressed packet inflates to more than {MAX_INFLATED} bytes")
        return out


class CompressingTransport(paramiko.Transport):
    """A server transport offering delayed zlib compression with a bounded inflater."""

    _compression_info = {DELAYED_ZLIB: (ZlibCompressor, BoundedInflater),
                         "none": (None, None)}
    _preferred_compression = METHODS
