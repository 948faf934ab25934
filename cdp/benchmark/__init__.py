"""`cdp bench` and the demo's machinery: generated images, real daemons, measurements."""

from typing import Protocol


class Progress(Protocol):
    """How the benchmark parts report: a phase starting (a line wherever it goes), or with
    live=True a figure that changes by the second (redrawn on a terminal, dropped elsewhere)."""

    def __call__(self, text: str, *, live: bool = False) -> None: ...
