"""Where pyflannel's processes meet on a host: the one owner of these default paths (each is also a flag)."""

SUBNET_FILE = "/run/flannel/subnet.env"            # pyflanneld writes it; the driver, CNI, status and doctor read it
STATE_DIR = "/var/lib/pyflannel"                   # pyflanneld's state (the VTEP MAC)
DRIVER_STATE_DIR = "/var/lib/pyflannel/driver"     # pyflannel-driver's networks, endpoints and allocations
DRIVER_SOCKET = "/run/docker/plugins/pyflannel.sock"  # where dockerd finds the driver by name; pyflanneld scrapes it
