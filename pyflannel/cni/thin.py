"""The CNI plugin as runtimes run it: a thin client that hands the call to pyflanneld, which has pyroute2 loaded and
runs it in-process (cni/main.py's `run`). It imports nothing but os, sys and _socket, so it starts in about the time
of a bare interpreter (json and socket would double that), instead of unpacking and importing the whole plugin.

The exchange, on pyflanneld's local API socket (see localapi.py):
    POST /v1/cni HTTP/1.0          one `CNI-Env: NAME=value` header per CNI_* variable (and PATH),
                                   the body is the plugin's stdin (the network config) as the runtime gave it
    200, `CNI-Exit-Code: N`        the body is what the plugin writes to stdout

When nothing answers on the daemon socket (the config's "daemonSocket", default /run/flannel/pyflanneld.sock), or
pyflanneld answers 404 (it runs no CNI calls), the call is not lost: the complete plugin beside this file (pyflannel-inprocess, the pyinstaller binary) runs it, so a
CNI call never fails because pyflanneld is down. A daemon that took the call but gave no answer is a CNI error
(try again later): the call may have been made, and running it twice is not safe.

`make cni` builds this as dist/cni/pyflannel, a zipapp run by `/usr/bin/python3 -IS`.
"""
import os
import sys

import _socket  # not `socket`: its enum import alone costs a third of a bare interpreter's start

DAEMON_SOCKET = "/run/flannel/pyflanneld.sock"  # paths.DAEMON_SOCKET (not imported: start-up time)
IN_PROCESS = "pyflannel-inprocess"
CNI_SECONDS = 60.0
TRY_AGAIN_LATER = 11  # CNI's error code (cni/protocol.py has them all)
KEY = b'"daemonSocket"'


def daemon_socket(stdin: bytes) -> str:
    """The config's "daemonSocket": read without the json module where the value has no escapes (the usual path)."""
    at = stdin.find(KEY)
    if at < 0:
        return DAEMON_SOCKET
    rest = stdin[at + len(KEY):].lstrip()
    value = rest[1:].lstrip() if rest[:1] == b":" else b""
    end = value.find(b'"', 1)
    if value[:1] == b'"' and end > 1 and b"\\" not in value[:end]:
        return value[1:end].decode()
    import json
    try:
        found = json.loads(stdin).get("daemonSocket")
    except (ValueError, AttributeError):
        return DAEMON_SOCKET  # the plugin itself names what is wrong with the config
    return found if isinstance(found, str) and found else DAEMON_SOCKET


def error(message: str) -> int:
    message = message.replace("\\", "\\\\").replace('"', '\\"')
    sys.stdout.write('{"cniVersion": "1.0.0", "code": %d, "msg": "%s"}\n' % (TRY_AGAIN_LATER, message))
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


def request(stdin: bytes) -> bytes | None:
    """The HTTP request for pyflanneld; None when the environment cannot travel in headers (then in-process)."""
    head = ["POST /v1/cni HTTP/1.0", f"Content-Length: {len(stdin)}"]
    for name, value in os.environ.items():
        if name.startswith("CNI_") or name == "PATH":
            if "\r" in value or "\n" in value:
                return None
            head.append(f"CNI-Env: {name}={value}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + stdin


def main() -> int:
    stdin = sys.stdin.buffer.read()
    path, data = daemon_socket(stdin), request(stdin)
    if data is None:
        return in_process(stdin)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(CNI_SECONDS)
        try:
            sock.connect(path)
        except OSError:
            return in_process(stdin)
        chunks = []
        try:
            sock.sendall(data)
            while chunk := sock.recv(1 << 16):
                chunks.append(chunk)
        except OSError as e:
            return error(f"pyflanneld took the call on {path} but gave no answer ({e.strerror or e})")
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    code = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("cni-exit-code:")),
                None)
    status = lines[0].split()[1:2]
    if status == ["404"]:  # a pyflanneld that runs no CNI calls
        return in_process(stdin)
    if status != ["200"] or code is None or not code.isdigit():
        return error(f"pyflanneld on {path} answered {lines[0]!r}: {body[:200].decode(errors='replace')}")
    sys.stdout.write(body.decode())
    return int(code)
