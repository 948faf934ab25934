"""What the receiver knows of a volume at run time and keeps nowhere durable."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class VolumeLive:
    """Runtime facts about a volume that are not part of its durable state."""

    client: str = ""
    current_as_of: float = 0.0
    window: list[tuple[float, int, int]] = field(default_factory=list)  # (time, logical, wire)
    error: str = ""

    def rate(self, now: float, span: float = 10.0) -> tuple[float, float]:
        self.window = [w for w in self.window if now - w[0] <= span]
        if not self.window:
            return 0.0, 0.0
        first = min(w[0] for w in self.window)
        dt = max(now - first, 1.0)
        return sum(w[1] for w in self.window) / dt, sum(w[2] for w in self.window) / dt
