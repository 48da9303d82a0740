"""pyflannel: a flannel-compatible overlay network for Docker."""
__version__ = "0.1.0"
