"""pyflannel.imports: what third-party packages import and pyflanneld never uses stays out of the process, and
each stand-in loads the real module at its first use (in a fresh interpreter: pytest has loaded unittest already)."""
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

CHECK = """
import sys
import pyflannel.pyflanneld, pyflannel.daemon.store.etcdv2, pyflannel.daemon.store.etcdv3
left_out = ("unittest", "unittest.mock", "importlib.metadata", "dns.resolver", "etcd3gw", "requests",
            "pyflannel.cni.main")
print("loaded:", sorted(m for m in left_out if m in sys.modules))

import etcd.client
import pyroute2.netlink.rtnl.iprsocket as iprsocket
import urllib3.http2
print("resolver:", etcd.client.dns.resolver.Resolver.__module__, type(sys.modules["dns.resolver"]).__name__)
queue = iprsocket.NotLocal.msg_queue
queue.put_nowait("x")
print("mock:", type(queue._made).__name__, queue._made.put_nowait.call_args.args)
print("version:", urllib3.http2.version("urllib3") == urllib3.__version__)
from unittest import mock
print("unittest:", mock.Mock.__module__)
"""


def test_left_out_until_used():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["loaded: []", "resolver: dns.resolver module", "mock: Mock ('x',)",
                                        "version: True", "unittest: unittest.mock"], done.stdout
