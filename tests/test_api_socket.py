"""One pyflanneld per API socket, names from their own host only, on the lab: two hosts that share a folder for the
socket (as two lab hosts sharing /run did) no longer hand one host's driver to the other's pyflanneld."""
import signal

import pytest

from pyflannel.localapi import Client
from lab import VENV_BIN, wait_until

pytestmark = pytest.mark.lab

PUBLISH = ("from pyflannel.localapi import Client, host_identity; import sys; "
           "Client(sys.argv[1]).publish([{'id': 'c1', 'networks': {'': {'address': sys.argv[2], 'names': ['web']}}}], "
           "host_identity())")


def test_a_second_daemon_on_a_live_socket_exits_naming_the_flag(make_lab):
    lab = make_lab(2)
    lab.set_config()
    h1, h2 = lab.hosts
    h1.start_daemon()
    second = h2.start_daemon("-api-socket", str(h1.api_sock), wait_ready=False)  # the later flag wins
    wait_until("the second pyflanneld to exit", lambda: not second.alive(), timeout=30)
    lines = [line for line in second.log().splitlines() if "ERROR" in line]
    assert second.popen.returncode == 1 and len(lines) == 1, second.log()
    assert lines[0].endswith(f"another pyflanneld answers on {h1.api_sock}: give this one another -api-socket")
    assert "Traceback" not in second.log() and not h2.subnet_file.exists()
    assert [n["state"] for n in Client(str(h1.api_sock)).networks()] == ["ready"]  # the first still answers

    h1.daemon.kill(signal.SIGKILL)  # its socket file stays, nobody listening: the next daemon takes it over
    h1.start_daemon()
    wait_until("the restarted pyflanneld answering", lambda: [n["state"] for n in Client(str(h1.api_sock)).networks()]
               == ["ready"], timeout=30)


def test_names_published_from_another_host_are_refused(make_lab):
    lab = make_lab(2)
    lab.set_config()
    h1, h2 = lab.hosts
    h1.start_daemon()
    address = h1.subnet_env()["FLANNEL_SUBNET"].replace(".1/24", ".2")
    foreign = "10.5.99.2" if address != "10.5.99.2" else "10.5.98.2"  # a container address h1 cannot have
    h1.sh(str(VENV_BIN / "python"), "-c", PUBLISH, str(h1.api_sock), address)
    assert Client(str(h1.api_sock)).published() == 1
    with pytest.raises(RuntimeError) as refused:  # h2's driver, given h1's socket
        h2.sh(str(VENV_BIN / "python"), "-c", PUBLISH, str(h1.api_sock), foreign)
    assert "names published from another host (network namespace net:[" in str(refused.value)
    assert "-api-socket" in str(refused.value)
    assert Client(str(h1.api_sock)).published() == 1  # h1's container is kept
    names = Client(str(h1.api_sock)).names()
    assert foreign not in str(names) and address in str(names)
