"""RFC 6241 rpc-error as one exception type the whole server raises and the wire layer prints."""

from __future__ import annotations

from xml.sax.saxutils import escape

NC_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"


class RpcError(Exception):
    """One rpc-error (RFC 6241 §4.3); ``info`` maps error-info child names to text."""

    def __init__(self, tag: str, message: str, *, type: str = "application",  # noqa: A002
                 path: str | None = None, app_tag: str | None = None,
                 info: dict[str, str] | None = None, severity: str = "error"):
        super().__init__(message)
        self.tag = tag
        self.message = message
        self.type = type
        self.path = path
        self.app_tag = app_tag
        self.info = info or {}
        self.severity = severity

    def to_xml(self) -> str:
        parts = [f"<rpc-error><error-type>{self.type}</error-type>"
                 f"<error-tag>{self.tag}</error-tag><error-severity>{self.severity}"
                 "</error-severity>"]
        if self.app_tag:
            parts.append(f"<error-app-tag>{escape(self.app_tag)}</error-app-tag>")
        if self.path:
            parts.append(f"<error-path>{escape(self.path)}</error-path>")
        parts.append(f'<error-message xml:lang="en">{escape(self.message)}</error-message>')
        if self.info:
            parts.append("<error-info>")
            for name, value in self.info.items():
                parts.append(f"<{name}>{escape(str(value))}</{name}>")
            parts.append("</error-info>")
        parts.append("</rpc-error>")
        return "".join(parts)

    def __repr__(self) -> str:
        return f"RpcError({self.tag!r}, {self.message!r}, path={self.path!r})"


class RpcErrors(Exception):
    """Several rpc-errors in one reply (continue-on-error)."""

    def __init__(self, errors: list[RpcError]):
        super().__init__("; ".join(e.message for e in errors))
        self.errors = errors


# Constructors for the error-tags the server uses, so call sites read as the RFC does.
def invalid_value(message: str, path: str | None = None, **kw) -> RpcError:
    return RpcError("invalid-value", message, path=path, **kw)


def unknown_element(message: str, element: str, path: str | None = None,
                    type: str = "application") -> RpcError:  # noqa: A002
    return RpcError("unknown-element", message, type=type, path=path,
                    info={"bad-element": element})


def unknown_namespace(message: str, element: str, namespace: str,
                      type: str = "application") -> RpcError:  # noqa: A002
    return RpcError("unknown-namespace", message, type=type,
                    info={"bad-element": element, "bad-namespace": namespace})


def missing_element(message: str, element: str, path: str | None = None,
                    type: str = "application") -> RpcError:  # noqa: A002
    return RpcError("missing-element", message, type=type, path=path,
                    info={"bad-element": element})


def bad_element(message: str, element: str, type: str = "protocol") -> RpcError:  # noqa: A002
    return RpcError("bad-element", message, type=type, info={"bad-element": element})


def data_exists(message: str, path: str) -> RpcError:
    return RpcError("data-exists", message, path=path)


def data_missing(message: str, path: str) -> RpcError:
    return RpcError("data-missing", message, path=path)


def in_use(message: str) -> RpcError:
    return RpcError("in-use", message, type="protocol")


def lock_denied(message: str, holder: int) -> RpcError:
    return RpcError("lock-denied", message, type="protocol", info={"session-id": str(holder)})


def operation_failed(message: str, path: str | None = None, type: str = "application",  # noqa: A002
                     app_tag: str | None = None) -> RpcError:
    return RpcError("operation-failed", message, type=type, path=path, app_tag=app_tag)


def not_supported(message: str, type: str = "protocol") -> RpcError:  # noqa: A002
    return RpcError("operation-not-supported", message, type=type)


def too_big(message: str) -> RpcError:
    """A request beyond one of the server's limits (RFC 6241: too large to handle)."""
    return RpcError("too-big", message, type="rpc")


def malformed(message: str) -> RpcError:
    return RpcError("malformed-message", message, type="rpc")
