"""HTML pieces for ``analysis.report``: a self-contained page (inline CSS, inline SVG, no scripts, no
external references), tables, key/value lists, flags, markdown tables as HTML, figures as SVG."""

from __future__ import annotations

import html
import io
import re
from collections.abc import Iterable, Sequence

import matplotlib
from matplotlib.figure import Figure

from analysis.run_facts import Flag

esc = html.escape
NUMERIC = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?( ?%)?( \(.*\)| \[.*\])?$|^×|^x\d")

CSS = """
:root { --ink: #1f2328; --mute: #57606a; --line: #d0d7de; --head: #f6f8fa; --warn: #b45309; --warn-bg: #fff4e0;
        --info: #0969da; --info-bg: #eef5fc; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: var(--ink);
       background: #fff; max-width: 1240px; margin: 28px auto; padding: 0 28px; }
h1 { font-size: 25px; margin: 0 0 2px; }
h2 { font-size: 20px; border-bottom: 2px solid var(--ink); padding-bottom: 3px; margin: 40px 0 10px; }
h3 { font-size: 16px; margin: 24px 0 6px; }
h4 { font-size: 14px; margin: 16px 0 4px; }
p { margin: 4px 0 8px; }
.sub, .note { color: var(--mute); }
.note { font-size: 12px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0 14px; }
th, td { border: 1px solid var(--line); padding: 3px 7px; vertical-align: top; text-align: left; }
thead th { background: var(--head); font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tbody th { font-weight: 600; background: var(--head); white-space: nowrap; }
table.kv { width: 100%; }
table.kv th { width: 34%; }
table.kv td { word-break: break-word; }
.facts { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 0 22px; }
.flag { border-left: 6px solid var(--warn); background: var(--warn-bg); padding: 7px 12px; margin: 6px 0;
        border-radius: 0 4px 4px 0; }
.flag.info { border-color: var(--info); background: var(--info-bg); }
.flag .kind { font-weight: 700; text-transform: uppercase; letter-spacing: .04em; font-size: 12px; margin-right: 8px; }
.flag.warning .kind { color: var(--warn); }
.flag.info .kind { color: var(--info); }
.flag .who { font-weight: 600; margin-right: 6px; }
.figs { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 8px 24px; }
figure { margin: 6px 0 14px; break-inside: avoid; }
figure svg { width: 100%; height: auto; display: block; }
.pair { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, max-content)); gap: 0 36px; }
.sysinfo { font: 11px/1.4 ui-monospace, "DejaVu Sans Mono", monospace; color: var(--mute); word-break: break-word; }
figcaption { font-size: 12px; color: var(--mute); }
nav ol { margin: 4px 0; padding-left: 22px; }
a { color: var(--info); }
code { font: 12px ui-monospace, "DejaVu Sans Mono", monospace; }
@media print {
  @page { size: A4 landscape; margin: 11mm; }
  body { max-width: none; margin: 0; padding: 0; font-size: 10pt; }
  section.page { break-before: page; }
  h2, h3, h4 { break-after: avoid; }
  table { font-size: 7.5pt; }
  tr, figure, .flag, table.kv { break-inside: avoid; }
  thead { display: table-header-group; }
  .scroll { overflow: visible; }
  a { color: inherit; text-decoration: none; }
  .flag { print-color-adjust: exact; -webkit-print-color-adjust: exact; }
  .figs { grid-template-columns: 1fr 1fr; }
  .facts { grid-template-columns: 1fr 1fr 1fr; }
  figure svg { width: auto; height: auto; max-width: 100%; max-height: 165mm; margin: 0 auto; }
  nav { display: none; }
}
"""


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>{esc(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _cell(text: str, tag: str = "td") -> str:
    cls = ' class="num"' if tag == "td" and NUMERIC.match(text.strip()) else ""
    return f"<{tag}{cls}>{esc(text)}</{tag}>"


def _width(col: list[str]) -> int:
    """Estimated px of a column at 12 px: numbers never wrap, text wraps at ~22 characters, headers at spaces."""
    head, cells = col[0], col[1:]
    longest = max((len(c) if NUMERIC.match(c.strip()) else min(len(c), 22) for c in cells), default=0)
    return 7 * max(longest, *(len(w) for w in head.split() or [""])) + 16


def table(head: Sequence[str], rows: Iterable[Sequence[str]], row_heads: bool = False, keep: int = 0,
          budget: int = 1180) -> str:
    """A table; with ``row_heads`` the first cell of each row is a row header. With ``keep`` > 0, a table
    wider than ``budget`` px is cut into several, each repeating the first ``keep`` columns."""
    rows = [list(r) for r in rows]
    cols = [[hd, *(r[i] if i < len(r) else "" for r in rows)] for i, hd in enumerate(head)]
    chunks, cur, used = [], [], sum(_width(c) for c in cols[:keep])
    for i in range(keep, len(cols)):
        w = _width(cols[i])
        if cur and used + w > budget:
            chunks.append(cur)
            cur, used = [], sum(_width(c) for c in cols[:keep])
        cur.append(i)
        used += w
    chunks = [*chunks, cur] if keep else [list(range(len(cols)))]
    out = []
    for chunk in chunks:
        idx = [*range(keep), *chunk] if keep else chunk
        h = "".join(f"<th>{esc(cols[i][0])}</th>" for i in idx)
        body = "".join("<tr>" + "".join(_cell(cols[i][j + 1], "th" if row_heads and i == 0 else "td") for i in idx)
                       + "</tr>" for j in range(len(rows)))
        out.append(f'<div class="scroll"><table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table></div>')
    return "\n".join(out)


def kv_table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    return f'<div><h4>{esc(title)}</h4><table class="kv"><tbody>{body}</tbody></table></div>'


def flags(items: Sequence[tuple[str, Flag]]) -> str:
    """(who, flag) pairs as boxes: warnings in amber, information in blue; ``who`` names the run."""
    out = []
    for who, f in items:
        detail = f' <span class="note">({esc(f.detail)})</span>' if f.detail else ""
        name = f'<span class="who">{esc(who)}:</span>' if who else ""
        out.append(f'<div class="flag {esc(f.level)}"><span class="kind">{esc(f.kind)}</span>{name}'
                   f"{esc(f.message)}{detail}</div>")
    return "\n".join(out)


def inline(text: str) -> str:
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", esc(text))


def markdown(md: str, shift: int = 0, keep: int = 0) -> str:
    """The markdown this package prints (headings, pipe tables, bullets, paragraphs) as HTML;
    headings move down ``shift`` levels; wide tables are cut repeating ``keep`` columns (``table``)."""
    out, lines, i = [], md.splitlines(), 0
    while i < len(lines):
        ln = lines[i].rstrip()
        if ln.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split(" | ")])
                i += 1
            body = [r for r in block[2:]] if len(block) > 1 and set("".join(block[1])) <= set("-:|") else block[1:]
            out.append(table(block[0], body, keep=keep))
            continue
        if ln.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{inline(lines[i][2:])}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
            continue
        m = re.match(r"^(#{1,4}) (.*)$", ln)
        if m:
            level = min(len(m.group(1)) + shift, 6)
            out.append(f"<h{level}>{inline(m.group(2))}</h{level}>")
        elif ln:
            out.append(f"<p>{inline(ln)}</p>")
        i += 1
    return "\n".join(out)


def svg(fig: Figure, uid: str) -> str:
    """A figure as inline SVG: glyphs as paths (no fonts needed), ids prefixed with ``uid`` so several
    figures can share a page, no XML prolog, metadata or namespace URLs."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": uid}):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    s = buf.getvalue()
    s = s[s.index("<svg"):]
    s = re.sub(r"<metadata>.*?</metadata>", "", s, flags=re.S)
    s = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", s)
    s = re.sub(r'\bid="([^"]+)"', rf'id="{uid}-\1"', s)
    s = re.sub(r'href="#([^"]+)"', rf'href="#{uid}-\1"', s)
    return re.sub(r"url\(#([^)]+)\)", rf"url(#{uid}-\1)", s)


def figure(fig: Figure, uid: str, caption: str) -> str:
    return f"<figure>{svg(fig, uid)}<figcaption>{esc(caption)}</figcaption></figure>"
