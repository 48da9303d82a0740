"""The CNI contract (spec 1.0.0): what the runtime hands us and what we answer.

In: CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH in the environment, the network config
as JSON on stdin. Out: a result (ADD), nothing (DEL, CHECK) or the VERSION reply on stdout, exit 0; or an error
object {"cniVersion", "code", "msg", "details"} on stdout, exit 1.

Results are built in the 1.0.0 form; for a config that asks for 0.3.x / 0.4.0 each IP gets its "version" ("4" or
"6").
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

LATEST_VERSION = "1.0.0"
SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")
DEFAULT_CNI_PATH = "/opt/cni/bin"

# Error codes: 1-99 are the spec's, 100+ are this plugin's.
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
KERNEL_REFUSED = 100      # a netlink operation failed
ADDRESSES_EXHAUSTED = 101
CHECK_FAILED = 102        # CHECK found the container's network not as ADD left it
DELEGATE_FAILED = 103     # the delegated plugin could not be run or gave no readable answer
ALREADY_ATTACHED = 104    # a second ADD for the same container id and ifname
INTERNAL = 999

# The spec's rules for the two values that end up in file and interface names.
CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
IFNAME_FORBIDDEN = re.compile(r"[/:\s]")


class CniError(Exception):
    def __init__(self, code: int, msg: str, details: str = ""):
        super().__init__(msg)
        self.code, self.msg, self.details = code, msg, details

    def to_json(self, version: str) -> dict:
        out = {"cniVersion": version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True)
class Request:
    command: str
    container_id: str
    netns: str          # "" in a DEL from a runtime that no longer has the namespace (ctr sends that)
    ifname: str
    cni_path: list[str]
    config: dict
    stdin: bytes

    @property
    def version(self) -> str:
        return self.config["cniVersion"]


def check_version(version) -> str:
    if not isinstance(version, str) or not version:
        raise CniError(INCOMPATIBLE_VERSION, "network config has no cniVersion",
                       f"supported versions: {', '.join(SUPPORTED_VERSIONS)}")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {version!r} is not supported",
                       f"supported versions: {', '.join(SUPPORTED_VERSIONS)}")
    return version


def parse_config(stdin: bytes) -> dict:
    try:
        config = json.loads(stdin)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CniError(DECODE_FAILURE, "the network config on stdin is not valid JSON", str(e)) from None
    if not isinstance(config, dict):
        raise CniError(DECODE_FAILURE, "the network config on stdin is not a JSON object")
    return config


def read_request(environ: dict, stdin: bytes) -> Request:
    """Validate the environment and the config for ADD, DEL or CHECK; each error names the variable or field."""
    command = environ.get("CNI_COMMAND", "")

    def need(name: str) -> str:
        value = environ.get(name, "")
        if not value:
            raise CniError(INVALID_ENVIRONMENT, f"{name} is not set (required for {command})")
        return value

    container_id = need("CNI_CONTAINERID")
    if not CONTAINER_ID.match(container_id):
        raise CniError(INVALID_ENVIRONMENT, f"CNI_CONTAINERID={container_id!r} is not a valid container id",
                       "letters, digits, '_', '.' and '-', starting with a letter or digit")
    ifname = need("CNI_IFNAME")
    if len(ifname.encode()) > 15 or ifname in (".", "..") or IFNAME_FORBIDDEN.search(ifname):
        raise CniError(INVALID_ENVIRONMENT, f"CNI_IFNAME={ifname!r} is not a valid interface name",
                       "at most 15 bytes, no '/', ':' or whitespace, not '.' or '..'")
    netns = need("CNI_NETNS") if command in ("ADD", "CHECK") else environ.get("CNI_NETNS", "")
    cni_path = [p for p in environ.get("CNI_PATH", DEFAULT_CNI_PATH).split(":") if p]
    config = parse_config(stdin)
    check_version(config.get("cniVersion"))
    if command == "CHECK" and config["cniVersion"] < "0.4.0":
        raise CniError(INCOMPATIBLE_VERSION, f"CHECK needs cniVersion 0.4.0 or later, the config has "
                                             f"{config['cniVersion']}")
    return Request(command, container_id, netns, ifname, cni_path, config, stdin)


def version_reply() -> dict:
    return {"cniVersion": LATEST_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def render_result(result: dict, version: str) -> dict:
    """`result` in 1.0.0 form, converted to what `version` expects."""
    out = {"cniVersion": version, **{k: v for k, v in result.items() if k != "cniVersion"}}
    if version != "1.0.0":
        out["ips"] = [{"version": "6" if ":" in ip["address"] else "4", **ip} for ip in out.get("ips", [])]
    return out
