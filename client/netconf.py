"""A thin NETCONF client for nfmig servers, on ncclient (raw RPCs for RFC 8526 get-data)."""

from __future__ import annotations

import time

from lxml import etree
from ncclient import manager
from ncclient.transport import session as nc_session

# ncclient's session thread checks its send queue only between 100 ms waits for input, which
# puts up to 100 ms in front of every request; a short wait sends it at once.
nc_session.TICK = 0.002

NAT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
NCDS = "urn:ietf:params:xml:ns:yang:ietf-netconf-nmda"
DS = "urn:ietf:params:xml:ns:yang:ietf-datastores"


class NatClient:
    def __init__(self, host: str, port: int, username: str, password: str | None = None,
                 hostkey_verify: bool = True, timeout: int = 600):
        self.m = manager.connect(host=host, port=port, username=username, password=password,
                                 hostkey_verify=hostkey_verify, allow_agent=password is None,
                                 look_for_keys=password is None, timeout=timeout)
        self.m.huge_tree = True

    def get_sessions(self, datastore: str = "operational") -> tuple[str, int]:
        """The nat-session entries of a datastore as XML text, and the reply's size."""
        rpc = (f'<get-data xmlns="{NCDS}" xmlns:ds="{DS}"><datastore>ds:{datastore}'
               f'</datastore><subtree-filter><nat-session xmlns="{NAT_NS}"/></subtree-filter>'
               "</get-data>")
        reply = self.m.dispatch(etree.fromstring(rpc)).xml
        start = reply.find("<nat-session")
        end = reply.rfind("</data>")
        body = reply[start:end] if start >= 0 else ""
        return body, len(reply.encode())

    def edit(self, config_body: str, target: str = "running") -> int:
        """edit-config of ``config_body`` (top-level nodes); returns the request size."""
        # The model's namespace is declared once on <config>, not on each of thousands of
        # entries: lxml re-homes every namespace declaration, one by one, each time ncclient
        # moves the config into its rpc (10k declarations: 0.55 s; one: 0.02 s).
        body = config_body.replace(f' xmlns="{NAT_NS}"', "")
        config = f'<nc:config xmlns:nc="{NC_NS}" xmlns="{NAT_NS}">{body}</nc:config>'
        self.m.edit_config(target=target, config=config)
        return len(config.encode())

    def delete_sessions(self, sessions_xml: str) -> None:
        """Remove every session named in ``sessions_xml`` (keys are enough)."""
        tree = etree.fromstring(f'<c xmlns="{NC_NS}">{sessions_xml}</c>'.encode(),
                                parser=etree.XMLParser(huge_tree=True))
        for entry in tree:
            entry.set(f"{{{NC_NS}}}operation", "delete")
        body = "".join(etree.tostring(e, encoding="unicode") for e in tree)
        self.edit(body.replace(f' xmlns="{NC_NS}"', ""))

    def close(self) -> None:
        if self.m.connected:
            self.m.close_session()


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - t0
