"""The report's HTML: one static page with inline CSS and images as base64 data URIs (no
scripts, no external files), written atomically."""

import base64
import html
import math

from ..utils.io import atomic_write

__all__ = ["ReportPage", "data_uri"]

_CSS = """
body { font-family: sans-serif; margin: 24px; color: #222; max-width: 1180px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; } h3 { font-size: 15px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f0f0f0; } td.name { text-align: left; }
td.bar { width: 260px; padding: 3px 4px; }
div.fill { height: 12px; min-width: 2px; }
span.swatch { display: inline-block; width: 12px; height: 12px; margin-right: 6px;
              border: 1px solid #000; vertical-align: middle; }
img { max-width: 100%; display: block; margin: 6px 0; }
p.note { color: #666; font-size: 12px; }
"""


def data_uri(data: bytes, mime: str) -> str:
    """``data:<mime>;base64,...`` of ``data``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _rgb(color):
    r, g, b = (int(v) for v in color)
    return f"rgb({r},{g},{b})"


def _cell(value, kind, color):
    """Table cell(s) of one value: see :meth:`ReportPage.class_table`."""
    if kind == "int":
        return f"<td>{int(value)}</td>"
    text = f"{value:.4f}" if math.isfinite(value) else "n/a"
    if kind != "bar":
        return f"<td>{text}</td>"
    fill = ""
    if math.isfinite(value) and value > 0:
        width = 100.0 * min(value, 1.0)
        fill = f'<div class="fill" style="width:{width:.2f}%;background:{color}"></div>'
    return f'<td>{text}</td><td class="bar">{fill}</td>'


class ReportPage:
    """Builds the page section by section; :meth:`write` renders it to a file.

    Every value put in the page is HTML-escaped; void elements are written self-closed.
    """

    def __init__(self, title: str):
        self.title = title
        self._parts = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, level: int = 2) -> None:
        self._parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, note: bool = False) -> None:
        css = ' class="note"' if note else ""
        self._parts.append(f"<p{css}>{html.escape(text)}</p>")

    def summary_table(self, items) -> None:
        """A two-column table of (name, value) pairs."""
        rows = "".join(
            f'<tr><td class="name">{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>'
            for k, v in items
        )
        self._parts.append(f"<table><tbody>{rows}</tbody></table>")

    def class_table(self, class_names, palette, columns, table_id) -> None:
        """One row per class: swatch + name, then a cell per column.

        Args:
            columns: sequence of ``(header, values, kind)``; kind ``"bar"`` draws each value
                (a fraction in [0, 1], NaN = none) as a bar in the class colour with the value
                printed, ``"int"`` / ``"float"`` print the value.
        """
        headers = "<th>class</th>" + "".join(
            ('<th colspan="2">' if kind == "bar" else "<th>") + f"{html.escape(header)}</th>"
            for header, _, kind in columns
        )
        rows = []
        for c, name in enumerate(class_names):
            color = _rgb(palette[c])
            cells = [
                f'<td class="name"><span class="swatch" style="background:{color}"></span>'
                f"{html.escape(str(name))}</td>"
            ]
            cells += [_cell(float(values[c]), kind, color) for _, values, kind in columns]
            rows.append(f"<tr>{''.join(cells)}</tr>")
        self._parts.append(
            f'<table id="{html.escape(table_id)}"><thead><tr>{headers}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
        )

    def image(self, data: bytes, mime: str, alt: str, caption: str = "", width: int = 0) -> None:
        """An embedded picture; ``width`` > 0 displays it that many CSS pixels wide."""
        style = f' style="width:{int(width)}px"' if width > 0 else ""
        self._parts.append(
            f'<figure><img src="{data_uri(data, mime)}" alt="{html.escape(alt)}"{style} />'
            + (f"<figcaption>{html.escape(caption)}</figcaption>" if caption else "")
            + "</figure>"
        )

    def render(self) -> str:
        return (
            '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8" />'
            f"<title>{html.escape(self.title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(self._parts)
            + "\n</body></html>\n"
        )

    def write(self, path: str) -> str:
        """Write the page to ``path`` atomically; returns ``path``."""
        text = self.render()
        with atomic_write(path, "w") as f:
            f.write(text)
        return path
