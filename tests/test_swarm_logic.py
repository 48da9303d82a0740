"""Swarm without Docker: the commands `pyflannel swarm-network` runs and the driver's refusal shows, and which
CreateNetwork pools are refused as a swarm network made with Docker's default IPAM (tests/test_swarm.py: real
swarms)."""
from __future__ import annotations

import ipaddress

import pytest

from pyflannel import cli
from pyflannel.driver import errors
from pyflannel.driver import validation as v
from pyflannel.driver.errors import RefusedError
from pyflannel.driver.network import check_pool

pytestmark = pytest.mark.unit
LEASE = ipaddress.IPv4Interface("10.5.35.1/24")
SWARM_ID = "pudsh6e3q35295laibafbiosp"  # a network ID swarm's managers made (dockerd's own: 64 hex)
LOCAL_ID = "c29e7ce3430f0eeb823a559784c14f1520b9095b756bde1a503ddb7a1003d287"


def pool(address_space: str, cidr: str = "172.22.0.0/16") -> v.IPAMData:
    return v.IPAMData(address_space=address_space, pool=ipaddress.IPv4Network(cidr), gateway=None, aux_addresses={})


def test_swarm_commands_are_the_config_only_network_and_the_swarm_network_made_from_it():
    config_only, swarm = v.swarm_commands("svcnet", "svc", "pyflannel:latest", ("pyflannel.backend=wireguard",),
                                          ("encrypted=",))
    assert config_only == ["docker", "network", "create", "--config-only", "--ipam-driver", "pyflannel:latest",
                           "--ipam-opt", "pyflannel.network=svc", "--ipam-opt", "pyflannel.backend=wireguard",
                           "-o", "encrypted=", "svcnet-config"]
    assert swarm == ["docker", "network", "create", "-d", "pyflannel:latest", "--scope", "swarm", "--attachable",
                     "--config-from", "svcnet-config", "svcnet"]


def test_a_swarm_network_on_dockers_default_ipam_is_refused_with_the_commands(monkeypatch):
    monkeypatch.setattr(errors, "plugin_name", "pyflannel:latest")
    with pytest.raises(RefusedError) as refused:
        check_pool(pool("LocalDefault"), LEASE, SWARM_ID)
    message = str(refused.value)
    assert message.startswith("subnet 172.22.0.0/16 comes from Docker's default IPAM")
    assert "`pyflannel swarm-network NAME` on every node" in message
    assert ("`docker network create --config-only --ipam-driver pyflannel:latest --ipam-opt pyflannel.network=NAME "
            "NAME-config` on every node, then `docker network create -d pyflannel:latest --scope swarm --attachable "
            "--config-from NAME-config NAME` on a manager") in message


@pytest.mark.parametrize("data, network_id", [(pool("LocalDefault"), LOCAL_ID),       # a local network, --subnet
                                              (pool("pyflannel-local", "10.5.36.0/24"), SWARM_ID)])  # lease moved
def test_other_foreign_pools_keep_the_lease_message(data, network_id):
    with pytest.raises(RefusedError, match="is not this host's flannel lease 10.5.35.0/24"):
        check_pool(data, LEASE, network_id)


def test_swarm_network_refuses_a_flannel_name_that_cannot_be_one(capsys):
    assert cli.main(["swarm-network", "config"]) == 1
    assert "--network: network name 'config' is reserved" in capsys.readouterr().err
