"""Real third-party node packs (ComfyUI-GGUF, ComfyUI-KJNodes) loaded into the in-process ComfyUI
beside ours, as a user's custom_nodes folder would hold them.

The packs are test inputs, never part of this project: `git archive` tarballs in
../shared/third_party (relative to the project root; USV_THIRD_PARTY_DIR overrides it). Each is
unpacked once into a cache outside the repository (USV_THIRD_PARTY_CACHE overrides it) and
loaded with ComfyUI's own `nodes.load_custom_node`, as harness/runtime.py loads ours.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import tarfile
import tempfile

from . import runtime

PACKS = ("ComfyUI-GGUF", "ComfyUI-KJNodes")

_loaded: dict[str, str] = {}


class PackUnavailable(RuntimeError):
    """The pack's tarball is not here; tests that need it skip with this message."""


def tarball_dir() -> str:
    env = os.environ.get("USV_THIRD_PARTY_DIR")
    if env:
        return os.path.abspath(env)
    return os.path.normpath(os.path.join(runtime.PACK_DIR, "..", "shared", "third_party"))


def cache_dir() -> str:
    env = os.environ.get("USV_THIRD_PARTY_CACHE")
    if env:
        return os.path.abspath(env)
    return os.path.join(tempfile.gettempdir(), "usv-third-party")


def tarball(pack: str) -> str:
    """The tarball of `pack` (e.g. "ComfyUI-GGUF"), named <pack>-<commit>.tar.gz."""
    found = sorted(glob.glob(os.path.join(tarball_dir(), f"{pack}-*.tar.gz")))
    if not found:
        raise PackUnavailable(
            f"{pack} is not available: no {pack}-<commit>.tar.gz in {tarball_dir()} "
            "(put the third-party tarballs in ../shared/third_party or set USV_THIRD_PARTY_DIR)")
    return found[-1]


def unpack(pack: str) -> str:
    """The pack's folder, unpacked from its tarball on first use; returns its path."""
    archive = tarball(pack)
    stem = os.path.basename(archive)[: -len(".tar.gz")]
    dest = os.path.join(cache_dir(), stem)
    folder = os.path.join(dest, pack)
    if os.path.isfile(os.path.join(folder, "__init__.py")):
        return folder
    os.makedirs(cache_dir(), exist_ok=True)
    # Unpack beside the destination and rename, so that a second test process never sees half a pack.
    work = tempfile.mkdtemp(prefix=f".{stem}-", dir=cache_dir())
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(work, filter="data")
        if not os.path.isfile(os.path.join(work, pack, "__init__.py")):
            raise RuntimeError(f"{archive} does not unpack to a folder {pack}/ with an __init__.py")
        try:
            os.rename(work, dest)
        except OSError:
            if not os.path.isfile(os.path.join(folder, "__init__.py")):
                raise
    finally:
        if os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
    return folder


def load(pack: str) -> str:
    """Load `pack` into the booted ComfyUI once per process; returns its folder. Raises
    PackUnavailable when its tarball is missing."""
    if pack in _loaded:
        return _loaded[pack]
    nodes = runtime.boot()
    folder = unpack(pack)
    _give_server_an_app()
    ok = asyncio.run(nodes.load_custom_node(folder, module_parent="custom_nodes"))
    if not ok:
        raise RuntimeError(f"{pack} failed to load into ComfyUI; see the log above")
    _loaded[pack] = folder
    return folder


def load_or_skip(pack: str) -> str:
    """load(pack) for a test: the test is skipped, with the reason, where the tarball is missing."""
    import pytest

    try:
        return load(pack)
    except PackUnavailable as e:
        pytest.skip(str(e))


def _give_server_an_app() -> None:
    """KJNodes adds a static route to PromptServer.instance.app at import when an instance exists;
    the in-process stand-in for the server may have none, and nobody serves it, so an unserved
    aiohttp application takes the routes."""
    import server

    instance = getattr(server.PromptServer, "instance", None)
    if instance is not None and not hasattr(instance, "app"):
        from aiohttp import web

        instance.app = web.Application()


def module(pack: str):
    """The pack's package as ComfyUI imported it (ComfyUI names it by its path)."""
    import sys

    folder = load(pack)
    return sys.modules[folder.replace(".", "_x_")]
