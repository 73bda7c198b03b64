"""Scoring attention against object masks (the pointing game and mass on the object)."""

import numpy as np

from vitcli.data.preprocess import Preprocess
from vitcli.services.attention.localization import mask_on_grid, score_map


def square_mask(size=64, box=(16, 8, 32, 24)):
    mask = np.zeros((size, size), dtype=bool)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = True
    return mask


def test_mask_coverage_on_the_patch_grid_is_area_weighted():
    geometry = Preprocess(size=(64, 64)).geometry(64, 64)
    coverage = mask_on_grid(square_mask(), geometry, (4, 4))  # 16-pixel cells
    expected = np.zeros((4, 4))
    expected[0, 1] = 0.5  # rows 8..16 of cell row 0, columns 16..32
    expected[1, 1] = 0.5
    np.testing.assert_allclose(coverage, expected, atol=1e-6)


def test_a_peak_on_the_object_hits_and_a_peak_elsewhere_misses():
    geometry = Preprocess(size=(64, 64)).geometry(64, 64)
    mask = square_mask(box=(16, 16, 48, 48))
    on = np.zeros((4, 4))
    on[1, 1] = 1.0
    hit, strict, overlap, mass, share = score_map(on, mask, geometry)
    assert hit and strict and overlap and mass == 1.0 and share == 0.25
    off = np.zeros((4, 4))
    off[3, 0] = 1.0
    hit, strict, overlap, mass, _ = score_map(off, mask, geometry, tolerance=0)
    assert not hit and not strict and not overlap and mass == 0.0
    assert score_map(off, mask, geometry, tolerance=15)[
        0
    ]  # cell centre (8, 56) is 12 px from the object
    uniform = np.ones((4, 4))
    _, _, _, mass, share = score_map(uniform, mask, geometry)
    assert abs(mass - share) < 1e-6  # no idea where the object is: ratio 1


def test_non_square_grid_and_center_crop_map_back_to_the_original():
    # A 128x64 (w x h) original, center crop to 64x64 after shorter side 64: the middle half.
    preprocess = Preprocess(size=(64, 64), resize="shorter", crop_pct=1.0)
    geometry = preprocess.geometry(128, 64)
    assert geometry.box == (32.0, 0.0, 96.0, 64.0)
    mask = np.zeros((64, 128), dtype=bool)
    mask[:, 0:32] = True  # object entirely outside the crop
    heat = np.zeros((2, 4))
    heat[0, 0] = 1.0  # peak in the crop's top-left cell
    hit, strict, overlap, mass, share = score_map(heat, mask, geometry, tolerance=0)
    assert not hit and not strict and not overlap and mass == 0.0 and share == 0.0
    hit, *_ = score_map(
        heat, mask, geometry, tolerance=10
    )  # cell centre (40, 8): 8 px from the object
    assert hit
    mask[:, 32:48] = True  # now the crop's left quarter is object
    hit, strict, overlap, mass, share = score_map(heat, mask, geometry)
    assert hit and strict and overlap and mass == 1.0 and share == 0.25


def test_pointing_tolerance_is_measured_in_original_pixels():
    geometry = Preprocess(size=(64, 64)).geometry(64, 64)
    mask = square_mask(box=(40, 0, 64, 64))  # object on the right; peak cell centre x = 24
    heat = np.zeros((4, 4))
    heat[1, 1] = 1.0
    assert not score_map(heat, mask, geometry, tolerance=15)[0]  # 16.5 px away
    assert score_map(heat, mask, geometry, tolerance=17)[0]
