# nfmig — every entry point a user or CI needs.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
YANG    := yang
APT_PKGS := libyang2-dev libyang2-tools conntrack conntrackd nftables iptables iproute2 \
            iputils-arping iputils-ping ethtool openvswitch-switch tcpdump
# Only `make bench-vm` needs these (QEMU for the VM it migrates), so `make test` does not pull
# them in.
BENCH_VM_PKGS := qemu-system-x86 iproute2 conntrack
BENCH_VM_ARGS ?=
MODULES := $(wildcard $(YANG)/*.yang)

.PHONY: setup system-packages bench-vm-packages test demo bench bench-vm lint bindings clean

setup: system-packages $(VENV)/.installed

# Installs only what is missing, so it is cheap to run again.
system-packages bench-vm-packages: PKGS = $(if $(filter bench-vm-packages,$@),$(BENCH_VM_PKGS),$(APT_PKGS))
system-packages bench-vm-packages:
	@missing=""; for p in $(PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make setup: missing Debian packages:$$missing (run as root)"; exit 1; fi; \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

test: setup
	$(BIN)/pytest -q -ra tests

demo: setup
	$(BIN)/nfmig demo

# bench/migrator_linux.py also takes --memory-rounds K (the same table moved back and forth
# K times, the servers' memory after each; the goal is about 10 at 100k), left out here to
# keep `make bench` short.
bench: setup
	$(BIN)/python bench/netconf_bulk.py
	$(BIN)/python bench/restconf_bulk.py
	$(BIN)/python bench/evacuate.py
	@if [ "$$(id -u)" = 0 ]; then $(BIN)/python bench/migrator_linux.py --hetero && \
	  $(BIN)/python bench/standby.py && $(BIN)/python bench/firewall.py; \
	else echo "bench/migrator_linux.py, bench/standby.py and bench/firewall.py skipped: network namespaces and conntrack need root"; fi

# The NAT's whole VM live-migrated by QEMU against `nfmig migrate` of its sessions, the same
# N over the same link (bench/vm_vs_state.py; the VM image is built from Debian packages into
# ~/.cache/nfmig/vm once). As root. E.g. BENCH_VM_ARGS="--json vm.json --sizes 1000".
bench-vm: setup bench-vm-packages
	@if [ "$$(id -u)" != 0 ]; then echo "make bench-vm: needs root (namespaces, taps, QEMU)"; exit 1; fi
	$(BIN)/python bench/vm_vs_state.py $(BENCH_VM_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/pyang --strict -p $(YANG) $(MODULES)
	yanglint -p $(YANG) $(MODULES)
	yanglint -p $(YANG) $(YANG)/nfmig-nat@*.yang $(YANG)/examples/seed-example.json
	yanglint -p $(YANG) $(YANG)/nfmig-nat@*.yang $(YANG)/examples/seed-example.xml
	yanglint -p $(YANG) $(YANG)/nfmig-nat@*.yang $(YANG)/nfmig-firewall@*.yang \
	  $(YANG)/examples/firewall-example.xml
	$(BIN)/python -m nfmig.client.typed check client/nat_bindings.py

# The typed objects for scripts (client/typed.py), generated from the model by pyangbind.
# Committed, so installing nfmig needs neither pyang nor the plugin; `make lint` fails when
# they no longer match the model.
bindings: setup
	$(BIN)/python -m nfmig.client.typed generate client/nat_bindings.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
