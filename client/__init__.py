"""The migrator's side of the wire: NETCONF clients for nfmig servers."""
