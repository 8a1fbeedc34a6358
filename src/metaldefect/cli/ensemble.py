"""``metaldefect ensemble RUN RUN [RUN ...] --out DIR``: dense heads of separate runs as one model."""
from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ensemble", help="put dense heads trained in separate runs together as one model (one backbone pass)",
        description="Average the per-location outputs of dense heads trained in separate runs on the same frozen "
                    "backbone, classes and split. Writes DIR as a run: evaluate, predict, export and serve take it.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="training run directories (at least 2)")
    parser.add_argument("--out", required=True, metavar="DIR", help="new folder for the ensemble run")
    parser.set_defaults(handler=run_ensemble)


def run_ensemble(args) -> int:
    from metaldefect.engine.ensemble import assemble_ensemble

    out = assemble_ensemble(args.runs, args.out)
    print(f"ensemble of {len(args.runs)} heads: {out} (metaldefect evaluate {out} --split val)")
    return 0
