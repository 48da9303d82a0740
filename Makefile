# pyflannel — build, test, demo.  Everything runs as root on Debian 12.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
APT_PACKAGES := etcd-server etcd-client iproute2 iputils-ping iptables ethtool \
                docker.io containerd runc busybox-static iperf3 tcpdump \
                containernetworking-plugins docker-compose python3-venv
PYTEST_ARGS ?=

.PHONY: install system-deps test test-unit test-lab demo demo-down bench clean

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

test: system-deps install
	$(VENV)/bin/pytest -ra -rP $(PYTEST_ARGS)

test-unit: install
	$(VENV)/bin/pytest -ra -m "not lab" $(PYTEST_ARGS)

demo: system-deps install
	$(PY) -m tests.demo up

demo-down: install
	$(PY) -m tests.demo down

bench: system-deps install
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info
