"""pyflannel's CNI plugin (type "pyflannel"): flannel's CNI conflist, served from subnet.env.

    protocol.py   the CNI contract: environment + stdin, results, errors, VERSION
    netconf.py    flannel's conflist -> the delegate config (bridge + host-local: a range set per address family
                  of the lease, dual stack as flannel has it), saved per container for DEL
    hostlocal.py  IPAM in host-local's on-disk layout (interchangeable with /usr/lib/cni/host-local)
    bridge.py     the native bridge attach (pyroute2): bridge, veth into the container, addresses, routes
    delegate.py   any other delegate type: exec that plugin from CNI_PATH, as flannel does
    main.py       the command dispatch
"""
