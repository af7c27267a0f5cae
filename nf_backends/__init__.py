"""NAT implementations behind one small interface (see :mod:`nfmig.nf_backends.base`)."""

from .base import (
    Backend,
    BackendError,
    BackendStats,
    NatPolicy,
    Session,
    SessionKey,
)
from .batch import SessionBatch, SessionEdit

__all__ = [
    "Backend", "BackendError", "BackendStats", "NatPolicy", "Session", "SessionBatch",
    "SessionEdit", "SessionKey", "create_backend", "BACKENDS",
]

BACKENDS = ("simulated", "linux", "openflow")
# The network functions (option ``nf``): every backend implements each.
NFS = ("nat", "firewall")


def create_backend(name: str, **options) -> Backend:
    """The backend called ``name``, built from the serve command's options; ``nf`` says
    which network function it is ("nat" unless given)."""
    nf = options.get("nf") or "nat"
    if nf not in NFS:
        raise ValueError(f"unknown network function {nf!r} (choose from: {', '.join(NFS)})")
    if name == "simulated":
        from .simulated import SimulatedBackend
        from .simulated_firewall import SimulatedFirewallBackend

        simulated = SimulatedFirewallBackend if options.get("nf") == "firewall" \
            else SimulatedBackend
        return simulated(seed_sessions=options.get("sessions", 0),
                         traffic_rate=options.get("traffic", 0.0))
    if name == "linux":
        from .linux import LinuxBackend

        if not options.get("netns"):
            raise ValueError("the linux backend needs --netns NAME (the NAT's namespace)")
        if nf == "firewall":
            from .linux_firewall import LinuxFirewallBackend

            return LinuxFirewallBackend(options["netns"])
        return LinuxBackend(options["netns"])
    if name == "openflow":
        from .openflow import OpenflowBackend

        if not options.get("netns"):
            raise ValueError("the openflow backend needs --netns NAME (the namespace whose "
                             "inside and outside interfaces the switch takes)")
        if nf == "firewall":
            from .openflow_firewall import OpenflowFirewallBackend

            return OpenflowFirewallBackend(options["netns"])
        return OpenflowBackend(options["netns"])
    raise ValueError(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")
