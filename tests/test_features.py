"""Feature cache: values, views, reuse, invalidation on every key, resume after interruption, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from data_factory import neu_dataset
from PIL import Image

from metaldefect.cli import main
from metaldefect.data.images import load_image
from metaldefect.data.transforms import to_input_tensor
from metaldefect.engine.features import extract_features
from metaldefect.engine.precision import training_dtype
from metaldefect.errors import DataError
from metaldefect.models import create_backbone


def make_images(folder: Path, count: int = 5) -> list[Path]:
    """Random images of different sizes and modes (grayscale and RGB)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    paths = []
    for i in range(count):
        size = (40 + 7 * i, 50)
        pixels = rng.integers(0, 256, (size[1], size[0]) if i % 2 else (size[1], size[0], 3), dtype=np.uint8)
        path = folder / f"image_{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def tiny_backbone(seed: int = 0, input_size: int = 32, layers=None):
    torch.manual_seed(seed)
    return create_backbone("paper_cnn", pretrained=False, input_size=input_size, layers=layers)


def count_forwards(backbone) -> list[int]:
    """Record the batch size of each forward pass of ``backbone``."""
    calls: list[int] = []
    original = backbone.forward
    backbone.forward = lambda images: calls.append(len(images)) or original(images)
    return calls


def test_features_equal_the_backbone_on_resized_and_flipped_images(tmp_path):
    paths = make_images(tmp_path / "images")
    backbone = tiny_backbone()
    views = ("none", "hflip", "vflip", "rot180+shift_rd")
    features = extract_features(backbone, paths, tmp_path / "cache", batch_size=2, views=views, progress=False)
    assert features.computed == dict.fromkeys(views, 5)
    images = torch.stack([to_input_tensor(load_image(p), 32) for p in paths])
    # rot180+shift_rd: turned, then moved 1 px right and down (1/32 of 32 px), the edge repeated.
    turned_shifted = F.pad(images.flip(-1, -2)[..., :31, :31], (1, 0, 1, 0), mode="replicate")
    for view, flipped in (("none", images), ("hflip", images.flip(-1)), ("vflip", images.flip(-2)),
                          ("rot180+shift_rd", turned_shifted)):
        with torch.no_grad():
            expected = backbone(flipped)
        cached = features[view]
        assert cached.pooled.dtype == np.float16 and cached.pooled.shape == (5, 512)
        assert isinstance(cached.pooled, np.memmap)
        np.testing.assert_allclose(cached.pooled, expected["pooled"].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(cached.map, expected["map"].numpy(), rtol=2e-3, atol=2e-3)
        for stored, layer in zip(cached.layers, expected["layers"]):
            np.testing.assert_allclose(stored, layer.numpy(), rtol=2e-3, atol=2e-3)
    one = features.get(3, "hflip")
    assert one["pooled"].dtype == torch.float32 and one["map"].shape == (512, 1, 1)
    assert [tuple(x.shape) for x in one["layers"]] == [(128, 6, 6), (256, 2, 2), (512, 1, 1)]
    assert features.index[str(paths[3])] == 3


def test_same_keys_reuse_the_cache_and_any_changed_key_recomputes(tmp_path):
    paths = make_images(tmp_path / "images")
    cache = tmp_path / "cache"
    backbone = tiny_backbone()
    first = extract_features(backbone, paths, cache, views=("none", "hflip"), progress=False)

    calls = count_forwards(backbone)
    again = extract_features(backbone, paths, cache, views=("none", "hflip"), progress=False)
    assert calls == [] and again.computed == {"none": 0, "hflip": 0}
    assert again["none"].directory == first["none"].directory

    # A new view is computed alone; the cached ones stay.
    more = extract_features(backbone, paths, cache, views=("none", "vflip"), progress=False)
    assert more.computed == {"none": 0, "vflip": 5} and calls == [5]

    def computed(backbone, image_paths=paths):
        return extract_features(backbone, image_paths, cache, progress=False).computed["none"]

    assert computed(tiny_backbone(seed=1)) == 5  # other weights (checksum)
    tuned = tiny_backbone()
    with torch.no_grad():
        tuned.model.stages[3][0].bias.add_(0.5)  # weights changed in place after creation
    assert computed(tuned) == 5
    assert computed(tiny_backbone(input_size=40)) == 5  # input size
    assert computed(tiny_backbone(layers=(3,))) == 5  # layers
    changed = make_images(tmp_path / "changed")
    Image.new("L", (30, 30), 7).save(changed[2])  # one image's content
    assert computed(backbone, changed) == 5
    assert computed(backbone, paths[:4]) == 4  # another image list
    assert computed(backbone) == 0  # the original entry is still there
    entries = sorted(p.name for p in cache.iterdir() if p.is_dir())
    assert len(entries) == 9 and not any(name.endswith(".partial") for name in entries)


def test_bf16_features_have_their_own_entry_and_stay_close_to_float32(tmp_path):
    paths = make_images(tmp_path / "images")
    cache = tmp_path / "cache"
    backbone = tiny_backbone()
    full = extract_features(backbone, paths, cache, progress=False)["none"]
    low = extract_features(backbone, paths, cache, progress=False, dtype=torch.bfloat16)
    assert low.computed == {"none": 5} and low["none"].directory != full.directory
    assert json.loads((low["none"].directory / "meta.json").read_text())["precision"] == "bfloat16"
    assert "precision" not in json.loads((full.directory / "meta.json").read_text())  # float32 names are unchanged
    for stored, reference in zip(low["none"].layers, full.layers):
        reference = np.asarray(reference, dtype=np.float32)
        error = np.linalg.norm(np.asarray(stored, dtype=np.float32) - reference) / np.linalg.norm(reference)
        assert 0 < error < 0.05  # bf16 keeps 8 bits of mantissa: close, and not the same numbers


def test_an_interrupted_extraction_resumes_where_it_stopped(tmp_path):
    paths = make_images(tmp_path / "images", count=7)
    backbone = tiny_backbone()
    original = backbone.forward
    calls = []

    def fails_on_third_batch(images):
        calls.append(len(images))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(images)

    backbone.forward = fails_on_third_batch
    with pytest.raises(KeyboardInterrupt):
        extract_features(backbone, paths, tmp_path / "cache", batch_size=2, progress=False)
    partial = next((tmp_path / "cache").glob("*.partial"))
    assert json.loads((partial / "progress.json").read_text())["done"] == 4

    backbone.forward = original
    calls_after = count_forwards(backbone)
    resumed = extract_features(backbone, paths, tmp_path / "cache", batch_size=2, progress=False)
    assert resumed.computed == {"none": 3} and calls_after == [2, 1]
    assert not partial.exists()
    fresh = extract_features(tiny_backbone(), paths, tmp_path / "fresh", batch_size=7, progress=False)
    np.testing.assert_allclose(resumed["none"].pooled, fresh["none"].pooled, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(resumed["none"].layers[0], fresh["none"].layers[0], rtol=1e-3, atol=1e-3)


def test_vit_map_is_stored_once_when_it_is_the_last_layer(tmp_path):
    paths = make_images(tmp_path / "images", count=2)
    torch.manual_seed(0)
    vit = create_backbone("vit_tiny_patch16_224", pretrained=False, input_size=32)
    default = extract_features(vit, paths, tmp_path / "cache", progress=False)["none"]
    assert not (default.directory / "map.npy").exists()
    assert default.map is default.layers[-1] and default.map.shape == (2, 192, 2, 2)
    early = create_backbone("vit_tiny_patch16_224", pretrained=False, input_size=32, layers=(3,))
    early.load_state_dict(vit.state_dict())
    stored = extract_features(early, paths, tmp_path / "cache", progress=False)["none"]
    assert (stored.directory / "map.npy").is_file()
    np.testing.assert_allclose(stored.map, default.map, rtol=1e-3, atol=1e-3)


def test_missing_or_unreadable_images_are_named(tmp_path):
    paths = make_images(tmp_path / "images", count=2)
    backbone = tiny_backbone()
    with pytest.raises(DataError, match="nowhere.png: image file not found"):
        extract_features(backbone, [*paths, tmp_path / "nowhere.png"], tmp_path / "cache", progress=False)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.png: unreadable image"):
        extract_features(backbone, [*paths, broken], tmp_path / "cache", progress=False)
    with pytest.raises(ValueError, match="views"):
        extract_features(backbone, paths, tmp_path / "cache", views=("rotate",), progress=False)


def test_cli_extracts_a_split_then_reuses_it(tmp_path, capsys):
    root = neu_dataset(tmp_path / "neu", {f"crazing_{i}": [("crazing", [10, 10, 50, 50])] for i in range(4)}, size=64)
    split = tmp_path / "train.txt"
    split.write_text("IMAGES/crazing_0.jpg\nIMAGES/crazing_2.jpg\n")
    command = ["features", "extract", "--data", str(root), "--split", str(split), "--backbone", "paper_cnn",
               "--input-size", "64", "--views", "none", "hflip", "--cache", str(tmp_path / "cache")]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "none: 2 images, computed 2 images" in out and "hflip: 2 images, computed 2 images" in out
    # paper_cnn is random init: a second process would draw other weights, so reuse is shown with an
    # explicit weights file standing for "the same backbone".
    weights_file = tmp_path / "paper_cnn.pth"
    torch.save(tiny_backbone(input_size=64).model.state_dict(), weights_file)
    command += ["--weights", str(weights_file)]
    assert main(command) == 0 and "computed 2 images" in capsys.readouterr().out
    assert main(command) == 0
    assert "none: 2 images, reused from cache" in capsys.readouterr().out
    # The default (auto) is bf16 or float32 by CPU; the other precision has entries of its own.
    default = training_dtype("auto")
    other = "fp32" if default == torch.bfloat16 else "bf16"
    assert main([*command, "--precision", other]) == 0
    out = capsys.readouterr().out
    assert "none: 2 images, computed 2 images" in out
    assert ("float32" if other == "fp32" else "bfloat16") in out.splitlines()[0]
