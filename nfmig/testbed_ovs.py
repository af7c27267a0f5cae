"""The test bed with NAT B as the SDN NAT (Open vSwitch + the OpenFlow NAT app).

The userspace switch rewrites addresses and ports in frames it reads from veth devices; a
frame sent with checksum offload carries only a partial checksum, which the rewrite then
corrupts. So every veth end of the bed computes its checksums in software.
"""

from __future__ import annotations

from nfmig.testbed import TestBed, _parallel


def without_checksum_offload(bed: TestBed) -> None:
    """Turn checksum offload off on both ends of every veth of the bed."""
    ends = [(bed.client, "eth0"), (bed.server, "eth0")]
    ends += [(ns, ifname) for ns, ifname, _bridge, _peer in bed._ports]
    ends += [(bed.switch, peer) for _ns, _ifname, _bridge, peer in bed._ports]
    _parallel([["ip", "netns", "exec", ns, "ethtool", "-K", dev, "tx", "off", "rx", "off"]
               for ns, dev in sorted(set(ends))])
