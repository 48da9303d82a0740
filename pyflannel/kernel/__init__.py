"""The kernel, as pyflannel's programs see it: the one home of kernel access that the daemon, the Docker driver,
the CNI plugin and doctor share.

    errors.py      KernelError: what the kernel or iptables refused, named; each program maps it to its own errors
    iptables.py    the one iptables runner (argv lists, -w, one timeout) and rule helpers
    links.py       links by name: bridges, veth pairs, deletion, MACs
    forwarding.py  forwarding through a bridge: net.ipv4.ip_forward, FORWARD accept rules, route_localnet
    namespaces.py  network namespaces: open one, netlink inside one
    ports.py       whether a host port is free
    netlink.py     the overlay's entries: the VXLAN device, routes (proto 77), neighbours, FDB; batched changes,
                   a monitor of deletions (pyflanneld's Kernel, also read by doctor and status)
"""
