"""The one binary of the plugin and compose image, dispatching on the name it is called by (argv[0]), like
busybox: pyflanneld, pyflannel-driver, pyflannel and pyflannel-plugin are symlinks to it. One PyInstaller build
shares one Python runtime and one copy of the libraries among the four commands."""
import os
import sys


def _daemon():
    from pyflannel.pyflanneld import main
    return main()


def _driver():
    from pyflannel.driver.main import main
    return main()


def _cli():
    from pyflannel.cli import main
    return main()


def _plugin():
    from pyflannel.supervisor import main
    return main()


COMMANDS = {"pyflanneld": _daemon, "pyflannel-driver": _driver, "pyflannel": _cli, "pyflannel-plugin": _plugin}


def main() -> int:
    name = os.path.basename(sys.argv[0])
    if name not in COMMANDS:
        print(f"{name}: call me as one of {', '.join(COMMANDS)} (a symlink to this binary)", file=sys.stderr)
        return 2
    return COMMANDS[name]()


if __name__ == "__main__":
    sys.exit(main())
