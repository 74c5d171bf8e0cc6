"""Test-only stand-ins for torchvision and torchaudio.

PyPI's builds of both do not import beside the CPU torch wheel of the test runtime, yet ComfyUI
imports them at module level (comfy.sd: torchvision; 0.20+: torchvision.ops, torchaudio), for
models and nodes the tests never run. A stand-in lets those imports succeed; anything taken from
it fails on use, with a RuntimeError that says so. This lives in the harness only: the pack must
never rely on it.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

STAND_INS = ("torchvision", "torchaudio")


def _message(name: str) -> str:
    return (f"{name} is a test-only stand-in in this runtime (harness/stand_ins.py): the real package "
            f"does not import beside CPU torch here. Run this on a ComfyUI with a working {name.split('.')[0]}.")


class _MissingMeta(type):
    """A class that can be subclassed and inspected at import time, but not instantiated or called."""

    def __call__(cls, *_a, **_k):
        raise RuntimeError(_message(cls.__usv_name__))

    def __getattr__(cls, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _missing(f"{cls.__usv_name__}.{attr}")


def _missing(name: str):
    return _MissingMeta(name.rsplit(".", 1)[-1], (), {"__usv_name__": name})


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _missing(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves torchvision, torchaudio and any of their submodules as stand-in modules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in _active:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        module.__usv_stand_in__ = True
        return module

    def exec_module(self, module):
        pass


_active: set[str] = set()
_finder = _Finder()


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except Exception:
        for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            del sys.modules[mod]
        return False


def install() -> list[str]:
    """Put stand-ins in place of those of torchvision and torchaudio that do not import; returns
    their names. Idempotent."""
    # transformers records at import whether torchvision / torchaudio exist; let it see the truth first.
    import transformers  # noqa: F401

    for name in STAND_INS:
        if name in _active or _importable(name):
            continue
        _active.add(name)
    if _active and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    return sorted(_active)


def is_stand_in(module) -> bool:
    return bool(getattr(module, "__usv_stand_in__", False))
