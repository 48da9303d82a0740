"""`make demo`: the product's main job on one machine — two hosts, overlay0, HTTP from host A to host B, and the
same web server published on host B's address (-p 8080:80) for the world.

`python -m lab.demo up` builds the lab and leaves it running; `python -m lab.demo down` removes it.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from lab import IMAGE, Lab, teardown

RECORD = Path("/run/pyflannel-demo.json")


def say(text: str) -> None:
    print(f"==> {text}", flush=True)


def up() -> int:
    if RECORD.exists():
        say(f"a demo is already running ({RECORD}); `make demo-down` first")
        return 1
    lab = Lab(2)
    try:
        RECORD.write_text(json.dumps(lab.record()))
        lab.set_config({"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan"}})
        say(f"etcd on {lab.etcd_url} (namespace {lab.switch}), network config 10.5.0.0/16, vxlan")
        for host in lab.hosts:
            host.start_daemon()
            host.start_driver()
            host.start_dockerd()
            env = host.subnet_env()
            say(f"host {host.name.upper()} (namespace {host.ns}, underlay {host.ip}): lease {env['FLANNEL_SUBNET']}, "
                f"MTU {env['FLANNEL_MTU']}; pyflanneld, pyflannel-driver and dockerd running")
        RECORD.write_text(json.dumps(lab.record()))
        for host in lab.hosts:
            host.docker("network", "create", "-d", "pyflannel", "--ipam-driver", "pyflannel", "overlay0")
        say("docker network create -d pyflannel --ipam-driver pyflannel overlay0   (on both hosts)")
        a, b = lab.hosts
        b.docker("run", "-d", "--name", "web", "--network", "overlay0", "-p", "8080:80", IMAGE, "httpd", "-f", "-p",
                 "80", "-h", "/www")
        web_ip = json.loads(b.docker("inspect", "web"))[0]["NetworkSettings"]["Networks"]["overlay0"]["IPAddress"]
        say(f"host B: container 'web' (busybox httpd) at {web_ip}, published on {b.ip}:8080")
        page = a.docker("run", "--rm", "--network", "overlay0", IMAGE, "sh", "-c",
                        f"echo \"client address: $(ip -4 -o addr show eth0 | awk '{{print $4}}')\"; "
                        f"wget -O- http://{web_ip}/ 2>/dev/null")
        for line in page.strip().splitlines():
            say(f"host A: {line}")
        RECORD.write_text(json.dumps(lab.record()))
        published = subprocess.run(["ip", "netns", "exec", a.ns, "timeout", "5", "busybox", "wget", "-q", "-O-",
                                    f"http://{b.ip}:8080/"], capture_output=True, text=True).stdout
        overlay_ok, published_ok = "hello from pyflannel" in page, "hello from pyflannel" in published
        ok = overlay_ok and published_ok
        say(f"HTTP from a container on host A to a container on host B: {'OK' if overlay_ok else 'FAILED'}")
        say(f"HTTP from host A itself to host B's published port {b.ip}:8080: {'OK' if published_ok else 'FAILED'}")
        say(f"try: ip netns exec {a.ns} docker -H unix://{a.docker_sock} run --rm --network overlay0 {IMAGE} "
            f"ping -c1 {web_ip}")
        for host in lab.hosts:
            say(f"host {host.name.upper()}'s view: {shlex.join(host.pyflannel_argv('status'))}")
            say(f"host {host.name.upper()}'s check: {shlex.join(host.pyflannel_argv('doctor'))}")
        status = subprocess.run(a.pyflannel_argv("status"), capture_output=True, text=True).stdout
        say(f"host A's view says: {status.splitlines()[0] if status else 'nothing'}")
        say("tear down with: make demo-down")
        return 0 if ok else 1
    except BaseException as e:
        say(f"demo failed: {e}")
        print(lab.logs()[-3000:], file=sys.stderr)
        lab.close()
        RECORD.unlink(missing_ok=True)
        return 1


def down() -> int:
    if not RECORD.exists():
        say("no demo running")
        return 0
    record = json.loads(RECORD.read_text())
    teardown(record)
    RECORD.unlink()
    say(f"removed {len(record['namespaces'])} namespaces and every process of the demo")
    return 0


if __name__ == "__main__":
    commands = {"up": up, "down": down}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        print("usage: python -m lab.demo up|down", file=sys.stderr)
        sys.exit(2)
    sys.exit(commands[sys.argv[1]]())
