"""``metaldefect export RUN --format onnx``: backbone and head as one ONNX graph plus its sidecar JSON."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="export a trained model to ONNX (one graph, dynamic batch; decoding and NMS stay in Python)")
    parser.add_argument("model", metavar="RUN", help="training run directory, or 'builtin'")
    parser.add_argument("--format", default="onnx", choices=["onnx"], help="export format (default: onnx)")
    parser.add_argument("--out", help="output .onnx file (default: RUN/model.onnx; ./metaldefect-builtin.onnx)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset, >= 17 (default: 18)")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from metaldefect.inference.detector import load_torch_model
    from metaldefect.inference.onnx_export import DEFAULT_OPSET, export_onnx, sidecar_path

    if args.out:
        out = Path(args.out)
    elif args.model == "builtin":
        out = Path("metaldefect-builtin.onnx")
    else:
        out = Path(args.model) / "model.onnx"
    model, classes, spec, card = load_torch_model(args.model)
    export_onnx(model, classes, spec, out, card, opset=DEFAULT_OPSET if args.opset is None else args.opset)
    size = model.backbone.input_size
    print(f"{out} (input 'images' [batch, 3, {size}, {size}] in [0, 1]) and {sidecar_path(out)}")
    return 0
