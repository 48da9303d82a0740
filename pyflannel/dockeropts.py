"""`pyflannel docker-opts`: what flannel's mk-docker-opts.sh writes, for the classic host whose docker0 holds the
lease (`dockerd --bip=$FLANNEL_SUBNET`): the same options, file and format, so units written for flannel keep
working (`EnvironmentFile=/run/docker_opts.env`, `ExecStart=/usr/bin/dockerd $DOCKER_OPTS`)."""
from __future__ import annotations

from dataclasses import dataclass

from pyflannel.subnetenv import SubnetEnv

DOCKER_ENV = "/run/docker_opts.env"


@dataclass(frozen=True)
class Choice:
    """mk-docker-opts.sh's switches: -i, -c (both when neither is given), -k KEY, -m."""
    individual: bool = True
    combined: bool = True
    key: str = "DOCKER_OPTS"
    ip_masq: bool = True


def options(env: SubnetEnv, ip_masq: bool = True) -> dict[str, str]:
    """DOCKER_OPT_<NAME> -> the dockerd option, in the script's order (its `set | grep` sorts them). Docker
    masquerades only when flannel does not (FLANNEL_IPMASQ=false), so that traffic is masqueraded once."""
    opts = {}
    if env.lease is not None:
        opts["DOCKER_OPT_BIP"] = f"--bip={env.subnet}"
    if ip_masq:
        opts["DOCKER_OPT_IPMASQ"] = f"--ip-masq={'false' if env.ipmasq else 'true'}"
    opts["DOCKER_OPT_MTU"] = f"--mtu={env.mtu}"
    return opts


def render(env: SubnetEnv, choice: Choice = Choice(), existing: str = "") -> str:
    """The file's text. `existing`: the combined key's value in the caller's environment, which the script keeps
    in front, as it does."""
    opts = options(env, choice.ip_masq)
    lines = [f'{name}="{value}"' for name, value in opts.items()] if choice.individual else []
    if choice.combined:
        combined = (existing + " " if existing else "") + "".join(" " + value for value in opts.values())
        lines.append(f'{choice.key}="{combined}"')
    return "".join(line + "\n" for line in lines)
