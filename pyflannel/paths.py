"""Where pyflannel's processes meet on a host: the one owner of these default paths (each is also a flag)."""
import os

SUBNET_FILE = "/run/flannel/subnet.env"            # pyflanneld writes it; the driver, CNI, status and doctor read it
STATE_DIR = "/var/lib/pyflannel"                   # pyflanneld's state (the VTEP MAC)
DRIVER_SOCKET = "/run/docker/plugins/pyflannel.sock"  # where dockerd finds the driver by name; pyflanneld scrapes it
DAEMON_SOCKET = "/run/flannel/pyflanneld.sock"    # pyflanneld's local API: the driver and CNI join and leave networks


def driver_state_dir(state_dir: str) -> str:
    """pyflannel-driver's networks, endpoints and allocations: a folder of pyflanneld's -state-dir, so that
    `pyflannel doctor` finds them from FLANNELD_STATE_DIR alone (the managed plugin keeps both on the host)."""
    return os.path.join(state_dir, "driver")


DRIVER_STATE_DIR = driver_state_dir(STATE_DIR)


def network_env_file(subnet_file: str, name: str) -> str:
    """The subnet.env of the named flannel network `name` (the default network's is `subnet_file` itself)."""
    if not name:
        return subnet_file
    return os.path.join(os.path.dirname(subnet_file), "networks", f"{name}.env")
