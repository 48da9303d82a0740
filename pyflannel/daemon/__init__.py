"""pyflanneld: subnet leases in etcd and the VXLAN / host-gw data plane."""
