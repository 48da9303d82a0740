"""The CNI plugin as runtimes run it: a thin client that hands the call to pyflanneld, which has pyroute2 loaded and
runs it in-process (`POST /v1/cni`, cni/main.py's `run`). Only the standard library and localapi are imported, so the
plugin starts in the time of a bare interpreter instead of unpacking and importing the whole plugin on every call.

When nothing answers on the daemon socket (the config's "daemonSocket", default /run/flannel/pyflanneld.sock), the
call is not lost: the complete plugin beside this file (pyflannel-inprocess, the pyinstaller binary) runs it, so a
CNI call never fails because pyflanneld is down. A daemon that took the call but gave no answer is a CNI error
(try again later): the call may have been made, and running it twice is not safe.

`make cni` builds this as dist/cni/pyflannel, a zipapp run by `/usr/bin/python3 -IS`.
"""
from __future__ import annotations

import json
import os
import sys

from pyflannel import localapi, paths

IN_PROCESS = "pyflannel-inprocess"
CNI_SECONDS = 60.0
TRY_AGAIN_LATER = 11  # CNI's error code (cni/protocol.py has them all; not imported: start-up time)


def daemon_socket(stdin: bytes) -> str:
    try:
        config = json.loads(stdin)
    except ValueError:
        config = None  # the plugin itself names what is wrong with it
    socket_path = config.get("daemonSocket") if isinstance(config, dict) else None
    return socket_path if isinstance(socket_path, str) and socket_path else paths.DAEMON_SOCKET


def error(message: str) -> int:
    sys.stdout.write(json.dumps({"cniVersion": "1.0.0", "code": TRY_AGAIN_LATER, "msg": message}) + "\n")
    return 1


def in_process(stdin: bytes) -> int:
    """Replace this process by the complete plugin, with the same environment and stdin (a memfd holding it)."""
    plugin = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), IN_PROCESS)
    if not os.access(plugin, os.X_OK):
        return error(f"pyflanneld does not answer, and the in-process plugin {plugin} is missing: start pyflanneld, "
                     f"or install {IN_PROCESS} beside this plugin")
    fd = os.memfd_create("cni-stdin")
    os.write(fd, stdin)
    os.lseek(fd, 0, os.SEEK_SET)
    os.dup2(fd, 0)
    os.execv(plugin, [plugin])


def main() -> int:
    stdin = sys.stdin.buffer.read()
    environ = {k: v for k, v in os.environ.items() if k.startswith("CNI_") or k == "PATH"}
    try:
        answer = localapi.Client(daemon_socket(stdin), timeout=CNI_SECONDS).cni(environ, stdin)
    except localapi.DaemonUnreachable:
        return in_process(stdin)
    except localapi.DaemonError as e:
        return error(str(e))
    sys.stdout.write(answer.get("output", ""))
    return answer.get("code", 1)
