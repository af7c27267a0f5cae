"""One nfmig server per NF instance: the datastores over a backend, served over NETCONF."""
