"""USV Report states the seconds per step measured on the user's own machine, dense and sparse
steps apart, so that the speedup a user reads is theirs and not the H200's."""

import re
import time

from test_patch_per_clone import node, patch_of, sample


def test_report_gives_measured_seconds_of_dense_and_sparse_steps(comfy_nodes, wan4):
    wan = comfy_nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet(wan4, "default")[0]
    sparse = node(comfy_nodes, "USVSparseAttention", wan, 0.25, 1, "", "4x4x4")
    start = time.perf_counter()
    sample(sparse, steps=3)
    wall = time.perf_counter() - start

    run = patch_of(sparse).last_run
    seconds = run.step_seconds()
    assert sorted(seconds) == [0, 1, 2] and all(t > 0 for t in seconds.values())
    assert 0.5 * wall < sum(seconds.values()) <= wall  # the steps are most of sampling, never more
    assert run.sparse_steps() == {1, 2}

    text = comfy_nodes.NODE_CLASS_MAPPINGS["USVReport"].execute(sparse, {"samples": None}).result[1]
    line = next(l for l in text.splitlines() if l.startswith("measured on CPU:"))
    assert "1 dense step at" in line and "2 sparse steps at" in line, line
    ratio = float(re.search(r"a sparse step took ([0-9.]+) of a dense step here", line).group(1))
    assert abs(ratio - (seconds[1] + seconds[2]) / 2 / seconds[0]) < 0.01
