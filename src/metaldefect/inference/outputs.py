"""What a prediction leaves on disk: per-image JSON, CSV summaries, annotated PNGs, an HTML report.

Layout of an output folder::

    json/<name>.json       {"image", "width", "height", "model", "score_threshold", "detections": [...]}
    annotated/<name>.png   the image with class-coloured boxes, labels and scores
    summary.csv            one row per image: size, number of detections, count per class, top detection
    detections.csv         one row per detection: image, label, score, x1, y1, x2, y2 (original pixels)
    report.html            (optional) self-contained report: every annotated image embedded as a data URI

Every file is written atomically (complete or absent). Boxes are pixels of the original
image; an annotated image smaller than ``MIN_ANNOTATED_SIDE`` is enlarged by a whole factor
(nearest neighbour, pixels stay honest) so its labels stay legible.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from metaldefect.atomic import atomic_path, write_text
from metaldefect.data.records import Detection

MIN_ANNOTATED_SIDE = 512
# Tableau 10 (matplotlib's default cycle): distinct, colour-blind-friendly hues; class i gets colour i.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def class_colour(label: str, classes: list[str]) -> str:
    index = classes.index(label) if label in classes else sum(label.encode())
    return PALETTE[index % len(PALETTE)]


def annotate(image: np.ndarray, detections: list[Detection], classes: list[str]) -> Image.Image:
    """``[H, W, 3]`` uint8 image -> PIL image with a box, label and score per detection."""
    picture = Image.fromarray(image)
    factor = max(1, -(-MIN_ANNOTATED_SIDE // max(picture.size)))
    if factor > 1:
        picture = picture.resize((picture.width * factor, picture.height * factor), Image.Resampling.NEAREST)
    longer = max(picture.size)
    width = max(2, longer // 300)
    font = ImageFont.load_default(size=max(12, longer // 45))
    draw = ImageDraw.Draw(picture)
    for detection in sorted(detections, key=lambda d: d.score):  # best drawn last, on top
        colour = class_colour(detection.label, classes)
        x1, y1, x2, y2 = (v * factor for v in detection.box)
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=width)
        text = f"{detection.label} {detection.score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        text_height = bottom - top + 2 * width
        ty = y1 - text_height if y1 - text_height >= 0 else y1  # above the box, or inside it at the top
        tx = min(max(0.0, x1), max(0.0, picture.width - (right - left) - 2 * width))
        draw.rectangle([tx, ty, tx + right - left + 2 * width, ty + text_height], fill=colour)
        draw.text((tx + width, ty + width - top), text, fill="white", font=font)
    return picture


@dataclass
class ImageResult:
    """One predicted image: its output name, source, size and detections."""

    name: str
    source: str
    width: int
    height: int
    detections: list[Detection]


@dataclass
class OutputWriter:
    """Writes each image's JSON and annotated PNG as it comes, and the summaries at the end."""

    out_dir: Path
    classes: list[str]
    model_name: str
    score_threshold: float
    images: bool = True
    results: list[ImageResult] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)

    def add(self, name: str, source: str | Path, image: np.ndarray, detections: list[Detection]) -> ImageResult:
        height, width = image.shape[:2]
        result = ImageResult(name, str(source), int(width), int(height), list(detections))
        record = {"image": result.source, "width": result.width, "height": result.height,
                  "model": self.model_name, "score_threshold": self.score_threshold,
                  "detections": [d.to_dict() for d in result.detections]}
        write_text(self.out_dir / "json" / f"{name}.json", json.dumps(record, indent=2) + "\n")
        if self.images:
            with atomic_path(self.annotated_path(name)) as tmp:
                annotate(image, result.detections, self.classes).save(tmp, format="PNG")
        self.results.append(result)
        return result

    def annotated_path(self, name: str) -> Path:
        return self.out_dir / "annotated" / f"{name}.png"

    def finish(self, card: dict | None = None, skipped: list[str] = (), report: bool = False) -> list[Path]:
        """Write ``summary.csv``, ``detections.csv`` and, if asked, ``report.html``; return their paths."""
        written = [self._write_summary(), self._write_detections()]
        if report:
            path = self.out_dir / "report.html"
            write_text(path, self.html_report(card or {}, list(skipped)))
            written.append(path)
        return written

    def _write_summary(self) -> Path:
        path = self.out_dir / "summary.csv"
        columns = ["image", "name", "width", "height", "detections", *self.classes, "top_label", "top_score"]
        rows = []
        for result in self.results:
            counts = {label: sum(d.label == label for d in result.detections) for label in self.classes}
            top = max(result.detections, key=lambda d: d.score, default=None)
            rows.append({"image": result.source, "name": result.name, "width": result.width,
                         "height": result.height, "detections": len(result.detections), **counts,
                         "top_label": top.label if top else "", "top_score": f"{top.score:.4f}" if top else ""})
        _write_csv(path, columns, rows)
        return path

    def _write_detections(self) -> Path:
        path = self.out_dir / "detections.csv"
        rows = [{"image": r.source, "name": r.name, "label": d.label, "score": f"{d.score:.4f}",
                 **{k: f"{v:.1f}" for k, v in zip(("x1", "y1", "x2", "y2"), d.box)}}
                for r in self.results for d in r.detections]
        _write_csv(path, ["image", "name", "label", "score", "x1", "y1", "x2", "y2"], rows)
        return path

    def html_report(self, card: dict, skipped: list[str]) -> str:
        """A single HTML page holding every annotated image as a data URI (no other files needed)."""
        escape = html.escape
        total = {label: sum(d.label == label for r in self.results for d in r.detections) for label in self.classes}
        legend = "".join(f'<span class="chip" style="background:{class_colour(c, self.classes)}">{escape(c)}'
                         f" &times; {total[c]}</span>" for c in self.classes)
        metrics = (card.get("metrics") or {}).get("test") or (card.get("metrics") or {}).get("val") or {}
        shown = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        metric_text = ", ".join(f"{escape(k)} {v:.3f}" for k, v in list(shown.items())[:6])
        items = []
        for result in self.results:
            rows = "".join(f"<tr><td>{escape(d.label)}</td><td>{d.score:.3f}</td>"
                           f"<td>{', '.join(f'{v:.0f}' for v in d.box)}</td></tr>" for d in result.detections)
            table = (f"<table><tr><th>class</th><th>score</th><th>box x1, y1, x2, y2 (px)</th></tr>{rows}</table>"
                     if rows else "<p>no defect above the threshold</p>")
            picture = ""
            if self.images and self.annotated_path(result.name).is_file():
                data = base64.b64encode(self.annotated_path(result.name).read_bytes()).decode("ascii")
                picture = f'<img alt="{escape(result.name)}" src="data:image/png;base64,{data}">'
            items.append(f'<section><h2>{escape(result.name)}</h2><p class="meta">{escape(result.source)} '
                         f"&middot; {result.width} &times; {result.height} px</p>{picture}{table}</section>")
        skipped_html = ("<h2>Skipped</h2><ul>" + "".join(f"<li>{escape(s)}</li>" for s in skipped) + "</ul>"
                        if skipped else "")
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>metaldefect report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
section {{ display: inline-block; vertical-align: top; margin: 0 1.5rem 1.5rem 0; max-width: 520px; }}
img {{ max-width: 500px; width: 100%; image-rendering: pixelated; border: 1px solid #ccc; }}
table {{ border-collapse: collapse; font-size: 0.9rem; margin-top: 0.4rem; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 0.15rem 0.6rem; text-align: left; }}
.chip {{ color: white; padding: 0.15rem 0.5rem; border-radius: 0.3rem; margin-right: 0.4rem; }}
.meta {{ color: #666; font-size: 0.85rem; margin: 0; }}
</style></head><body>
<h1>metaldefect report</h1>
<p>Model <b>{escape(str(card.get('name', self.model_name)))}</b>
({escape(str(card.get('backbone', '')))} + {escape(str(card.get('head', '')))} head){
' &middot; ' + metric_text if metric_text else ''}
&middot; score threshold {self.score_threshold:.2f} &middot; {len(self.results)} images</p>
<p>{legend}</p>
{''.join(items)}
{skipped_html}
</body></html>
"""


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())
