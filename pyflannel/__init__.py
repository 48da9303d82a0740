"""pyflannel: a flannel-compatible overlay network for Docker."""
__version__ = "0.1.0"


def version_line(program: str) -> str:
    """What `--version` prints, for every command."""
    return f"{program} {__version__}"
