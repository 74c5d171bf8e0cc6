"""The pack's Triton kernels build for every card generation users run, checked on a CPU: each
launch the attention and VAE wrappers make (sampling with each key-tile source, the gate and the
policy's statistics, training's backward; Wan, HunyuanVideo and LTX-Video sizes) is compiled for
Ampere, Ada, Hopper and consumer Blackwell with the wheel's ptxas (bench/kernel_resources.py, in
its own process: the suite's interpreter would run the kernels instead), and must ask for no more
shared memory than that card has: over the limit, it would fail at its first launch on a card we
cannot test on."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "kernel_resources.py")
_spec = importlib.util.spec_from_file_location("kernel_resources", SCRIPT)
kr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kr)

KERNELS = {"pool_kernel", "scores_kernel", "select_kernel", "bsa_fwd_kernel", "bsa_bwd_dq_kernel",
           "bsa_bwd_dkdv_kernel", "scatter_kernel", "compact_kernel", "rms_silu_kernel"}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not os.path.exists(kr._bin("cuobjdump")):
        pytest.skip("this triton has no bundled CUDA tools (ptxas, cuobjdump) to compile with")
    path = tmp_path_factory.mktemp("kernels") / "resources.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, SCRIPT, "--json", str(path)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert path.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    return p.returncode, p.stdout, json.loads(path.read_text())["rows"]


@pytest.mark.parametrize("cc", sorted(kr.TARGETS))
def test_every_kernel_compiles_and_fits_the_cards_shared_memory(report, cc):
    rc, out, rows = report
    mine = [r for r in rows if r["cc"] == cc]
    assert {r["kernel"] for r in mine} == KERNELS
    over = [f"{r['kernel']} {r['constexprs']}: {r['shared_bytes']} B" for r in mine if not r["fits"]]
    assert not over, f"over the {kr.TARGETS[cc][1]} B of shared memory of {kr.TARGETS[cc][0]}: {over}"
    assert all(0 < r["registers"] <= 255 for r in mine)
    if cc >= 90:  # the forward reading key tiles through TMA descriptors, which Hopper and newer get
        assert any(r["kernel"] == "bsa_fwd_kernel" and r["constexprs"].get("KV_DESC") for r in mine)
    assert rc == 0, out[-2000:]
