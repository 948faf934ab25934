"""Printing rich tables: a terminal's width on a terminal, the table's own width anywhere else."""

from __future__ import annotations

from typing import Any

# Off a terminal (a pipe, a file, a log) nothing wraps lines for us, and squeezing a table
# to 80 columns cuts words ("volu…"): render at the table's natural width, up to this.
OFF_TTY_WIDTH = 1000


def print_table(renderable: Any, *, stderr: bool = False) -> None:
    """Print a rich renderable; off a terminal, as wide as it needs (no truncated cells)."""
    from rich.console import Console

    console = Console(stderr=stderr)
    if not console.is_terminal:
        console = Console(stderr=stderr, width=OFF_TTY_WIDTH)
    console.print(renderable)
