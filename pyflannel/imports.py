"""Leaving out modules that third-party packages import at import time and pyflannel's programs never use (a leaf:
it imports nothing of ours). Every module loaded costs each program memory and start-up time, and pyflanneld's RSS is
measured against flanneld's (docs/benchmarks.md). A stand-in loads the real module at its first real use, so
nothing behaves differently."""
from __future__ import annotations

import contextlib
import importlib
import sys
import types


@contextlib.contextmanager
def standing_in(name: str, module: types.ModuleType):
    """While the block runs, `import <name>` gives `module` (also as its parent package's attribute); afterwards the
    name is free again, and the real module loads at its first import. Nothing stands in for a loaded module."""
    if name in sys.modules:
        yield
        return
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(importlib.import_module(parent), child, module)
    try:
        yield
    finally:
        if sys.modules.get(name) is module:
            del sys.modules[name]


def deferred(name: str, calls: tuple[str, ...] = (), instances: tuple[str, ...] = ()) -> types.ModuleType:
    """A stand-in for module `name`: reading an attribute imports the real module and answers from it.
    `calls`: functions that `from <name> import ...` takes at import time; calling one imports the real module.
    `instances`: classes instantiated at import time; each such instance becomes one of the real class at its first
    use."""
    def real():
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
        return importlib.import_module(name)

    class Deferred(types.ModuleType):
        def __getattr__(self, attr: str):
            if attr.startswith("__"):  # the import system's probes (__path__, ...) are no use of the module
                raise AttributeError(attr)
            return getattr(real(), attr)

    class Later:
        """An instance of the real class, made at its first use."""
        def __init__(self, cls: str, args, kwargs):
            self._how, self._made = (cls, args, kwargs), None

        def __getattr__(self, attr: str):
            if self._made is None:
                cls, args, kwargs = self._how
                self._made = getattr(real(), cls)(*args, **kwargs)
            return getattr(self._made, attr)

    stand_in = Deferred(name)
    for fn in calls:
        setattr(stand_in, fn, lambda *args, _fn=fn, **kwargs: getattr(real(), _fn)(*args, **kwargs))
    for cls in instances:
        setattr(stand_in, cls, lambda *args, _cls=cls, **kwargs: Later(_cls, args, kwargs))
    return stand_in
