"""The evaluation report, written once as Markdown (``report.md``) and once as self-contained HTML.

The report is assembled as a list of blocks (headings, paragraphs, tables, images) and rendered by two
small writers, so both files always hold the same content. The HTML embeds its figures as base64 PNGs
and opens in any browser with nothing next to it; the Markdown links the PNGs in ``figures/``.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

#: Top-level sections of every report, in order (tests check for them).
SECTIONS = (
    "Setup",
    "Results by dose",
    "Comparison with the reference method",
    "Robustness: out-of-generator noise",
    "Runtime",
    "Visual examples",
    "Files",
)


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    text: str  # Markdown inline: **bold** and `code` are rendered in HTML too


@dataclass
class Table:
    frame: pd.DataFrame
    caption: str = ""


@dataclass
class Image:
    path: Path  # absolute path of the PNG
    caption: str


Block = Heading | Para | Table | Image


# ------------------------------------------------------------------------------------------- markdown
def _md_cell(v: object) -> str:
    if isinstance(v, float):
        v = "n/a" if not np.isfinite(v) else f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of ``frame`` (index included when it is named)."""
    df = frame.reset_index() if frame.index.name else frame
    head = "| " + " | ".join(_md_cell(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


def to_markdown(blocks: Sequence[Block], root: Path) -> str:
    """Render ``blocks``; image links are relative to ``root`` (the report's folder)."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Table):
            if b.caption:
                out.append(f"*{b.caption}*\n")
            out.append(markdown_table(b.frame) if not b.frame.empty else "(no data)")
        elif isinstance(b, Image):
            rel = b.path.relative_to(root).as_posix() if b.path.is_relative_to(root) else b.path.as_posix()
            out.append(f"![{b.caption}]({rel})\n\n*{b.caption}*")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- html
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1.2em;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}
th{background:#f3f3f3}
caption{caption-side:top;text-align:left;font-style:italic;padding:.3em 0}
img{max-width:100%;border:1px solid #ddd}
figure{margin:1em 0}
figcaption{font-style:italic;color:#555}
code{background:#f5f5f5;padding:0 .2em}
"""


def _inline(text: str) -> str:
    s = html.escape(text, quote=False)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return s


def html_table(frame: pd.DataFrame, caption: str = "") -> str:
    df = frame.reset_index() if frame.index.name else frame
    head = "".join(f"<th>{_inline(_md_cell(c))}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_inline(_md_cell(v))}</td>" for v in row) + "</tr>"
        for row in df.itertuples(index=False)
    )
    cap = f"<caption>{_inline(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def to_html(blocks: Sequence[Block], title: str) -> str:
    """Render ``blocks`` as one self-contained HTML page (figures embedded as base64 PNG)."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
    ]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            parts.append("".join(f"<p>{_inline(p)}</p>" for p in b.text.split("\n\n")))
        elif isinstance(b, Table):
            parts.append(html_table(b.frame, b.caption) if not b.frame.empty else "<p>(no data)</p>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            parts.append(
                f"<figure><img alt='{html.escape(b.caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{_inline(b.caption)}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(blocks: Sequence[Block], out_dir: str | Path, title: str) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` into ``out_dir``; returns both paths."""
    out = Path(out_dir)
    md = out / "report.md"
    md.write_text(to_markdown(blocks, out.resolve()))
    page = out / "report.html"
    page.write_text(to_html(blocks, title))
    return md, page
