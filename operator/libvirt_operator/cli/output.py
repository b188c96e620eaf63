"""Tables as kubectl prints them: upper-case headers, columns three spaces apart."""

from __future__ import annotations


def table(header: list[str], rows: list[list[str]]) -> str:
    cells = [header, *[[c if c else "-" for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)
