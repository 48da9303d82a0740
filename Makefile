# pyflannel — build, test, demo.  Everything runs as root on Debian 12.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
APT_PACKAGES := etcd-server etcd-client iproute2 iputils-ping iptables ethtool \
                docker.io containerd runc busybox-static iperf3 tcpdump \
                containernetworking-plugins docker-compose python3-venv wireguard-go
PYTEST_ARGS ?=

.PHONY: install system-deps test test-unit test-lab demo demo-down bench bench-scale clean plugin images cni engines units install-host uninstall-host

# The managed Docker plugin (build/plugin/pyflannel: config.json + rootfs) and the same rootfs as a tar for the
# compose image; rebuilt only when a source file changed.
PLUGIN_OUT := build/plugin
PLUGIN_SOURCES := $(shell find pyflannel plugin -name '*.py') plugin/pyflannel-host config.json pyproject.toml
DOCKER ?= /usr/bin/docker

# apt packages the tests and the demo use, each skipped when present: a Docker or containerd installed from
# elsewhere (docker-ce, containerd.io) is used, never replaced (lab/system_deps.py says what it installs first).
system-deps:
	@python3 lab/system_deps.py $(APT_PACKAGES)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The Docker engines the lab tests run on: Debian 12's dockerd 20.10 and Compose v1 (the system's), Debian 13's
# dockerd 26.1 and Compose v2 (extracted).
ENGINES := build/engines
DEBIAN13_DOCKER := $(ENGINES)/docker-26.1/bin
$(DEBIAN13_DOCKER)/dockerd $(DEBIAN13_DOCKER)/docker-compose &: lab/engines/fetch-debian13.sh
	bash lab/engines/fetch-debian13.sh $(ENGINES)/docker-26.1

$(ENGINES)/promtool/promtool: lab/engines/fetch-promtool.sh
	bash lab/engines/fetch-promtool.sh $(ENGINES)/promtool

engines: $(DEBIAN13_DOCKER)/dockerd $(DEBIAN13_DOCKER)/docker-compose $(ENGINES)/promtool/promtool

# Three workers, each taking whole files (a file's lab fixtures are built once): the lab tests mostly wait.
TEST_WORKERS ?= 3
test: system-deps install engines
	$(VENV)/bin/pytest -ra -rP -n $(TEST_WORKERS) --dist loadfile --durations=20 $(PYTEST_ARGS)

# The fast tests: pure logic on in-memory fakes; no root, etcd or namespaces needed. pip runs only when the venv has
# no pytest yet (a changed pyproject.toml waits for `make install`), so any user can run them offline.
$(VENV)/bin/pytest:
	$(MAKE) -s install

UNIT_WORKERS ?= 2
test-unit: $(VENV)/bin/pytest
	$(VENV)/bin/pytest -q -p no:cacheprovider -m unit -n $(UNIT_WORKERS) $(PYTEST_ARGS)

# The lab tests: root, a real etcd, namespaces and dockerd (every test is unit or lab: tests/test_kinds.py).
test-lab: system-deps install engines
	$(VENV)/bin/pytest -ra -rP -m lab $(PYTEST_ARGS)

demo: system-deps install
	$(PY) -m lab.demo up

demo-down: install
	$(PY) -m lab.demo down

bench: system-deps install
	$(PY) -m bench.run

# The scale bench: real daemons in lab namespaces and simulated hosts in etcd (BENCH_SCALE="H,S ...").
bench-scale: system-deps install
	$(PY) -m bench.scale

$(VENV)/.build-installed: pyproject.toml | $(VENV)/.installed
	$(VENV)/bin/pip install -q -e '.[build]'
	touch $@

$(PLUGIN_OUT)/pyflannel-rootfs.tar: $(PLUGIN_SOURCES) | $(VENV)/.build-installed
	$(PY) plugin/build.py --out $(PLUGIN_OUT)

plugin: $(PLUGIN_OUT)/pyflannel-rootfs.tar

# pyflannel:latest in the Docker engine that DOCKER_HOST names (no registry needed), for docker-compose.yml.
images: plugin
	$(DOCKER) import --change 'ENV PATH=/usr/bin:/usr/sbin:/bin:/sbin' $(PLUGIN_OUT)/pyflannel-rootfs.tar pyflannel:latest

# The CNI plugin, two files for the CNI bin folder:
# - dist/cni/pyflannel (its file name is the conflist's "type"): the thin client (pyflannel/cni/thin.py) as a zipapp
#   run by `/usr/bin/python3 -IS`; it hands each call to pyflanneld, compiled modules inside to start faster;
# - dist/cni/pyflannel-inprocess: the complete plugin as one pyinstaller binary, run by the thin client when
#   pyflanneld does not answer. pyinstaller cannot see through the editable install, so it works from a plain install
#   in build/cni/site; modules the plugin never imports are left out (smaller binary, faster start).
CNI_THIN := dist/cni/pyflannel
CNI_THIN_MODULES := __init__.py cni/__init__.py cni/thin.py
CNI_BIN := dist/cni/pyflannel-inprocess
CNI_SOURCES := $(shell find pyflannel -name '*.py') pyproject.toml
CNI_EXCLUDES := decimal doctest email http pydoc pyexpat xml tkinter unicodedata pyflannel.daemon \
                flask werkzeug jinja2 gunicorn docker requests urllib3 etcd etcd3gw prometheus_client

$(CNI_THIN): $(addprefix pyflannel/,$(CNI_THIN_MODULES)) Makefile
	rm -rf build/cni-thin && mkdir -p build/cni-thin/pyflannel/cni dist/cni
	for m in $(CNI_THIN_MODULES); do cp pyflannel/$$m build/cni-thin/pyflannel/$$m; done
	printf 'import sys\nfrom pyflannel.cni.thin import main\nsys.exit(main())\n' > build/cni-thin/__main__.py
	/usr/bin/python3 -m compileall -q -b build/cni-thin/pyflannel
	/usr/bin/python3 -m zipapp build/cni-thin -p '/usr/bin/python3 -IS' -o $@

$(CNI_BIN): $(CNI_SOURCES) | $(VENV)/.build-installed
	rm -rf build/cni && $(VENV)/bin/pip install -q --no-deps --target build/cni/site .
	cd build/cni && ../../$(VENV)/bin/pyinstaller --onefile --strip --noconfirm --log-level WARN \
		--name pyflannel-inprocess --paths site --distpath ../../dist/cni --workpath work --specpath . \
		$(addprefix --exclude-module ,$(CNI_EXCLUDES)) site/pyflannel/cni/__main__.py

cni: $(CNI_THIN) $(CNI_BIN)

# A real host: pyflannel in a venv under PREFIX and its systemd units (systemd/, @BINDIR@ replaced) in UNITDIR,
# enabled and started when systemd runs: pyflanneld after network-online, the driver's socket before docker.
PREFIX  ?= /opt/pyflannel
UNITDIR ?= /etc/systemd/system
BINDIR  ?= $(PREFIX)/bin
units:
	install -d $(UNITDIR)
	for unit in systemd/*.service systemd/*.socket; do \
		sed 's|@BINDIR@|$(BINDIR)|g' $$unit > $(UNITDIR)/$$(basename $$unit); done

# The system tools the daemons run: iptables and ip6tables (masquerade, forwarding, the tunnel guard, the driver's
# walls), wireguard-go (the wireguard backend on a kernel without its module), ping (pyflannel status).
HOST_PACKAGES := iptables wireguard-go iputils-ping
COMMANDS := pyflanneld pyflannel-driver pyflannel
LINKDIR ?= /usr/local/bin

install-host:
	@python3 lab/system_deps.py $(HOST_PACKAGES)
	python3 -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q .
	install -d $(LINKDIR)
	for command in $(COMMANDS); do ln -sfn $(BINDIR)/$$command $(LINKDIR)/$$command; done
	$(MAKE) -s units
	@if [ -d /run/systemd/system ]; then \
		systemctl daemon-reload && systemctl enable --now pyflanneld-dns.socket pyflanneld.service pyflannel-driver.socket; \
		echo "pyflanneld and pyflannel-driver.socket enabled; settings: /etc/default/pyflanneld (FLANNELD_*)"; \
	else echo "systemd is not running here: units installed in $(UNITDIR), not started"; fi
	@echo "$(COMMANDS) linked in $(LINKDIR); undo with: make uninstall-host"

# Undoes install-host: the units stopped and removed, the links and PREFIX deleted. Kept, as after stopping
# flanneld: the lease in etcd (it expires), flannel.<VNI> and its routes (a reboot clears them), /var/lib/pyflannel
# (the VTEP MAC, the last lease, the driver's state: rm -rf it to start afresh) and /etc/default/pyflanneld.
uninstall-host:
	@if [ -d /run/systemd/system ]; then \
		systemctl disable --now $$(cd systemd && ls *.service *.socket) 2>/dev/null || true; fi
	for unit in systemd/*.service systemd/*.socket; do rm -f $(UNITDIR)/$$(basename $$unit); done
	@if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	for command in $(COMMANDS); do \
		if [ "$$(readlink $(LINKDIR)/$$command)" = "$(BINDIR)/$$command" ]; then rm -f $(LINKDIR)/$$command; fi; done
	rm -rf $(PREFIX)

clean:
	rm -rf $(VENV) build dist *.egg-info
