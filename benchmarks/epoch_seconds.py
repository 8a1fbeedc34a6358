"""Time whole training epochs (training steps and the val pass) of this checkout against another commit's code.

Runs ``metaldefect train CONFIG train.epochs=N`` with the code of a baseline commit (a temporary git worktree)
and with this checkout's code, in turn, ``--rounds`` times, on the same config, overrides and feature cache, and
reads each run's epoch seconds from its ``history.csv`` (an epoch's clock covers its training steps and its val
pass, not the checkpoint writes). The first epoch of each run warms up and is not counted. Reports the median
epoch of each variant and their ratio, overall and by round, so that a drifting VM shows. Command
(docs/benchmarks.md, session 16):

    python benchmarks/epoch_seconds.py configs/neu_det_dense_pair.yaml --baseline fe794af \\
        train.cache_dir=runs/bench/bf16_cache

The feature cache should already hold the config's features; extraction is outside the epoch clock, but would
make the first run minutes longer.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def epoch_seconds(src: Path, config: str, overrides: list[str], epochs: int, runs_dir: Path, name: str) -> list[float]:
    """Seconds of epochs 2..``epochs`` of one training run with the package at ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    # PYTHONPATH comes before the editable install's path entry; check that it does here.
    found = subprocess.run([sys.executable, "-c", "import metaldefect; print(metaldefect.__file__)"], env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    if not Path(found).is_relative_to(src):
        raise SystemExit(f"the package imported from {found}, not {src}")
    command = [sys.executable, "-m", "metaldefect.cli", "train", config, f"name={name}", f"train.epochs={epochs}",
               "train.progress=false", *overrides, "--runs-dir", str(runs_dir)]
    subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    with open(runs_dir / name / "history.csv", newline="") as handle:
        return [float(row["seconds"]) for row in csv.DictReader(handle)][1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, for both variants")
    parser.add_argument("--baseline", required=True, help="git revision whose code is the baseline")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each variant, alternating (default: 3)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs a run, the first not counted (default: 4)")
    args = parser.parse_intermixed_args()  # overrides may follow the options
    if args.rounds < 1 or args.epochs < 2:
        raise SystemExit(f"--rounds must be at least 1 and --epochs at least 2; got {args.rounds}, {args.epochs}")
    if subprocess.run(["git", "rev-parse", "--verify", "-q", f"{args.baseline}^{{commit}}"], cwd=REPO,
                      capture_output=True).returncode:
        raise SystemExit(f"--baseline {args.baseline}: not a commit of {REPO}")
    try:
        seconds = time_variants(args)
    except subprocess.CalledProcessError as error:
        raise SystemExit(f"failed (exit {error.returncode}): {' '.join(map(str, error.cmd))}") from None
    baseline, current = seconds.values()
    medians = {name: statistics.median(sum(runs, [])) for name, runs in seconds.items()}
    print(f"{args.config}, {args.rounds} rounds of {args.epochs - 1} counted epochs each:")
    for name, median in medians.items():
        print(f"  {name}: median epoch {median:.2f} s")
    ratios = [statistics.median(b) / statistics.median(c) for b, c in zip(baseline, current)]
    baseline_median, current_median = medians.values()
    overall = baseline_median / current_median
    print(f"  baseline / this checkout: {overall:.3f} (by round: {', '.join(f'{r:.3f}' for r in ratios)})")


def time_variants(args) -> dict[str, list[list[float]]]:
    """Counted epoch seconds of each run, by variant (the baseline first), the runs in turn."""
    with tempfile.TemporaryDirectory(prefix="epoch_seconds_") as scratch:
        scratch = Path(scratch)
        worktree = scratch / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(worktree), args.baseline], cwd=REPO,
                       check=True)
        try:
            sources = {f"baseline {args.baseline}": worktree / "src", "this checkout": REPO / "src"}
            seconds: dict[str, list[list[float]]] = {name: [] for name in sources}
            for round_index in range(args.rounds):
                for index, (name, src) in enumerate(sources.items()):
                    seconds[name].append(epoch_seconds(src, args.config, args.overrides, args.epochs,
                                                       scratch / "runs", f"round{round_index}_{index}"))
                    print(f"round {round_index + 1}, {name}: epochs {seconds[name][-1]} s", flush=True)
            return seconds
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=REPO, check=True)


if __name__ == "__main__":
    main()
