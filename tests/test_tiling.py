"""Tiling: tile layout, the auto rule, and merging, checked against known defect positions."""
from __future__ import annotations

import numpy as np
import pytest
from inference_factory import make_run, textured
from scipy import ndimage

from metaldefect.data.records import Detection
from metaldefect.errors import ConfigError
from metaldefect.inference.detector import Detector
from metaldefect.inference.tiling import make_tiles, merge_tile_detections, parse_tile, predict_tiled, tile_side


def test_parse_tile_accepts_auto_off_and_sizes():
    assert parse_tile("auto") == "auto"
    assert parse_tile(" OFF ") == "off"
    assert parse_tile("448") == 448
    assert parse_tile(320) == 320
    for bad in ("big", "-5", "8", 0, 2.5):
        with pytest.raises(ConfigError):
            parse_tile(bad)


def test_auto_tiles_only_images_much_larger_than_the_input():
    assert tile_side(2048, 1000, "auto", 224) == 224  # GC10-DET
    assert tile_side(200, 200, "auto", 224) is None  # NEU-DET
    assert tile_side(448, 300, "auto", 224) is None  # exactly 2x: not yet
    assert tile_side(449, 300, "auto", 224) == 224
    assert tile_side(2048, 1000, "off", 224) is None
    assert tile_side(400, 300, 512, 224) is None
    assert tile_side(600, 300, 512, 224) == 512


def test_tiles_cover_the_image_with_the_requested_overlap():
    tiles = make_tiles(2048, 1000, 448, overlap=0.25)
    xs = sorted({t[0] for t in tiles})
    ys = sorted({t[1] for t in tiles})
    assert xs == [0, 320, 640, 960, 1280, 1600] and ys == [0, 276, 552]
    assert len(tiles) == 18
    assert all(x1 - x0 == 448 and y1 - y0 == 448 for x0, y0, x1, y1 in tiles)
    covered = np.zeros((1000, 2048), dtype=bool)
    for x0, y0, x1, y1 in tiles:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert min(b - a for a, b in zip(xs, xs[1:])) <= 448 * 0.75  # neighbours overlap by >= 25%
    # An axis shorter than the tile gets one tile of that length.
    assert make_tiles(1000, 300, 448) == [(0, 0, 448, 300), (276, 0, 724, 300), (552, 0, 1000, 300)]


SQUARES = {  # known defects: (x0, y0, x1, y1) -> class; bright = 250, dim = 150
    (50, 50, 90, 90): "bright",        # inside the first tile
    (230, 400, 270, 440): "dim",       # across the first inner vertical edge (x = 256), inside the overlap
    (360, 270, 400, 300): "bright",    # in the corner overlap of four tiles
    (600, 560, 640, 600): "dim",       # inside one tile
    (960, 660, 1000, 700): "bright",   # touching the image's bottom-right border
    (700, 100, 720, 250): "dim",       # a tall thin defect across the edge y = 148..256 overlap
}


def synthetic_plate() -> np.ndarray:
    image = np.zeros((700, 1000, 3), dtype=np.uint8)
    for (x0, y0, x1, y1), label in SQUARES.items():
        image[y0:y1, x0:x1] = 250 if label == "bright" else 150
    return image


def bright_square_detector(calls: list):
    """A stand-in model: every connected region brighter than 100 is a defect, box in crop pixels."""
    def detect(crops: list[np.ndarray]) -> list[list[Detection]]:
        calls.append([crop.shape for crop in crops])
        results = []
        for crop in crops:
            regions, _ = ndimage.label(crop[:, :, 0] > 100)
            found = []
            for rows, cols in ndimage.find_objects(regions):
                value = crop[rows.start, cols.start, 0]
                found.append(Detection([cols.start, rows.start, cols.stop, rows.stop],
                                       "bright" if value > 200 else "dim", 0.9))
            results.append(found)
        return results
    return detect


def test_tiled_detections_land_on_the_known_defects_once_each():
    calls = []
    merged = predict_tiled(synthetic_plate(), bright_square_detector(calls), side=256, overlap=0.25)
    assert {(tuple(int(v) for v in d.box), d.label) for d in merged} == set(SQUARES.items())
    assert len(merged) == len(SQUARES)
    tiles = make_tiles(1000, 700, 256, 0.25)
    assert len(calls) == 1 and len(calls[0]) == len(tiles) == 20
    assert all(shape == (256, 256, 3) for shape in calls[0])


def test_merging_keeps_overlapping_boxes_of_different_classes():
    tiles = [(0, 0, 100, 100), (60, 0, 160, 100)]
    per_tile = [[Detection([70, 10, 90, 30], "a", 0.8)],
                [Detection([10, 10, 30, 30], "a", 0.9), Detection([10, 12, 30, 30], "b", 0.7)]]
    merged = merge_tile_detections(per_tile, tiles, 160, 100)
    assert [(d.label, d.score, [round(v) for v in d.box]) for d in merged] == [
        ("a", 0.9, [70, 10, 90, 30]), ("b", 0.7, [70, 12, 90, 30])]


def test_a_cut_box_without_a_whole_view_is_kept():
    # A defect larger than the overlap is cut in both tiles; nothing whole replaces either part.
    tiles = [(0, 0, 100, 100), (60, 0, 160, 100)]
    per_tile = [[Detection([20, 10, 100, 30], "a", 0.6)], [Detection([0, 10, 80, 30], "a", 0.7)]]
    merged = merge_tile_detections(per_tile, tiles, 160, 100)
    assert sorted([round(v) for v in d.box] for d in merged) == [[20, 10, 100, 30], [60, 10, 140, 30]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny")


def test_detector_tiles_a_large_image_through_a_real_model(tiny_run):
    detector = Detector.load(tiny_run, tile=64, conf=0.0)
    seen = []
    network = detector.network
    detector.network = lambda images: seen.append(tuple(images.shape)) or network(images)
    image = textured(150, 300, seed=3)
    detections = detector.predict(image)
    assert sum(shape[0] for shape in seen) == len(make_tiles(300, 150, 64, 0.25))
    assert all(shape[1:] == (3, 32, 32) for shape in seen)
    assert detections, "a random dense head scores every location above 0"
    boxes = np.array([d.box for d in detections])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 300).all() and (boxes[:, 3] <= 150).all()
    assert (boxes[:, 2] > boxes[:, 0]).all()
    assert all(d.label in detector.classes for d in detections)
    # "off" runs the whole image once.
    seen.clear()
    detector.tile = "off"
    detector.predict(image)
    assert seen == [(1, 3, 32, 32)]
