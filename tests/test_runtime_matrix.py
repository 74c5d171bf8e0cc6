"""The test runtime boots the ComfyUI release its venv was built for, and its torchvision /
torchaudio stand-ins stay test-only: they fail on use, and the pack never imports them."""

import ast
import glob
import os
import sys

import pytest

from harness import runtime, stand_ins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_boots_the_tree_the_runtime_names(comfy):
    import comfyui_version

    root = os.path.realpath(runtime.comfyui_dir())
    assert os.path.realpath(comfy.__file__) == os.path.join(root, "nodes.py")
    named = os.path.join(sys.prefix, "usv-comfyui-dir")
    if os.path.isfile(named) and not os.environ.get("COMFYUI_DIR"):
        with open(named) as f:
            assert os.path.realpath(f.read().strip()) == root
    assert ".".join(map(str, runtime.comfyui_version())) == comfyui_version.__version__


@pytest.mark.parametrize("name", stand_ins.STAND_INS)
def test_stand_ins_fail_on_use(comfy, name):
    import importlib

    module = importlib.import_module(name)
    if not stand_ins.is_stand_in(module):
        pytest.skip(f"this runtime has a working {name}")
    sub = importlib.import_module(name + ".ops" if name == "torchvision" else name + ".functional")
    with pytest.raises(RuntimeError, match="test-only stand-in"):
        getattr(sub, "anything")(1)


def test_the_pack_never_imports_torchvision_or_torchaudio():
    files = [os.path.join(ROOT, "__init__.py")]
    for folder in ("nodes", "usv_core"):
        files += glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)
    offenders = []
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in stand_ins.STAND_INS for n in names):
                offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert offenders == [], "the test runtime's torchvision / torchaudio are stand-ins; the pack must not need them"
