"""A deliberately plain NETCONF client on paramiko: base 1.0 only or 1.1, raw bytes in and
out, for the quirks and malformed input real-world clients send."""

from __future__ import annotations

import re

import paramiko

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"


class RawClient:
    def __init__(self, port: int, user: str, password: str, base11: bool = False,
                 hello_prefix: bytes = b""):
        self.transport = paramiko.Transport(("127.0.0.1", port))
        self.transport.connect(username=user, password=password)
        self.chan = self.transport.open_session()
        self.chan.settimeout(30)
        self.chan.invoke_subsystem("netconf")
        self.base11 = base11
        self.buf = b""
        self.server_hello = self._read_eom()
        caps = "<capability>urn:ietf:params:netconf:base:1.0</capability>"
        if base11:
            caps += "<capability>urn:ietf:params:netconf:base:1.1</capability>"
        hello = (f'<?xml version="1.0" encoding="UTF-8"?><hello xmlns="{NC_NS}"><capabilities>'
                 f"{caps}</capabilities></hello>]]>]]>").encode()
        self.chan.sendall(hello_prefix + hello)

    def _read_eom(self) -> bytes:
        while b"]]>]]>" not in self.buf:
            data = self.chan.recv(65536)
            if not data:
                raise EOFError("server closed the session")
            self.buf += data
        msg, _, self.buf = self.buf.partition(b"]]>]]>")
        return msg

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            while not re.match(rb"\n#(\d+|#)\n", self.buf):
                data = self.chan.recv(65536)
                if not data:
                    raise EOFError("server closed the session")
                self.buf += data
            m = re.match(rb"\n#(\d+|#)\n", self.buf)
            self.buf = self.buf[m.end():]
            if m.group(1) == b"#":
                return b"".join(parts)
            size = int(m.group(1))
            while len(self.buf) < size:
                self.buf += self.chan.recv(65536)
            parts.append(self.buf[:size])
            self.buf = self.buf[size:]

    def send_raw(self, body: bytes) -> bytes:
        """Send ``body`` framed for the session and return the next reply."""
        if self.base11:
            self.chan.sendall(b"\n#%d\n" % len(body) + body + b"\n##\n")
            return self._read_chunked()
        self.chan.sendall(body + b"]]>]]>")
        return self._read_eom()

    def rpc(self, inner: str, message_id: str = "1") -> bytes:
        return self.send_raw(f'<rpc xmlns="{NC_NS}" message-id="{message_id}">{inner}</rpc>'
                             .encode())

    def close(self) -> None:
        self.transport.close()
