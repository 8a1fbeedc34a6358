"""``metaldefect export RUN --format onnx``: backbone and head as one ONNX graph plus its sidecar JSON
(and the box refiner, when the model has one, as a second graph)."""
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
    parser.add_argument("--no-refine", action="store_true",
                        help="leave out the model's box refiner (by default it is exported beside the model)")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    from metaldefect.inference.detector import load_model_refiner, load_torch_model
    from metaldefect.inference.onnx_export import DEFAULT_OPSET, export_onnx, refiner_path, sidecar_path

    if args.out:
        out = Path(args.out)
    elif args.model == "builtin":
        out = Path("metaldefect-builtin.onnx")
    else:
        out = Path(args.model) / "model.onnx"
    model, classes, spec, card = load_torch_model(args.model)
    refiner = None if args.no_refine else load_model_refiner(args.model, classes)
    export_onnx(model, classes, spec, out, card, opset=DEFAULT_OPSET if args.opset is None else args.opset,
                refiner=refiner)
    size = model.backbone.input_size
    print(f"{out} (input 'images' [batch, 3, {size}, {size}] in [0, 1]) and {sidecar_path(out)}"
          + (f"; box refiner: {refiner_path(out)}" if refiner is not None else ""))
    return 0
