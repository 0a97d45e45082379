"""A small document model written out twice: as Markdown and as one self-contained HTML page.

The page needs no server, no script and no network: figures are embedded as base64 ``data:`` URIs and the
style sheet is inline, so ``index.html`` opens from ``file://`` (or as a mail attachment) as it is. Text
blocks may hold inline code in backticks, ``**bold**`` and ``[links](target)``; everything else is
escaped. Both files are written atomically (temporary file, then rename), so a reader never sees half a
report.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    """A paragraph, or a bulleted list when ``items`` is given."""

    text: str = ""
    items: tuple[str, ...] = ()


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Code:
    text: str
    language: str = ""


@dataclass(frozen=True)
class Figure:
    """An image file, given relative to the folder the document is written into."""

    path: str
    caption: str


Block = Heading | Text | Table | Code | Figure

STYLE = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222;
       max-width: 1180px; margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.6em; border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #eee; }
code, pre { font: 13px/1.4 ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
code { background: #f3f3f3; padding: 0 .25em; border-radius: 3px; }
pre { background: #f6f8fa; border: 1px solid #e4e4e4; border-radius: 4px; padding: .8em; overflow-x: auto; }
pre code { background: none; padding: 0; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ddd; padding: .25em .7em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9em; }
"""


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Text):
            out.append("\n".join(f"* {item}" for item in block.items) if block.items else block.text)
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(block.header) + " |", "|" + "---|" * len(block.header)]
            lines += [
                "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in block.rows
            ]
            out.append("\n".join(lines))
        elif isinstance(block, Code):
            out.append(f"```{block.language}\n{block.text.rstrip()}\n```")
        else:
            out.append(f"![{block.caption}]({block.path})\n\n*{block.caption}*")
    return "\n\n".join(out) + "\n"


def to_html(blocks: Sequence[Block], title: str, folder: Path) -> str:
    """One HTML page; figures are read from ``folder`` and embedded (a missing one is named instead)."""
    body: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            body.append(f"<h{block.level}>{_inline(block.text)}</h{block.level}>")
        elif isinstance(block, Text):
            if block.items:
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
            else:
                body.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{_inline(h)}</th>" for h in block.header)
            rows = "".join(
                "<tr>" + "".join(_cell(c, first=i == 0) for i, c in enumerate(row)) + "</tr>"
                for row in block.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif isinstance(block, Code):
            body.append(f"<pre><code>{html.escape(block.text.rstrip())}</code></pre>")
        else:
            body.append(_figure(block, folder))
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def _figure(block: Figure, folder: Path) -> str:
    caption = _inline(block.caption)
    path = folder / block.path
    if not path.is_file():
        return f"<p><em>missing figure {html.escape(block.path)}: {caption}</em></p>"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


_NUMBER = re.compile(r"^[-+]?[\d.,]+( ?[%s×]| ± [\d.]+)?$")


def _cell(text: str, first: bool) -> str:
    cls = ' class="num"' if not first and _NUMBER.match(text) else ""
    return f"<td{cls}>{_inline(text)}</td>"


_CODE = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline(text: str) -> str:
    """Escaped text with `code`, **bold** and [links](target) turned into HTML (link targets made
    HTML-side: ``report.md`` targets point at the ``index.html`` beside them)."""
    parts = _CODE.split(text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(f"<code>{html.escape(part)}</code>")
            continue
        escaped = _BOLD.sub(r"<strong>\1</strong>", html.escape(part))
        out.append(
            _LINK.sub(
                lambda m: (
                    f'<a href="{html.escape(_html_target(html.unescape(m.group(2))))}">{m.group(1)}</a>'
                ),
                escaped,
            )
        )
    return "".join(out)


def _html_target(target: str) -> str:
    return target[: -len("report.md")] + "index.html" if target.endswith("report.md") else target


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_document(blocks: Sequence[Block], folder: Path, title: str) -> tuple[Path, Path]:
    """``report.md`` and ``index.html`` of ``blocks`` in ``folder``; returns both paths."""
    md, page = folder / "report.md", folder / "index.html"
    write_atomic(md, to_markdown(blocks))
    write_atomic(page, to_html(blocks, title, folder))
    return md, page


__all__ = ["Block", "Code", "Figure", "Heading", "Table", "Text", "to_html", "to_markdown", "write_document"]
