"""The results page of ``imem retrieve``: one self-contained HTML file a person opens in a browser.

Images are embedded as base64 JPEG thumbnails (the page survives being moved or mailed); audio is linked
relatively from the page's folder (songs are too large to embed) and played by ``<audio controls>``.
A small SVG plots the query and the results in the valence-arousal plane.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from urllib.parse import quote

import pandas as pd

THUMB = 160  # px, longest side


def thumbnail_data_uri(path: str | Path, size: int = THUMB) -> str:
    """A JPEG thumbnail, under the same size limit as the image's embedding (imem.inference.MAX_IMAGE_PIXELS)."""
    from PIL import Image

    from imem import inference
    from imem.errors import ImemError
    from imem.features.store import IMAGE_ERRORS, open_image

    try:
        with open_image(path, inference.MAX_IMAGE_PIXELS) as im:
            im = im.convert("RGB")
            im.thumbnail((size, size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except IMAGE_ERRORS as exc:
        raise ImemError(f"unreadable image file {path}: {str(exc).splitlines()[0]}") from exc
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def relative_url(path: str | Path, page_dir: Path) -> str:
    return quote(Path(os.path.relpath(Path(path).resolve(), page_dir.resolve())).as_posix())


def _media(path: str, kind: str, page_dir: Path) -> str:
    if kind == "image":
        return f'<img class="thumb" src="{thumbnail_data_uri(path)}" alt="{html.escape(Path(path).name)}">'
    return f'<audio controls preload="metadata" src="{relative_url(path, page_dir)}"></audio>'


def _va_plot(query_va: tuple[float, float], results: pd.DataFrame, size: int = 300) -> str:
    """Valence (x) - arousal (y) plane, [0, 1]^2 (the prepared labels' normalised scale)."""
    pad = 30

    def xy(v: float, a: float) -> tuple[float, float]:
        return pad + v * (size - 2 * pad), size - pad - a * (size - 2 * pad)

    parts = [f'<svg class="va" width="{size}" height="{size}" viewBox="0 0 {size} {size}" '
             'xmlns="http://www.w3.org/2000/svg">',
             f'<rect x="{pad}" y="{pad}" width="{size - 2 * pad}" height="{size - 2 * pad}" fill="#fafafa" '
             'stroke="#999"/>',
             f'<line x1="{size / 2}" y1="{pad}" x2="{size / 2}" y2="{size - pad}" stroke="#ddd"/>',
             f'<line x1="{pad}" y1="{size / 2}" x2="{size - pad}" y2="{size / 2}" stroke="#ddd"/>',
             f'<text x="{size / 2}" y="{size - 8}" text-anchor="middle" class="ax">valence &#8594;</text>',
             f'<text x="{pad}" y="{size - pad + 12}" text-anchor="middle" class="ax">0</text>',
             f'<text x="{size - pad}" y="{size - pad + 12}" text-anchor="middle" class="ax">1</text>',
             f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end" class="ax">1</text>',
             f'<text x="12" y="{size / 2}" text-anchor="middle" class="ax" '
             f'transform="rotate(-90 12 {size / 2})">arousal &#8594;</text>']
    for r in results.itertuples():
        x, y = xy(r.valence, r.arousal)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="9" fill="#4a7fc1" opacity="0.85"/>'
                     f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle" class="lbl">{r.rank}</text>')
    qx, qy = xy(*query_va)
    parts.append(f'<rect x="{qx - 8:.1f}" y="{qy - 8:.1f}" width="16" height="16" fill="#d9534f"/>'
                 f'<text x="{qx:.1f}" y="{qy + 4:.1f}" text-anchor="middle" class="lbl">Q</text>')
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; margin: 0 0 4px; } .sub { color: #666; margin-bottom: 18px; font-size: 13px; }
.top { display: flex; gap: 32px; align-items: flex-start; margin-bottom: 22px; }
.query { border: 2px solid #d9534f; border-radius: 8px; padding: 12px; max-width: 420px; }
.query h2, .plot h2 { font-size: 15px; margin: 0 0 8px; }
table { border-collapse: collapse; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 6px 12px; text-align: left; vertical-align: middle;
         font-size: 14px; }
th { background: #f3f3f3; } td.num { font-variant-numeric: tabular-nums; text-align: right; }
img.thumb { max-width: 160px; max-height: 160px; border-radius: 4px; display: block; }
audio { width: 280px; } .name { font-size: 12px; color: #555; word-break: break-all; max-width: 260px; }
.score { display: flex; align-items: center; gap: 8px; font-variant-numeric: tabular-nums; }
.bar { background: #e8eef7; width: 100px; height: 10px; border-radius: 5px; }
.bar > div { background: #4a7fc1; height: 10px; border-radius: 5px; }
.ax { font-size: 11px; fill: #555; } .lbl { font-size: 10px; fill: #fff; font-weight: bold; }
.note { color: #666; font-size: 12px; margin-top: 16px; max-width: 900px; }
"""


def render_results(results: pd.DataFrame, summary: dict, page_dir: str | Path) -> str:
    """The page's HTML; media links are relative to ``page_dir`` (where index.html is written)."""
    page_dir = Path(page_dir)
    q_kind = "audio" if summary["query_type"] == "audio" else "image"
    r_kind = "image" if q_kind == "audio" else "audio"
    title = "music &#8594; images" if q_kind == "audio" else "image &#8594; music"
    qva = (summary["query_valence"], summary["query_arousal"])
    q_extra = (f"<br>{summary['query_windows']} windows of {summary['clip_s']:g} s (hop {summary['hop_s']:g} s); "
               "VA and embedding are their mean" if q_kind == "audio" else "")
    rows = []
    for r in results.itertuples():
        extra = f"<br>{r.windows} windows" if r_kind == "audio" else ""
        rows.append(
            f"<tr><td class='num'>{r.rank}</td><td>{_media(r.path, r_kind, page_dir)}"
            f"<div class='name'><a href='{relative_url(r.path, page_dir)}'>{html.escape(Path(r.path).name)}</a>"
            f"{extra}</div></td>"
            f"<td><div class='score'><div class='bar'><div style='width:{100 * r.predicted_s:.0f}%'></div></div>"
            f"<span>{r.predicted_s:.3f}</span></div></td><td class='num'>{r.valence:.3f}</td><td class='num'>{r.arousal:.3f}</td>"
            f"<td class='num'>{r.embedding_distance:.3f}</td></tr>")
    ranked = "predicted similarity S" if summary["rank_by"] == "sim" else "embedding distance ||f_I - f_M||&#178;"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>imem retrieval: {title}</title>
<style>{CSS}</style></head><body>
<h1>imem retrieval: {title}</h1>
<div class="sub">model {html.escape(summary['model'])} &middot; collection {html.escape(summary['collection'])}
({summary['collection_size']} files; {summary['embedded']} embedded now, {summary['cached']} from the cache)
&middot; top {summary['k']} by {ranked}</div>
<div class="top">
<div class="query"><h2>Query</h2>{_media(summary['query'], q_kind, page_dir)}
<div class="name"><a href="{relative_url(summary['query'], page_dir)}">{html.escape(Path(summary['query']).name)}</a></div>
<p>predicted valence <b>{qva[0]:.3f}</b>, arousal <b>{qva[1]:.3f}</b>{q_extra}</p></div>
<div class="plot"><h2>Valence&#8211;arousal plane</h2>{_va_plot(qva, results)}</div>
</div>
<table><thead><tr><th>#</th><th>{'image' if r_kind == 'image' else 'music'}</th><th>predicted S</th>
<th>valence</th><th>arousal</th><th>embedding distance</th></tr></thead>
<tbody>
{chr(10).join(rows)}
</tbody></table>
<p class="note">Predicted S is the model's similarity decoder output in [0, 1] (CDCML: S = exp(-d/&sigma;) of the
VA distance is what it was trained to predict). Valence and arousal are predicted, on the [0, 1] scale of the
prepared labels. The embedding distance is the squared Euclidean distance in the shared 512-d space.</p>
</body></html>
"""
