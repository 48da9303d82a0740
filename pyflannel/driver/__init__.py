"""pyflannel-driver: Docker remote NetworkDriver + IpamDriver."""
