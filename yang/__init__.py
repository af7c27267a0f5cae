"""The YANG modules nfmig serves, shipped as package data."""

from pathlib import Path

YANG_DIR = Path(__file__).resolve().parent
EXAMPLES_DIR = YANG_DIR / "examples"
NAT_MODULE = "nfmig-nat"
NAT_NS = "urn:nfmig:params:xml:ns:yang:nfmig-nat"
