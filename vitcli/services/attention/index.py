"""index.html: the contact sheet of a run, one card per image.

Each card shows the image's preview (the first chosen method's overlay, rollout by default,
at tile size: readable, unlike a whole sheet shrunk into a thumbnail), its predicted label
and score, and links to the full sheet and, with --explore, the explorer page. Plain HTML
and CSS, relative links only: it works from a file:// URL with no server and no network.
"""

from __future__ import annotations

import html
import os
import urllib.parse
from pathlib import Path

from .files import IndexEntry, RunContext, write_atomic
from .names import readable


def _href(name: str, rest: str) -> str:
    """A relative URL to `name`/`rest` from the name's bytes, so that a file:// page finds a
    folder whose name is not valid UTF-8."""
    return html.escape(urllib.parse.quote(os.fsencode(name)) + rest, quote=True)


def _text(text: str) -> str:
    return html.escape(readable(text))


def _card(entry: IndexEntry, shown: str) -> str:
    sheet, folder = _href(entry.name, "/sheet.png"), _href(entry.name, "/")
    picture = _href(entry.name, "/" + (entry.preview or "sheet.png"))
    links = [f'<a href="{sheet}">sheet</a>']
    if entry.explorer:
        links.append(f'<a href="{_href(entry.name, "/" + entry.explorer)}">explorer</a>')
    links.append(f'<a href="{folder}">files</a>')
    alt = html.escape(f"{shown} of {readable(entry.path)}", quote=True)
    score = f"{entry.score:.1%}" if entry.score is not None else ""
    return (
        f'<figure><a href="{sheet}"><img src="{picture}" loading="lazy" alt="{alt}"></a>'
        f'<figcaption><span class="label">{_text(entry.label or "")}</span> '
        f'<span class="score">{score}</span>'
        f'<span class="note">{_text(entry.note or "")}</span>'
        f'<span class="file">{_text(Path(entry.path).name)}</span>'
        f'<span class="links">{" · ".join(links)}</span></figcaption></figure>'
    )


def write_index_html(
    out_dir: Path, entries: list[IndexEntry], context: RunContext, shown: str = "rollout"
) -> Path:
    """index.html in `out_dir`: a card per written image in input order, failures at the end.
    `shown`: what the previews are (a method name, or a layer's head mean)."""
    cards = [_card(entry, shown) for entry in entries if entry.error is None]
    failures = [
        f"<li><code>{_text(entry.path)}</code>: {_text(entry.error)}</li>"
        for entry in entries
        if entry.error is not None
    ]
    model = _text(str(context.model.get("reference") or context.model.get("name") or ""))
    tile = context.options.tile
    failed = f", {len(failures)} failed" if failures else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>vit attention: {len(cards)} images</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.2em 1.5em; color: #222; }}
h1 {{ font-size: 1.3em; margin: 0 0 .2em; }}
p.about {{ margin: 0 0 1em; color: #555; }}
main {{ display: grid; gap: 14px;
  grid-template-columns: repeat(auto-fill, minmax({min(tile, 260)}px, {max(tile, 260)}px)); }}
figure {{ margin: 0; border: 1px solid #ddd; border-radius: 6px; overflow: hidden;
  background: #fafafa; }}
figure img {{ display: block; width: 100%; aspect-ratio: 1 / 1; object-fit: contain;
  background: #fafafa; }}
figcaption {{ padding: 6px 8px 8px; font-size: 14px; line-height: 1.35; }}
.label {{ font-weight: 600; font-size: 16px; }}
.score {{ color: #444; }}
.note {{ display: block; color: #666; font-size: 12px; }}
.file {{ display: block; color: #666; font-size: 12px; overflow-wrap: anywhere; }}
.links {{ display: block; font-size: 13px; }}
a {{ color: #1a5fb4; }}
</style></head><body>
<h1>vit attention</h1>
<p class="about">model <code>{model}</code> · {len(cards)} images{failed} · each picture:
<b>{_text(shown)}</b> over the image, the predicted label and its probability. Click a
picture for its full sheet.</p>
<main>
{chr(10).join(cards)}
</main>
{"<h2>Failed</h2><ul>" + chr(10).join(failures) + "</ul>" if failures else ""}
</body></html>
"""
    path = out_dir / "index.html"
    write_atomic(path, page.encode("utf-8"))
    return path
