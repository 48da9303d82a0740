"""The daemon's model floor: the values the stores, the backends, the reconciler and the overlay hand one another,
importing none of them. `lease` (a lease and its change), `peer` (the kernel entries a peer needs); the network
config is daemon/config.py, already a floor of its own (parsed and checked, importing only the subnets and errors).
"""
