"""Strength over the course of sampling: keyframes of (percent, multiplier), as Advanced-ControlNet offers."""
from __future__ import annotations

import math

from dataclasses import dataclass
from enum import Enum


class Interpolation(str, Enum):
    HOLD = "hold"  # a keyframe's multiplier holds until the next keyframe
    LINEAR = "linear"  # multipliers are interpolated linearly between keyframes


@dataclass(frozen=True)
class StrengthSchedule:
    """Multiplier of a ControlNet's strength as a function of sampling progress (0 = first step, 1 = last)."""

    keyframes: tuple[tuple[float, float], ...]  # (percent, multiplier), sorted by percent
    interpolation: Interpolation = Interpolation.HOLD

    def __post_init__(self) -> None:
        if not self.keyframes:
            raise ValueError("a strength schedule needs at least one keyframe, e.g. '0.0:1.0'")
        frames = tuple((float(p), float(m)) for p, m in self.keyframes)
        for p, m in frames:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"keyframe percent {p} is outside 0..1")
            if not math.isfinite(m) or m < 0.0:
                raise ValueError(f"keyframe multiplier {m} at {p} must be a finite number >= 0, e.g. '{p}:0.5'")
        percents = [p for p, _ in frames]
        if percents != sorted(percents) or len(set(percents)) != len(percents):
            raise ValueError(f"keyframe percents must be strictly increasing, got {percents}")
        object.__setattr__(self, "keyframes", frames)
        object.__setattr__(self, "interpolation", Interpolation(self.interpolation))

    def __call__(self, percent: float) -> float:
        frames = self.keyframes
        if percent <= frames[0][0]:
            return frames[0][1]
        for (p0, m0), (p1, m1) in zip(frames, frames[1:]):
            if p0 <= percent < p1:
                if self.interpolation is Interpolation.HOLD:
                    return m0
                return m0 + (m1 - m0) * (percent - p0) / (p1 - p0)
        return frames[-1][1]

    @classmethod
    def parse(cls, text: str, interpolation: str = "hold") -> "StrengthSchedule":
        """Parse 'percent:multiplier' pairs separated by commas or new lines, e.g. '0:1.0, 0.5:0.3'."""
        frames = []
        for item in text.replace("\n", ",").split(","):
            item = item.strip()
            if not item:
                continue
            try:
                p, m = item.split(":")
                frames.append((float(p), float(m)))
            except ValueError:
                raise ValueError(f"cannot read keyframe {item!r}; write 'percent:multiplier', e.g. '0.5:0.8'") from None
        return cls(tuple(frames), Interpolation(interpolation))
