"""The package tree says what depends on what: the rules below fail the suite when an import breaks them.

    pyflannel.paths, subnetenv     leaves: imported by all, import nothing of ours
    pyflannel.kernel               the kernel (netlink, iptables, sysctls): imports only leaves
    pyflannel.daemon               pyflanneld: kernel + leaves
      daemon.model                 its floor (a lease, a lease event, a peer's kernel entries): the stores, backends,
                                   reconciler and overlay all import it, it none of them, and of the kernel only
                                   its entries as values (kernel.entries), never a netlink socket
      daemon.backend, reconciler   kernel entries from leases: never a store (a lease is a value of the model)
    pyflannel.driver               the Docker driver: kernel + leaves
    pyflannel.cni                  the CNI plugin: kernel + leaves
    pyflannel.cli/doctor/status    operator tools: may read the daemon's pieces
"""
import ast
from pathlib import Path

import pytest

from lab import REPO

pytestmark = pytest.mark.unit

# package -> packages of ours it must never import
FORBIDDEN = {
    "pyflannel": ("lab", "tests", "bench"),  # the lab and what uses it are no product (not in the wheel)
    "pyflannel.kernel": ("pyflannel.daemon", "pyflannel.driver", "pyflannel.cni", "pyflannel.doctor",
                         "pyflannel.cli", "pyflannel.supervisor"),
    "pyflannel.daemon": ("pyflannel.driver", "pyflannel.cni", "pyflannel.doctor", "pyflannel.cli"),
    "pyflannel.driver": ("pyflannel.daemon", "pyflannel.cni", "pyflannel.doctor", "pyflannel.cli"),
    "pyflannel.cni": ("pyflannel.daemon", "pyflannel.driver", "pyflannel.doctor", "pyflannel.cli"),
    "pyflannel.daemon.model": ("pyflannel.daemon.store", "pyflannel.daemon.backend", "pyflannel.daemon.reconciler",
                               "pyflannel.daemon.lease", "pyflannel.daemon.overlay", "pyflannel.kernel.netlink",
                               "pyflannel.kernel.links"),
    "pyflannel.daemon.backend": ("pyflannel.daemon.store", "pyflannel.daemon.reconciler", "pyflannel.daemon.overlay"),
    "pyflannel.daemon.reconciler": ("pyflannel.daemon.store", "pyflannel.daemon.overlay"),
}
ONLY_KERNEL_IMPORTS = ("pyroute2",)


def modules():
    """(module name, path) of every product module."""
    for path in (REPO / "pyflannel").rglob("*.py"):
        yield ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"), path


def imports(module: str, path: Path):
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                yield f"{base}.{node.module}" if node.module else base
            else:
                yield node.module


def test_packages_import_only_downwards():
    found = list(modules())
    assert len(found) > 40 and any(m == "pyflannel.kernel.netlink" for m, _ in found)
    problems = []
    for module, path in found:
        for name in imports(module, path):
            for package, forbidden in FORBIDDEN.items():
                if module.startswith(package + ".") or module == package:
                    bad = [f for f in forbidden if name == f or name.startswith(f + ".")]
                    problems += [f"{module} imports {name}" for _ in bad]
            if name.split(".")[0] in ONLY_KERNEL_IMPORTS and not module.startswith("pyflannel.kernel"):
                problems.append(f"{module} imports {name}: only pyflannel.kernel talks netlink")
    assert not problems, "\n".join(problems)


def test_every_file_has_one_path():
    """No link in the source tree: a module is found and edited at one path (pyflannel/daemon, not a top-level
    daemon/ too)."""
    generated = {".git", ".venv", "build", "dist"}
    links = [str(path.relative_to(REPO)) for top in REPO.iterdir() if top.name not in generated
             for path in ([top] if top.is_symlink() else top.rglob("*") if top.is_dir() else []) if path.is_symlink()]
    assert links == []
