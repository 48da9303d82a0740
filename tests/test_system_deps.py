"""`make system-deps` never replaces a Docker or containerd installed from elsewhere (issue 29): the decision, on a
machine simulated by what dpkg knows and what is on PATH."""
import pytest

from lab.system_deps import TooOld, missing

pytestmark = pytest.mark.unit

PACKAGES = ["etcd-server", "docker.io", "containerd", "runc", "iptables"]


def machine(packages=(), commands=(), docker=(26, 1)):
    return dict(installed=lambda p: p in packages, which=lambda c: f"/usr/bin/{c}" if c in commands else None,
                docker_version=lambda: docker)


def test_a_fresh_debian_gets_every_package():
    assert missing(PACKAGES, **machine()) == PACKAGES


def test_dockers_own_packages_are_used_not_replaced():
    """docker-ce + containerd.io: dockerd, docker, containerd, ctr and runc on PATH, no Debian package of theirs."""
    ce = machine(packages={"iptables"}, commands={"dockerd", "docker", "containerd", "ctr", "runc"})
    assert missing(PACKAGES, **ce) == ["etcd-server"]


def test_a_docker_too_old_is_refused_not_replaced():
    with pytest.raises(TooOld, match="dockerd 19.3 .* older than 20.10"):
        missing(PACKAGES, **machine(commands={"dockerd", "docker"}, docker=(19, 3)))


def test_debians_packages_already_installed_are_kept():
    assert missing(PACKAGES, **machine(packages=set(PACKAGES))) == []
