"""Swarm services on a pyflannel network, with the managed plugin (swarm refuses a legacy socket plugin), on real
engines: `pyflannel swarm-network` makes the config-only network on each node and the swarm network on a manager;
a replicated service spreads over two nodes whose tasks reach each other, an attachable container reaches it by
name (round robin: swarm gives a local-scope driver's network no virtual IP); scaling and `service rm` leave nothing
in the driver's state; a node that joins later serves tasks once the command ran there; `docker stack deploy` with
the swarm network as an external network. A swarm network made without a config-only network is refused with the
commands to run."""
from __future__ import annotations

import ipaddress
import json

import pytest

from lab import IMAGE, Lab, wait_until
from tests.test_plugin import PLUGIN, host_pyflannel, install

pytestmark = [pytest.mark.lab, pytest.mark.docker]
SWARM_TIMEOUT = 120  # a task's start through swarm's dispatcher, on a busy 2-core machine
HTTPD = ("httpd", "-f", "-p", "80", "-h", "/www")


def node_id(host) -> str:
    return host.docker("info", "-f", "{{.Swarm.NodeID}}").strip()


def swarm_network(host, name: str) -> str:
    """`pyflannel swarm-network NAME` on `host`, as a user runs it: the host's pyflannel from the plugin."""
    done = host_pyflannel(host, "swarm-network", name)
    assert done.returncode == 0, done.stderr
    return done.stdout


def tasks(manager, service: str) -> list[dict]:
    """The tasks of `service` that swarm wants running, as `docker inspect` shows them."""
    ids = manager.docker("service", "ps", "-q", "-f", "desired-state=running", service).split()
    return json.loads(manager.docker("inspect", "--type", "task", *ids)) if ids else []


def task_errors(manager, service: str) -> list[tuple[str, str]]:
    """(node ID, error) of each of the service's tasks (also the ended ones) that failed."""
    ids = manager.docker("service", "ps", "-q", service).split()
    return [(t["NodeID"], t["Status"]["Err"]) for t in json.loads(manager.docker("inspect", "--type", "task", *ids))
            if t["Status"].get("Err")]


def running_on(manager, service: str) -> list[str]:
    """The node IDs of the service's running tasks."""
    return sorted(t["NodeID"] for t in tasks(manager, service) if t["Status"]["State"] == "running")


def leases(lab, flannel: str) -> list[ipaddress.IPv4Network]:
    return [ipaddress.IPv4Network(key.replace("-", "/")) for key in lab.leases(flannel)]


def lookup(host, network: str, name: str) -> list[str]:
    """The addresses Docker's embedded DNS gives `name`, asked from an attachable container on `network`."""
    out = host.docker("run", "--rm", "--network", network, IMAGE, "nslookup", name, "127.0.0.11", check=False)
    return sorted(line.split()[-1] for line in out.splitlines() if line.startswith("Address")
                  and not line.endswith(":53"))  # the server's own address


def removed(host, network: str) -> bool:
    host.docker("network", "rm", network, check=False)  # refused while the removed service's last task ends
    return network not in host.docker("network", "ls", "--format", "{{.Name}}").split()


def driver_state(host) -> dict:
    """The driver's state file (none yet: the driver never stored anything)."""
    path = host.workdir / "var-lib" / "pyflannel" / "driver" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {"networks": {}, "pools": {}, "endpoints": {}}


@pytest.fixture(scope="module")
def swarm_lab(plugin_build, docker_engine):
    """Three hosts with the plugin enabled; h1 manages a swarm that h2 joined; h3 joins later (its test)."""
    with Lab(3) as lab:
        lab.set_config()
        for host in lab.hosts:
            install(host, plugin_build, docker_engine)
            host.docker("plugin", "enable", "pyflannel", timeout=60)
        h1, h2, _ = lab.hosts
        h1.docker("swarm", "init", "--advertise-addr", h1.ip)
        lab.join_token = h1.docker("swarm", "join-token", "-q", "worker").strip()
        h2.docker("swarm", "join", "--token", lab.join_token, f"{h1.ip}:2377")
        for host in (h2, h1):
            out = swarm_network(host, "svcnet")
            assert "svcnet-config: config-only network made" in out
        assert "svcnet: swarm network made" in out  # h1, the manager, last
        yield lab


def test_a_swarm_network_without_config_only_network_is_refused_with_the_commands(swarm_lab):
    h1 = swarm_lab.hosts[0]
    h1.docker("network", "create", "--scope", "swarm", "--attachable", "-d", PLUGIN, "--ipam-driver", PLUGIN,
              "--ipam-opt", "pyflannel.network=naive", "naive")
    h1.docker("service", "create", "--detach", "--name", "naive", "--network", "naive", "--no-resolve-image",
              "--constraint", f"node.id=={node_id(h1)}", IMAGE, "sleep", "3600")
    try:
        error = wait_until("the task refused", lambda: next((err for _, err in task_errors(h1, "naive")), ""),
                           timeout=SWARM_TIMEOUT, interval=1)
        assert "comes from Docker's default IPAM" in error
        assert "run `pyflannel swarm-network NAME` on every node" in error
        assert (f"`docker network create --config-only --ipam-driver {PLUGIN} --ipam-opt pyflannel.network=NAME "
                f"NAME-config` on every node, then `docker network create -d {PLUGIN} --scope swarm --attachable "
                f"--config-from NAME-config NAME` on a manager") in error
    finally:
        h1.docker("service", "rm", "naive")
        wait_until("naive removed", lambda: removed(h1, "naive"), timeout=60, interval=1)
    assert not driver_state(h1)["networks"]


def test_a_service_spreads_over_two_nodes_and_answers_by_name(swarm_lab):
    h1, h2, _ = swarm_lab.hosts
    h1.docker("service", "create", "--detach", "--name", "web", "--network", "svcnet", "--replicas", "2",
              "--no-resolve-image", IMAGE, *HTTPD)
    try:
        wait_until("web on both nodes", lambda: running_on(h1, "web") == sorted([node_id(h1), node_id(h2)]),
                   timeout=SWARM_TIMEOUT, interval=1)
        addresses = wait_until("tasks.web", lambda: len(lookup(h1, "svcnet", "tasks.web")) == 2
                               and lookup(h1, "svcnet", "tasks.web"), timeout=30, interval=1)
        flannel = leases(swarm_lab, "svcnet")
        assert all(any(ipaddress.IPv4Address(a) in lease for lease in flannel) for a in addresses), (addresses, flannel)
        assert lookup(h2, "svcnet", "web") == addresses  # no virtual IP: the name gives the tasks, round robin
        task = h2.docker("ps", "-q", "-f", "name=web.").split()[0]
        out = h2.docker("exec", task, "sh", "-c", " ; ".join(f"wget -O- http://{a}/" for a in addresses))
        assert out.count("hello from pyflannel") == 2  # the task on h2 reaches itself and the one on h1
        out = h1.docker("run", "--rm", "--network", "svcnet", IMAGE, "sh", "-c", "wget -O- http://web/")
        assert "hello from pyflannel" in out
    finally:
        h1.docker("service", "rm", "web")


def test_scale_up_and_down_and_rm_leave_nothing_in_the_driver(swarm_lab):
    h1, h2, _ = swarm_lab.hosts
    h1.docker("service", "create", "--detach", "--name", "api", "--network", "svcnet", "--replicas", "4",
              "--endpoint-mode", "dnsrr", "--no-resolve-image", IMAGE, *HTTPD)
    try:
        wait_until("4 tasks", lambda: len(running_on(h1, "api")) == 4, timeout=SWARM_TIMEOUT, interval=1)
        h1.docker("service", "scale", "--detach", "api=1")
        wait_until("1 task", lambda: len(running_on(h1, "api")) == 1 and sum(
            len(driver_state(h)["endpoints"]) for h in (h1, h2)) == 1, timeout=SWARM_TIMEOUT, interval=1)
        h1.docker("service", "scale", "--detach", "api=3")
        wait_until("3 tasks", lambda: len(running_on(h1, "api")) == 3 and sum(
            len(driver_state(h)["endpoints"]) for h in (h1, h2)) == 3, timeout=SWARM_TIMEOUT, interval=1)
        assert len(lookup(h2, "svcnet", "api")) == 3  # --endpoint-mode dnsrr: the same answer as vip here
    finally:
        h1.docker("service", "rm", "api")
    # the last task gone, each node drops its instance of the swarm network: the driver's networks, pools and
    # endpoints go, and pyflanneld leaves the flannel network (its lease goes from etcd)
    wait_until("the driver's state empty", lambda: all(
        not any(driver_state(h)[k] for k in ("networks", "pools", "endpoints")) for h in (h1, h2)), timeout=60,
        interval=1)
    wait_until("svcnet's leases gone", lambda: not swarm_lab.leases("svcnet"), timeout=30, interval=1)


def test_a_node_that_joins_later_serves_tasks_once_it_ran_swarm_network(swarm_lab):
    h1, _, h3 = swarm_lab.hosts
    h3.docker("swarm", "join", "--token", swarm_lab.join_token, f"{h1.ip}:2377")
    h1.docker("service", "create", "--detach", "--name", "everywhere", "--mode", "global", "--network", "svcnet",
              "--no-resolve-image", IMAGE, *HTTPD)
    try:
        h3_id = node_id(h3)

        error = wait_until("h3's task refused", lambda: next((err for node, err in task_errors(
            h1, "everywhere") if node == h3_id), ""), timeout=SWARM_TIMEOUT, interval=1)
        assert "svcnet-config" in error  # Docker's own words: the configuration network does not exist
        out = swarm_network(h3, "svcnet")
        assert "svcnet-config: config-only network made" in out and "this node is a worker" in out
        wait_until("everywhere on all three", lambda: len(set(running_on(h1, "everywhere"))) == 3,
                   timeout=SWARM_TIMEOUT, interval=1)
        addresses = wait_until("tasks.everywhere", lambda: len(lookup(h3, "svcnet", "tasks.everywhere")) == 3
                               and lookup(h3, "svcnet", "tasks.everywhere"), timeout=30, interval=1)
        task = h3.docker("ps", "-q", "-f", "name=everywhere.").split()[0]
        out = h3.docker("exec", task, "sh", "-c", " ; ".join(f"wget -O- http://{a}/" for a in addresses))
        assert out.count("hello from pyflannel") == 3
    finally:
        h1.docker("service", "rm", "everywhere")


def test_stack_deploy_with_the_swarm_network_as_external(swarm_lab):
    h1, h2, _ = swarm_lab.hosts
    compose = swarm_lab.workdir / "stack.yml"
    compose.write_text(
        'version: "3.8"\n'
        "services:\n"
        "  api:\n"
        f"    image: {IMAGE}\n"
        f"    command: {' '.join(HTTPD)}\n"
        "    deploy: {replicas: 2}\n"
        "    networks: [svcnet]\n"
        "networks:\n"
        "  svcnet: {external: true}\n")
    h1.docker("stack", "deploy", "--resolve-image", "never", "-c", str(compose), "shop")
    try:
        wait_until("shop_api's 2 tasks", lambda: len(running_on(h1, "shop_api")) == 2, timeout=SWARM_TIMEOUT,
                   interval=1)
        out = h2.docker("run", "--rm", "--network", "svcnet", IMAGE, "sh", "-c", "wget -O- http://shop_api/")
        assert "hello from pyflannel" in out
    finally:
        h1.docker("stack", "rm", "shop")
