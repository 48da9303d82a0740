"""Shared fixtures: a real etcd on loopback for unit tests, and the multi-host lab for everything else."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from lab import CREATED_NAMESPACES, DOCKER_ENGINES, REPO, Lab, make, wait_until


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def etcd_url():
    """A real etcd (v2 API on) on loopback, for the whole session."""
    data = tempfile.mkdtemp(prefix="pyflannel-etcd-")
    client, peer = _free_port(), _free_port()
    url = f"http://127.0.0.1:{client}"
    proc = subprocess.Popen(["etcd", "--data-dir", data, "--enable-v2=true", "--listen-client-urls", url,
                             "--advertise-client-urls", url, "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                             "--initial-cluster", f"default=http://127.0.0.1:{peer}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request
        wait_until("etcd on loopback", lambda: urllib.request.urlopen(url + "/health", timeout=1).status == 200,
                   timeout=30, interval=0.2)
        yield url
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def plugin_build() -> Path:
    """`make plugin` once per session (incremental): build/plugin/pyflannel is the managed plugin's folder,
    build/plugin/pyflannel-rootfs.tar the compose image's root filesystem."""
    make("plugin")
    return REPO / "build" / "plugin"


@pytest.fixture(scope="module", params=sorted(DOCKER_ENGINES))
def docker_engine(request) -> str:
    """Each Docker test module runs once per engine of the matrix (dockerd 20.10 and 26.1); the value is the key
    that Host.start_dockerd takes."""
    return request.param


@pytest.fixture
def etcd_prefix(request):
    """A fresh key prefix per test, so tests sharing the etcd never see each other's keys."""
    return f"/test/{request.node.name.replace('[', '_').replace(']', '')}-{os.getpid()}"


@pytest.fixture
def make_lab(request):
    """Factory for labs; every lab made is torn down, passed or failed, and its logs shown on failure."""
    labs = []

    def make(hosts: int = 3, **kw) -> Lab:
        lab = Lab(hosts, **kw)
        labs.append(lab)
        return lab

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for lab in labs:
        if failed:
            print(lab.logs())
        lab.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session", autouse=True)
def safety_rule():
    """DEVELOPERS.md's safety rule, checked for the whole run: no VXLAN device or overlay route in the root
    namespace, and no lab namespace left behind."""
    def snapshot():
        links = subprocess.run(["ip", "-o", "-d", "link", "show"], capture_output=True, text=True).stdout
        routes = subprocess.run(["ip", "route", "show", "proto", "77"], capture_output=True, text=True).stdout
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
        return ({line.split(":")[1].strip() for line in links.splitlines() if " vxlan " in line}, routes.strip(),
                {n.split()[0] for n in namespaces if n.strip()})

    vxlans_before, _, namespaces_before = snapshot()
    yield
    vxlans, routes, namespaces = snapshot()
    assert vxlans <= vxlans_before, f"VXLAN device left in the root namespace: {vxlans - vxlans_before}"
    assert not routes, f"pyflannel route in the root namespace: {routes}"
    leaked = CREATED_NAMESPACES & namespaces
    assert not leaked, f"namespaces left behind: {leaked}"
