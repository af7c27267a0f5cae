"""nfmig: move the live state of network functions between different implementations."""

__version__ = "0.1.0"
