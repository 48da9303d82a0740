"""The kernel layer's one error type: neutral, so the driver can answer Docker with it and the CNI plugin its
runtime, each in its own terms."""


class KernelError(Exception):
    """The kernel (netlink) or iptables refused or could not do something; the message names what."""
