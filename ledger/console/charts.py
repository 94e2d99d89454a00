"""Small bar charts drawn on the server as SVG geometry (the template writes the elements).

Pure: (label, value) points in, bars with pixel positions out. Values stay Decimal; pixel
positions are rounded to a tenth of a pixel for drawing only, never shown as amounts.
"""

from __future__ import annotations

import dataclasses
from decimal import ROUND_HALF_UP, Decimal

WIDTH, HEIGHT = 640, 180
LEFT, BOTTOM, TOP = 56, 22, 10  # room for the axis labels


@dataclasses.dataclass(frozen=True)
class Bar:
    label: str
    value: Decimal
    x: Decimal
    y: Decimal
    width: Decimal
    height: Decimal


@dataclasses.dataclass(frozen=True)
class Chart:
    title: str
    unit: str
    bars: list[Bar]
    peak: Decimal
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    top: int = TOP
    bottom: int = BOTTOM

    @property
    def base(self) -> int:
        return self.height - self.bottom

    @property
    def total(self) -> Decimal:
        return sum((b.value for b in self.bars), Decimal(0))

    @property
    def ticks(self) -> list[Bar]:
        """Bars whose label is written under the axis: the first, every 7th, the last."""
        last = len(self.bars) - 1
        return [b for i, b in enumerate(self.bars) if (i % 7 == 0 and last - i >= 4) or i == last]


def _px(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)


def bar_chart(title: str, unit: str, points: list[tuple[str, Decimal]]) -> Chart:
    plot_w = Decimal(WIDTH - LEFT - 4)
    plot_h = Decimal(HEIGHT - TOP - BOTTOM)
    peak = max((v for _, v in points), default=Decimal(0))
    slot = plot_w / max(len(points), 1)
    bars = []
    for i, (label, value) in enumerate(points):
        h = plot_h * value / peak if peak > 0 and value > 0 else Decimal(0)
        bars.append(
            Bar(
                label=label,
                value=value,
                x=_px(LEFT + slot * i + slot / 10),
                y=_px(TOP + plot_h - h),
                width=_px(slot * 8 / 10),
                height=_px(h),
            )
        )
    return Chart(title=title, unit=unit, bars=bars, peak=peak)
