"""`pyflannel` as a CNI plugin: ADD, DEL, CHECK, VERSION.

ADD builds flannel's delegate config from the conflist and subnet.env, saves it under dataDir/<container id>, and
attaches natively (bridge + host-local, see bridge.py) or runs the delegate plugin. DEL and CHECK use the saved
config, so they work with what ADD did even when subnet.env is gone. Every failure is a CNI error on stdout, exit 1.

bridge.py (and with it pyroute2, most of the plugin's imports) is imported only when netlink work is due, so VERSION,
config errors and a DEL with nothing to do answer at once. Usually none of this starts for a call: the thin client
(thin.py) hands it to pyflanneld, which runs `run` with everything loaded already.
"""
from __future__ import annotations

import json
import os
import sys

from . import delegate, netconf
from .protocol import (COMMANDS, INTERNAL, INVALID_ENVIRONMENT, LATEST_VERSION, UNKNOWN_CONTAINER, CniError,
                       Request, read_request, render_result, version_reply)


def add(req: Request, conf: netconf.FlannelConf, environ: dict) -> dict:
    env = netconf.read_subnet_env(conf)
    config = netconf.build_delegate(conf, env)
    saved = netconf.SavedDelegates(conf.data_dir)
    first = saved.load(req.container_id) is None
    saved.save(req.container_id, config)
    try:
        if netconf.why_not_native(config) is None:
            from . import bridge
            result = render_result(bridge.add(bridge.BridgeConf.from_delegate(config), req.container_id, req.ifname,
                                              req.netns, (env.network, env.ipv6_network)), req.version)
        else:
            result = delegate.run("ADD", config, environ, req.cni_path)
        if config["type"] == "bridge":
            from . import walls
            walls.ensure(config.get("bridge", netconf.DEFAULT_BRIDGE), env)
        return result
    except BaseException:
        if first:  # a failed repeated ADD must not lose the config of the attachment that exists
            saved.remove(req.container_id)
        raise


def delete(req: Request, conf: netconf.FlannelConf, environ: dict) -> None:
    saved = netconf.SavedDelegates(conf.data_dir)
    config = saved.load(req.container_id)
    if config is None:  # never added, or deleted already
        return
    if netconf.why_not_native(config) is None:
        from . import bridge
        bridge.delete(bridge.BridgeConf.from_delegate(config), req.container_id, req.ifname, req.netns)
    else:
        delegate.run("DEL", config, environ, req.cni_path)
    saved.remove(req.container_id)


def check(req: Request, conf: netconf.FlannelConf, environ: dict) -> None:
    config = netconf.SavedDelegates(conf.data_dir).load(req.container_id)
    if config is None:
        raise CniError(UNKNOWN_CONTAINER, f"container {req.container_id} was not added to {conf.name}",
                       f"no saved config in {conf.data_dir}")
    prev_result = req.config.get("prevResult")
    if netconf.why_not_native(config) is None:
        from . import bridge
        bridge.check(bridge.BridgeConf.from_delegate(config), req.container_id, req.ifname, req.netns,
                     prev_result if isinstance(prev_result, dict) else None)
    else:
        delegate.run("CHECK", {**config, "prevResult": prev_result}, environ, req.cni_path)


HANDLERS = {"ADD": add, "DEL": delete, "CHECK": check}


def main() -> int:
    code, answer = run(dict(os.environ), sys.stdin.buffer.read())
    if answer:
        sys.stdout.write(answer)
    return code


def run(environ: dict, stdin: bytes) -> tuple[int, str]:
    """One CNI call: (exit code, what goes to stdout). Run here, or in pyflanneld for the thin client (thin.py)."""
    command = environ.get("CNI_COMMAND", "")
    version = LATEST_VERSION
    try:
        if command == "VERSION":
            answer = version_reply()
        elif command not in COMMANDS:
            raise CniError(INVALID_ENVIRONMENT, f"CNI_COMMAND={command!r}: expected one of {', '.join(COMMANDS)}",
                           "this is a CNI plugin, run by a container runtime (containerd, CRI-O, ...)")
        else:
            req = read_request(environ, stdin)
            version = req.version
            answer = HANDLERS[command](req, netconf.parse(req.config), environ)
    except CniError as e:
        answer, code = e.to_json(version), 1
    except Exception as e:  # noqa: BLE001 - a bug: still a CNI error, never a traceback
        answer, code = CniError(INTERNAL, f"internal error: {type(e).__name__}: {e}").to_json(version), 1
    else:
        code = 0
    return code, json.dumps(answer) + "\n" if answer is not None else ""
