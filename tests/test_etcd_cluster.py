"""etcd as a real cluster (three members on the lab's switch): the member the daemons talk to first hangs (SIGSTOP,
neither answering nor refusing) under traffic. Nothing is lost, a host joining meanwhile gets its lease, and lease
events keep reaching the kernels at once, through the other member each daemon watches too."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest

from lab import wait_until

pytestmark = pytest.mark.lab


@pytest.mark.parametrize("etcd_api, fault", [("v2", "hung"), ("v3", "hung"), ("v3", "killed")])
def test_a_hung_or_killed_etcd_member_stops_nothing(make_lab, etcd_api, fault):
    """hung: SIGSTOP (neither answers nor refuses); killed: SIGKILL (refuses connections)."""
    lab = make_lab(3, etcd=False, etcd_api=etcd_api)
    first = lab.start_etcd_cluster(3)[0]
    lab.set_config()
    h1, h2, h3 = lab.hosts
    for host in (h1, h2):
        host.start_daemon()
        host.add_bridge()
    c1, c2 = h1.add_container(), h2.add_container()
    pinger = subprocess.Popen(["ip", "netns", "exec", c1.ns, "ping", "-i", "0.1", "-w", "25", "-W", "1", c2.ip],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1)
    os.kill(first.pid, signal.SIGSTOP if fault == "hung" else signal.SIGKILL)
    try:
        hung = time.monotonic()
        h3.start_daemon(wait_ready=False)
        wait_until("h3's lease", lambda: h3.subnet_file.exists(), timeout=120, interval=0.1)
        leased = time.monotonic() - hung
        subnet = h3.subnet_env()["FLANNEL_SUBNET"].rsplit(".", 1)[0] + ".0/"
        wait_until("h3's subnet in h1's and h2's kernels", lambda: all(
            subnet in host.sh("ip", "route", "show", "proto", "77") for host in (h1, h2)), timeout=300, interval=0.1)
        reached = time.monotonic() - hung - leased
    finally:
        if fault == "hung":
            os.kill(first.pid, signal.SIGCONT)
    out, _ = pinger.communicate(timeout=60)
    sent, received = (int(x) for x in re.search(r"(\d+) packets transmitted, (\d+) received", out).groups())
    print(f"\n{etcd_api}: first member {fault}: a new host leased in {leased:.1f} s, its lease reached the peers' kernels "
          f"{reached:.2f} s later; {sent - received} of {sent} pings lost")
    assert received == sent
    # a joining host orders the members by a 1 s probe; the peers watch through two members at once, so the other
    # one reports the new lease at once
    assert leased < 4 and reached < 1
