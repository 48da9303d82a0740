"""Lease stores: one implementation per etcd API behind the Store interface."""
