"""Text for the terminal: the one table printer of the `zoo` commands and benchmarks."""

from __future__ import annotations


def print_table(rows: list[list[object]], headers: list[str] | None = None) -> None:
    """Left-aligned columns, two spaces apart; the last column is not padded."""
    table = [[str(c) for c in r] for r in ([headers] if headers else []) + rows]
    if not table:
        return
    widths = [max(len(r[i]) for r in table if i < len(r)) for i in range(max(map(len, table)))]
    for r in table:
        print("  ".join(c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)).rstrip())
