"""Draw a few training images of a config as its mix views see them: the joined pixels and the clipped boxes.

For looking at what `mix_x` / `mix_y` (metaldefect.data.mixing) give the heads, as the feature cache and the
datasets make them (the same plans, partners and cuts). Command (docs/benchmarks.md, session 20):

    python benchmarks/plot_mix_views.py configs/neu_det_dense_pair.yaml data.split_dir=runs/splits/neu_det_seed42 --out docs/img/mix_views.png
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from metaldefect.atomic import atomic_path  # noqa: E402
from metaldefect.config import load_config  # noqa: E402
from metaldefect.data.images import load_image  # noqa: E402
from metaldefect.data.mixing import MIX_VIEWS, Mixes, mix_images, mix_plans, mix_targets  # noqa: E402
from metaldefect.data.transforms import to_input_tensor  # noqa: E402
from metaldefect.engine.run_data import build_data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--images", type=int, default=4, help="training images per mix view (default 4)")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args()

    cfg = load_config(args.config, args.overrides)
    data = build_data(cfg, say=lambda text: None)
    records, targets = data.records["train"], data.targets["train"]
    paths = [str(record.path) for record in records]
    mixes = Mixes(mix_plans(MIX_VIEWS, paths, targets), paths)
    size = cfg.model.input_size
    picked = [round(k * (len(paths) - 1) / max(args.images - 1, 1)) for k in range(args.images)]
    figure, axes = plt.subplots(len(MIX_VIEWS), args.images, figsize=(3 * args.images, 3.6 * len(MIX_VIEWS)),
                                squeeze=False)
    for row, view in enumerate(MIX_VIEWS):
        for ax, index in zip(axes[row], picked):
            partner, cut, axis = mixes.partner(view, index)
            image = mix_images(to_input_tensor(load_image(records[index].path), size),
                               to_input_tensor(load_image(records[partner].path), size), cut, axis)
            target = mix_targets(targets[index], targets[partner], cut, axis)
            ax.imshow(image.permute(1, 2, 0).numpy())
            for x0, y0, x1, y1 in (target["boxes"] * size).tolist():
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", linewidth=1.5))
            names = sorted({data.classes[label] for label in target["labels"].tolist()})
            ax.set_title(f"{view}: {', '.join(names) or 'no box'}\ncut at {cut:.3f}", fontsize=9)
            ax.axis("off")
    figure.tight_layout()
    with atomic_path(args.out) as temporary:
        figure.savefig(temporary, dpi=60, format="png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
