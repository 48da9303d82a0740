# pyflannel — build, test, demo.  Everything runs as root on Debian 12.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
APT_PACKAGES := etcd-server etcd-client iproute2 iputils-ping iptables ethtool \
                docker.io containerd runc busybox-static iperf3 tcpdump \
                containernetworking-plugins docker-compose python3-venv wireguard-go
PYTEST_ARGS ?=

.PHONY: install system-deps test test-unit test-lab demo demo-down bench bench-scale clean plugin images cni engines units install-host

# The managed Docker plugin (build/plugin/pyflannel: config.json + rootfs) and the same rootfs as a tar for the
# compose image; rebuilt only when a source file changed.
PLUGIN_OUT := build/plugin
PLUGIN_SOURCES := $(shell find pyflannel plugin -name '*.py') config.json pyproject.toml
DOCKER ?= /usr/bin/docker

# apt packages the tests and the demo use; skipped when all are present already.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The Docker engines the lab tests run on: Debian 12's dockerd 20.10 (the system's) and Debian 13's 26.1 (extracted).
ENGINES := build/engines
$(ENGINES)/docker-26.1/bin/dockerd: tests/engines/fetch-dockerd.sh
	bash tests/engines/fetch-dockerd.sh $(ENGINES)/docker-26.1

engines: $(ENGINES)/docker-26.1/bin/dockerd

test: system-deps install engines
	$(VENV)/bin/pytest -ra -rP $(PYTEST_ARGS)

# The fast tests: pure logic on in-memory fakes; no root, etcd or namespaces needed.
test-unit: install
	$(VENV)/bin/pytest -q -p no:cacheprovider -m unit $(PYTEST_ARGS)

demo: system-deps install
	$(PY) -m tests.demo up

demo-down: install
	$(PY) -m tests.demo down

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

install-host:
	python3 -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q .
	$(MAKE) -s units
	@if [ -d /run/systemd/system ]; then \
		systemctl daemon-reload && systemctl enable --now pyflanneld.service pyflannel-driver.socket; \
		echo "pyflanneld and pyflannel-driver.socket enabled; settings: /etc/default/pyflanneld (FLANNELD_*)"; \
	else echo "systemd is not running here: units installed in $(UNITDIR), not started"; fi

clean:
	rm -rf $(VENV) build dist *.egg-info
