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


def create_backend(name: str, **options) -> Backend:
    """The backend called ``name``, built from the serve command's options."""
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
        return LinuxBackend(options["netns"])
    if name == "openflow":
        from .openflow import OpenflowBackend

        if not options.get("netns"):
            raise ValueError("the openflow backend needs --netns NAME (the namespace whose "
                             "inside and outside interfaces the switch takes)")
        return OpenflowBackend(options["netns"])
    raise ValueError(f"unknown backend {name!r} (choose from: {', '.join(BACKENDS)})")
