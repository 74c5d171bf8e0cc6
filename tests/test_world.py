"""USV World: clips are deterministic and follow the world's rules; the world score separates real
clips from noise and from clips under someone else's caption."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from usv_core.world import COLOR_NAMES, SHAPES, make_batch, make_clip, parse_caption, sample_scene, score, score_details, tracks
from usv_core.world.text import CaptionEncoder

SEEDS = list(range(100, 108))


@pytest.fixture(scope="module")
def real():
    return make_batch(SEEDS)


def test_clip_is_deterministic_and_in_range():
    a, ca = make_clip(7)
    b, cb = make_clip(7)
    c, _ = make_clip(8)
    assert a.shape == (33, 256, 256, 3) and a.dtype == torch.float32
    assert torch.equal(a, b) and ca == cb
    assert not torch.equal(a, c)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    small, cs = make_clip(7, size=64, frames=9)
    assert small.shape == (9, 64, 64, 3) and cs == ca


def test_batch_matches_single_clips(real):
    frames, captions = real
    one, cap = make_clip(SEEDS[3])
    assert torch.allclose(frames[3], one) and captions[3] == cap


def test_scenes_follow_the_rules():
    for seed in range(200):
        scene = sample_scene(seed)
        assert 1 <= len(scene.objects) <= 3
        colours = [o.colour for o in scene.objects]
        assert len(set(colours)) == len(colours)  # a colour names one object
        assert parse_caption(scene.caption) == [(o.colour, o.shape) for o in scene.objects]
        tr = tracks(scene)
        for o, t in zip(scene.objects, tr):
            ex, ey = o.extent()
            assert (t[:, 0] >= ex - 1e-6).all() and (t[:, 0] <= 256 - ex + 1e-6).all()
            assert (t[:, 1] >= ey - 1e-6).all() and (t[:, 1] <= 256 - ey + 1e-6).all()
            speed = np.linalg.norm(np.diff(t, axis=0), axis=-1)
            assert np.allclose(speed.max(), np.hypot(o.vx, o.vy), atol=1e-6)  # bounces keep the speed
    seen = {(o.colour, o.shape) for s in range(200) for o in sample_scene(s).objects}
    assert {c for c, _ in seen} == set(COLOR_NAMES) and {s for _, s in seen} == set(SHAPES)


def test_score_real_clips_high(real):
    frames, captions = real
    scores = [score(f, c) for f, c in zip(frames, captions)]
    assert np.mean(scores) >= 0.9, scores


def test_score_noise_low(real):
    _, captions = real
    g = torch.Generator().manual_seed(0)
    noise = [score(torch.rand(33, 256, 256, 3, generator=g), c) for c in captions[:2]]
    gauss = [score((0.5 + 0.3 * torch.randn(33, 256, 256, 3, generator=g)).clamp(0, 1), c) for c in captions[2:4]]
    assert np.mean(noise) <= 0.3 and np.mean(gauss) <= 0.3, (noise, gauss)


def test_score_wrong_caption_lower(real):
    frames, captions = real
    own = [score(f, c) for f, c in zip(frames, captions)]
    other = [score(f, captions[(i + 3) % len(captions)]) for i, f in enumerate(frames)]
    assert np.mean(other) <= 0.6 and np.mean(other) < np.mean(own) - 0.3, (own, other)


def test_score_checks_motion(real):
    frames, captions = real
    still = [score(f[:1].expand(33, -1, -1, -1), c) for f, c in zip(frames[:3], captions[:3])]
    shuffled = [score(f[torch.randperm(33, generator=torch.Generator().manual_seed(1))], c) for f, c in zip(frames[:3], captions[:3])]
    assert max(still) < 0.8 and np.mean(shuffled) < 0.8, (still, shuffled)


def test_score_other_sizes_and_frame_counts(real):
    frames, captions = real
    # what a model might produce instead: 17 frames at 240 x 240, or 9 frames at 64 x 96
    a = [score(F.interpolate(f[::2].permute(0, 3, 1, 2), size=(240, 240), mode="bilinear").permute(0, 2, 3, 1), c) for f, c in zip(frames[:3], captions[:3])]
    b = [score(F.interpolate(f[::4].permute(0, 3, 1, 2), size=(64, 96), mode="area").permute(0, 2, 3, 1), c) for f, c in zip(frames[:3], captions[:3])]
    assert np.mean(a) >= 0.9 and np.mean(b) >= 0.8, (a, b)
    assert score(frames[0][:1], captions[0]) <= 0.5  # one frame shows no motion
    details = score_details(frames[0].numpy(), captions[0])  # numpy works too
    assert len(details["objects"]) == len(parse_caption(captions[0])) and details["extras"] == []


def test_caption_encoder_vocabulary(caplog):
    enc = CaptionEncoder()
    a = enc.encode("a red circle and a blue square")
    assert a.shape == (1, 16, 4096)
    empty = enc.encode("")
    assert torch.equal(empty, enc.encode("   "))
    with caplog.at_level("WARNING", logger="usv.world"):
        b = enc.encode("A RED circle, and a BLUE banana-square!")
    assert sum("banana" in r.getMessage() for r in caplog.records) == 1
    assert torch.equal(a, b)
