"""This host's container names for pyflanneld: watch the local dockerd, hand over the whole set at every change.

For every running container on a pyflannel network: its name, its network aliases (compose adds the service name;
dockerd 26 also lists them as DNSNames) and its addresses, per flannel network. pyflanneld keeps them in etcd and
answers them over DNS on every host (daemon/names.py, daemon/dns.py).

It runs in threads of the driver's worker (each worker, with --workers above 1: the set sent is the same), never in
a request handler: calling the Docker API from one can deadlock dockerd during its start-up
(projectcalico/libnetwork-plugin#49). One follows Docker's events and marks
a change; another sends the set after each change, and every RESYNC_SECONDS in any case; a third asks pyflanneld
every CHECK_SECONDS how many containers it holds, so that a restarted one gets the set back at once.
"""
from __future__ import annotations

import logging
import threading
import time

import docker
from docker.errors import DockerException
from requests.exceptions import RequestException

from pyflannel import localapi

from .records import NetworkRecord
from .state import StateError, StateStore

log = logging.getLogger(__name__)

RESYNC_SECONDS = 30.0
CHECK_SECONDS = 2.0
RETRY_SECONDS = 2.0
SETTLE_SECONDS = 0.05  # events come in bursts (a container's die, disconnect, stop): one snapshot for the burst
ACTIONS = {"start", "die", "stop", "kill", "destroy", "connect", "disconnect", "rename", "restart", "unpause"}


def containers_of(client: docker.DockerClient, networks: dict[str, NetworkRecord]) -> list[dict]:
    """[{"id", "networks": {flannel network ("" = default): {"address", "names"[, "address6"]}}}] of the running
    containers on `networks` (the driver's state: Docker network id -> record); "address6" on --ipv6 networks."""
    found = []
    for container in client.containers.list():
        on = {}
        for endpoint in (container.attrs.get("NetworkSettings", {}).get("Networks") or {}).values():
            record = networks.get(endpoint.get("NetworkID"))
            if record is None or not endpoint.get("IPAddress"):
                continue
            names = {container.name, *(endpoint.get("Aliases") or ()), *(endpoint.get("DNSNames") or ())}
            on[record.flannel] = {"address": endpoint["IPAddress"], "names": sorted(names)}
            if endpoint.get("GlobalIPv6Address"):
                on[record.flannel]["address6"] = endpoint["GlobalIPv6Address"]
        if on:
            found.append({"id": container.id, "networks": on})
    return found


class NamePublisher:
    def __init__(self, docker_url: str, state: StateStore, daemon: localapi.Client):
        self.docker_url = docker_url
        self.state = state
        self.daemon = daemon
        self.host = localapi.host_identity()  # said with each set: pyflanneld refuses a set from another host
        self.changed = threading.Event()
        self.sent: list | None = None
        self.refused: str | None = None  # pyflanneld's last refusal, said once

    def start(self) -> None:
        threading.Thread(target=self._follow_events, name="docker-events", daemon=True).start()
        threading.Thread(target=self._send, name="names", daemon=True).start()
        threading.Thread(target=self._follow_daemon, name="names-check", daemon=True).start()
        log.info("publishing container names from the Docker engine at %s", self.docker_url)

    def _client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.docker_url, timeout=10)

    def _follow_events(self) -> None:
        complained = False
        while True:
            try:
                client = self._client()
                self.changed.set()  # (re)connected: whatever happened meanwhile is in the next snapshot
                for event in client.events(decode=True, filters={"type": ["container", "network"]}):
                    if event.get("Action", "").split(":")[0] in ACTIONS:
                        self.changed.set()
            except (DockerException, RequestException, OSError) as e:
                if not complained:
                    log.warning("Docker events from %s: %s; trying again every %.0f s", self.docker_url, e,
                                RETRY_SECONDS)
                complained = True
            time.sleep(RETRY_SECONDS)

    def _follow_daemon(self) -> None:
        """A restarted pyflanneld holds none of our containers: send them again at once (one cheap call a check)."""
        while True:
            time.sleep(CHECK_SECONDS)
            try:
                if self.sent and self.daemon.published() != len(self.sent):
                    self.changed.set()
            except localapi.DaemonError:
                pass

    def _send(self) -> None:
        while True:
            self.changed.wait(RESYNC_SECONDS)
            time.sleep(SETTLE_SECONDS)
            self.changed.clear()
            try:
                containers = containers_of(self._client(), self.state.load().networks)
                self.daemon.publish(containers, self.host)
            except (DockerException, RequestException, OSError, StateError, localapi.DaemonError) as e:
                if isinstance(e, localapi.DaemonError) and e.status == 409:  # another host's pyflanneld
                    if str(e) != self.refused:
                        log.error("names not published: %s", e)
                    self.refused = str(e)
                else:  # pyflanneld or dockerd restarting: the next try will do
                    log.debug("names not published: %s", e)
                time.sleep(RETRY_SECONDS)
                self.changed.set()
                continue
            self.refused = None
            if containers != self.sent:
                log.info("published the names of %d container(s)", len(containers))
                self.sent = containers
