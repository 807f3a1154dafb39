"""The digits demo's motion metrics against hand-made clips."""

import pytest
import torch

from distill.data.digits import DIRECTIONS, digit_images, render_clip
from distill.validation.digit_metrics import centre, direction_index, motion_direction, motion_error


def dot_clip(path, size=8, background=-1.0):
    """[1, 1, T, size, size]: one bright pixel at each (y, x) of `path`."""
    clip = torch.full((1, 1, len(path), size, size), background)
    for t, (y, x) in enumerate(path):
        clip[0, 0, t, y, x] = 1.0
    return clip


def test_centre_by_hand():
    frame = torch.full((4, 4), -0.5)
    frame[0, 0] = 1.0
    # weights above -1: 2 on the pixel, 0.5 on the 15 others; the y's of those sum to 24
    assert centre(frame).tolist() == pytest.approx([12 / 9.5, 12 / 9.5])
    assert centre(frame, floor=0.0).tolist() == pytest.approx([0.0, 0.0])  # the background is below mid-grey


def test_direction_is_the_move_most_along_a_direction():
    clip = torch.cat([dot_clip([(4, 1), (4, 3), (5, 5)]), dot_clip([(6, 4), (4, 4), (1, 5)])])
    assert motion_direction(clip).tolist() == direction_index(["right", "up"]).tolist()


def test_motion_error_by_hand():
    right, left = direction_index(["right"]), direction_index(["left"])
    one_px = dot_clip([(4, 1), (4, 2), (4, 3), (4, 4)])
    assert motion_error(one_px, right, [1]).item() == pytest.approx(0.0)
    assert motion_error(one_px, right, [2]).item() == pytest.approx(1.0)
    assert motion_error(one_px, right, [1, 2]).item() == pytest.approx(0.0)  # the best-fitting speed
    assert motion_error(one_px, left, [1]).item() == pytest.approx(2.0)  # +1 px where -1 px was due
    # moves of 1, 2, 2 px: 1/3 px per move from speed 2, 2/3 from speed 1
    assert motion_error(dot_clip([(4, 0), (4, 1), (4, 3), (4, 5)]), right, [1, 2]).item() == pytest.approx(1 / 3)
    # 1 px right and 1 px down each frame: |(1, 1) - (0, 1)| = 1 px from speed 1
    assert motion_error(dot_clip([(3, 1), (4, 2), (5, 3), (6, 4)]), right, [1]).item() == pytest.approx(1.0)
    # a second pixel of weight w just ahead in frames 2-4 moves the centre by w / (1 + w):
    # w = 0.25 (level 0.25 above the mid-grey floor) puts the first move 0.2 px off, the others on
    shifted = one_px.clone()
    for t in (1, 2, 3):
        shifted[0, 0, t, 4, t + 2] = 0.25
    assert motion_error(shifted, right, [1]).item() == pytest.approx(0.2 / 3, abs=1e-6)  # float32 centres


def test_real_clips_have_no_motion_error_and_a_blend_of_two_speeds_half_a_pixel():
    images, _ = digit_images("val")
    for direction in DIRECTIONS:
        start = {"right": (4, 0), "left": (4, 8), "down": (0, 4), "up": (8, 4)}[direction]
        index = direction_index([direction])
        slow, fast = (render_clip(images[3], direction, start, s)[None] for s in (1, 2))
        assert motion_error(slow, index, [1, 2]).item() == pytest.approx(0, abs=1e-5)
        assert motion_error(fast, index, [1, 2]).item() == pytest.approx(0, abs=1e-5)
        assert motion_direction(slow).item() == index.item() == motion_direction(fast).item()
        blend = (slow + fast) / 2  # the average of both continuations, as a blurred sampler draws
        assert motion_error(blend, index, [1, 2]).item() > 0.3
        assert motion_direction(blend).item() == index.item()  # direction alone cannot tell it apart


def test_prompt_diversity_is_the_mean_distance_within_each_prompt_averaged_over_prompts():
    """Prompt a: clips at (0, 0), (3, 4), (6, 8): distances 5, 10, 5, mean 20/3; prompt b: (1, 1),
    (1, 2): 1; prompt c alone: left out. (20/3 + 1) / 2 = 23/6. One clip per prompt: nan."""
    import numpy as np

    from distill.validation.digit_metrics import prompt_diversity

    features = np.array([[0, 0], [1, 1], [3, 4], [9, 9], [6, 8], [1, 2]], dtype=float)
    prompts = ["a", "b", "a", "c", "a", "b"]
    assert prompt_diversity(features, prompts) == pytest.approx(23 / 6)
    assert np.isnan(prompt_diversity(features[:2], ["a", "b"]))
