"""ONNX export: one graph with a dynamic batch axis, its sidecar, and parity with PyTorch."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from inference_factory import CLASSES, make_run, textured

from metaldefect.cli import main
from metaldefect.errors import MetalDefectError
from metaldefect.inference.detector import Detector
from metaldefect.inference.onnx_runtime import load_onnx


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny_dense", seed=1)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    return out


def test_export_writes_one_graph_and_a_sidecar(exported, run_dir):
    graph = onnx.load(str(exported))
    onnx.checker.check_model(graph)
    assert graph.opset_import[0].version >= 17
    (images,) = graph.graph.input
    dims = images.type.tensor_type.shape.dim
    assert images.name == "images" and dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    outputs = sorted(o.name for o in graph.graph.output)
    assert outputs == ["box_ltrb", "cls_logits", "points", "quality_logits", "ranges", "strides"]
    assert all(o.type.tensor_type.shape.dim[0].dim_param for o in graph.graph.output)
    # Backbone and head are in the one file: no external weights, and both kinds of layer are present.
    assert not list(exported.parent.glob("*.data"))
    names = " ".join(i.name for i in graph.graph.initializer)
    assert "blocks" in names and "cls_logits" in names
    sidecar = json.loads(exported.with_suffix(".json").read_text())
    assert sidecar["format"] == "metaldefect-onnx" and sidecar["classes"] == CLASSES
    assert sidecar["input_size"] == 32 and sidecar["head"] == "dense"
    assert sidecar["head_kwargs"] == {"scales": [2.0, 1.0], "channels": 32, "max_detections": 20}
    assert sidecar["card"]["name"] == "tiny_dense" and sidecar["output_names"] == outputs


def test_raw_outputs_match_pytorch_at_any_batch_size(exported, run_dir):
    network, _, _ = load_onnx(exported)
    model = Detector.load(run_dir).network.model
    for batch in (1, 5):
        images = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = model(images)
        got = network(images)
        for name in ("box_ltrb", "cls_logits", "quality_logits", "points", "strides"):
            assert got[name].shape == expected[name].shape
            assert torch.allclose(got[name], expected[name], atol=1e-4), name


def test_onnx_detector_matches_torch_within_1px_and_1e_3(exported, run_dir):
    torch_detector = Detector.load(run_dir, conf=0.3, tile="off")
    onnx_detector = Detector.load(exported, conf=0.3, tile="off")
    assert onnx_detector.backend == "onnx" and onnx_detector.classes == CLASSES
    assert onnx_detector.input_size == 32 and onnx_detector.card["name"] == "tiny_dense"
    images = [textured(200, 200, seed=s) for s in range(3)] + [textured(90, 160, seed=7)]
    compared = 0
    for expected, got in zip(torch_detector.predict_batch(images), onnx_detector.predict_batch(images)):
        assert len(got) == len(expected) > 0
        for detection in expected:
            assert any(o.label == detection.label and abs(o.score - detection.score) <= 1e-3
                       and np.abs(np.subtract(o.box, detection.box)).max() <= 1.0 for o in got), detection
            compared += 1
    assert compared >= 8


@pytest.mark.parametrize("head_kwargs", [{"score": "varifocal"}, {"box_bins": 16}, {"detail_width": 4}],
                         ids=["varifocal", "box_bins", "detail_stem"])
def test_dense_head_variants_export_and_detect_like_torch(tmp_path, head_kwargs):
    run_dir = make_run(tmp_path / "variant", seed=2, **head_kwargs)
    out = tmp_path / "variant.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    graph_outputs = {o.name for o in onnx.load(str(out)).graph.output}
    assert ("quality_logits" in graph_outputs) == ("score" not in head_kwargs)
    assert ("box_bin_logits" in graph_outputs) == ("box_bins" in head_kwargs)
    assert_detects_like_torch(run_dir, out)


def test_a_dense_ensemble_exports_its_averaged_outputs_and_detects_like_torch(tmp_path):
    run_dir = make_run(tmp_path / "ensemble", head="dense_ensemble", seed=3, members=2, scales=[2.0, 1.0],
                       channels=32, max_detections=20)
    out = tmp_path / "ensemble.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert {o.name for o in onnx.load(str(out)).graph.output} == {
        "box_ltrb", "cls_logits", "points", "quality_logits", "ranges", "strides"}
    assert_detects_like_torch(run_dir, out)


def assert_detects_like_torch(run_dir, out) -> None:
    """The exported graph's detections equal the run's: same labels, scores within 1e-3, boxes within 1 px."""
    images = [textured(200, 200, seed=s) for s in range(2)]
    expected = Detector.load(run_dir, conf=0.3, tile="off").predict_batch(images)
    got = Detector.load(out, conf=0.3, tile="off").predict_batch(images)
    assert sum(map(len, expected)) > 0
    for want, have in zip(expected, got):
        assert [d.label for d in have] == [d.label for d in want]
        assert np.abs(np.array([d.score for d in have]) - np.array([d.score for d in want])).max() <= 1e-3
        assert np.abs(np.array([d.box for d in have]) - np.array([d.box for d in want])).max() <= 1.0


def test_onnx_backend_from_a_run_exports_then_runs_the_graph(exported, run_dir, monkeypatch):
    from metaldefect.inference import onnx_export

    written = []

    def copy_export(model, classes, spec, out_path, card=None, opset=18, refiner=None):
        """The fixture's export, not a second one."""
        assert classes == CLASSES and spec["head_name"] == "dense" and card["name"] == "tiny_dense"
        assert refiner is None  # the run has no refiner.pt
        out_path.write_bytes(exported.read_bytes())
        out_path.with_suffix(".json").write_text(exported.with_suffix(".json").read_text())
        written.append(out_path)
        return out_path

    monkeypatch.setattr(onnx_export, "export_onnx", copy_export)
    detector = Detector.load(run_dir, backend="onnx", tile="off", conf=0.3)
    assert detector.backend == "onnx" and len(written) == 1 and written[0].is_file()
    image = textured(120, 120, seed=4)
    expected = Detector.load(run_dir, tile="off", conf=0.3).predict(image)
    got = detector.predict(image)
    assert [d.label for d in got] == [d.label for d in expected]
    assert np.abs(np.array([d.box for d in got]) - np.array([d.box for d in expected])).max() <= 1.0
    folder = written[0].parent
    del detector
    assert not folder.exists()  # the temporary export goes with the detector


def test_broken_onnx_inputs_raise_one_clear_error(exported, tmp_path):
    with pytest.raises(MetalDefectError, match="ONNX model file not found"):
        Detector.load(tmp_path / "absent.onnx")
    lonely = tmp_path / "lonely.onnx"
    lonely.write_bytes(exported.read_bytes())
    with pytest.raises(MetalDefectError, match="sidecar metadata of lonely.onnx not found"):
        Detector.load(lonely)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a protobuf at all")
    (tmp_path / "garbage.json").write_text(exported.with_suffix(".json").read_text())
    with pytest.raises(MetalDefectError, match="not a readable ONNX model"):
        Detector.load(garbage)
    foreign = tmp_path / "foreign.onnx"
    foreign.write_bytes(exported.read_bytes())
    (tmp_path / "foreign.json").write_text(json.dumps({"classes": ["a"]}))
    with pytest.raises(MetalDefectError, match="not a metaldefect ONNX sidecar"):
        Detector.load(foreign)


def test_export_cli_rejects_bad_runs(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing_run"), "--format", "onnx"]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "not a training run" in capsys.readouterr().err
