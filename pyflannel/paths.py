"""Where pyflannel's processes meet on a host: the one owner of these default paths (each is also a flag)."""
import os

SUBNET_FILE = "/run/flannel/subnet.env"            # pyflanneld writes it; the driver, CNI, status and doctor read it
STATE_DIR = "/var/lib/pyflannel"                   # pyflanneld's state (the VTEP MAC)
DRIVER_STATE_DIR = "/var/lib/pyflannel/driver"     # pyflannel-driver's networks, endpoints and allocations
DRIVER_SOCKET = "/run/docker/plugins/pyflannel.sock"  # where dockerd finds the driver by name; pyflanneld scrapes it
DAEMON_SOCKET = "/run/flannel/pyflanneld.sock"    # pyflanneld's local API: the driver and CNI join and leave networks


def network_env_file(subnet_file: str, name: str) -> str:
    """The subnet.env of the named flannel network `name` (the default network's is `subnet_file` itself)."""
    if not name:
        return subnet_file
    return os.path.join(os.path.dirname(subnet_file), "networks", f"{name}.env")
