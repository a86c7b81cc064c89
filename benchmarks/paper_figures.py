"""The pictures of benchmarks/paper_experiments.py, drawn with PIL from data it gathers:
learning curves (one styled line per run) and the grid of what each plateau model draws."""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

import shapes

COLOURS = {"full": (128, 128, 128), "1": (31, 119, 180), "2": (44, 160, 44), "3": (214, 39, 40), "ar": (148, 103, 189)}
# How a curve is drawn besides its variant's colour: (dash pattern in pixels, None = solid; how
# far its colour is lightened towards white). Table 3's seed 0 is solid, the rest tell themselves apart.
STYLES = {"seed 0": (None, 0.0), "seed 1": ((9, 5), 0.0), "to the cap": ((2, 3), 0.3), "cosine": ((3, 4), 0.0),
          "clip": ((9, 5), 0.45), "bert": ((3, 4), 0.45)}


def curve_style(variant: str, kind: str) -> tuple:
    """(colour, dash) of a run: its variant's colour, and the STYLES entry of its kind."""
    dash, lighten = STYLES[kind]
    return tuple(round(c + (255 - c) * lighten) for c in COLOURS[variant]), dash


def dashed_line(draw, points, colour, dash, width=2) -> None:
    """A polyline, solid (dash None) or dashed with (on, off) pixel lengths that run on across its vertices."""
    if dash is None:
        draw.line(points, fill=colour, width=width, joint="curve")
        return
    on, off = dash
    phase = 0.0  # distance into the current on + off period
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        t = 0.0
        while t < length:
            drawing = phase < on
            step = min((on - phase) if drawing else (on + off - phase), length - t)
            if drawing:
                a, b = t / length, (t + step) / length
                draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                          fill=colour, width=width)
            t, phase = t + step, (phase + step) % (on + off)


def tick_step(top: float, most: int = 6) -> float:
    """A round tick spacing (1, 2 or 5 x 10^k) giving at most `most` intervals up to `top`."""
    for exponent in range(-3, 30):
        for mantissa in (1, 2, 5):
            step = mantissa * 10.0 ** exponent
            if top / step <= most:
                return step
    return top


def line_plot(series: dict, xlabel: str, path: Path, size=(960, 580)) -> None:
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=13)
    left, top, right, bottom = 60, 30, size[0] - 270, size[1] - 60
    xmax = max((x for curve in series.values() for x, _ in curve), default=1) or 1
    ymax = max(0.05, max((y for curve in series.values() for _, y in curve), default=0.05)) * 1.05
    to_px = lambda x, y: (left + (right - left) * x / xmax, bottom - (bottom - top) * y / ymax)  # noqa: E731
    dy, dx = tick_step(ymax), tick_step(xmax)
    for k in range(int(ymax / dy + 1e-9) + 1):
        y = k * dy
        draw.line([to_px(0, y), to_px(xmax, y)], fill=(230, 230, 230))
        draw.text((left - 8, to_px(0, y)[1]), f"{y:.2f}", fill="black", font=font, anchor="rm")
    for k in range(int(xmax / dx + 1e-9) + 1):
        x = k * dx
        draw.text((to_px(x, 0)[0], bottom + 6), f"{x:,.0f}" if xmax < 1e6 else f"{x:.1e}", fill="black", font=font, anchor="ma")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(((left + right) // 2, bottom + 32), xlabel, fill="black", font=font, anchor="ma")
    draw.text((left, top - 22), "accuracy, all 240 evaluation captions (one image each, temperature 0.7)", fill="black", font=font)
    for k, ((label, colour, dash), curve) in enumerate(series.items()):
        points = [to_px(x, y) for x, y in curve]
        if len(points) > 1:
            dashed_line(draw, points, colour, dash)
        for p in points:
            draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=colour)
        y = top + 12 + 22 * k
        dashed_line(draw, [(right + 15, y), (right + 50, y)], colour, dash, width=3)
        draw.text((right + 58, y), label, fill="black", font=font, anchor="lm")
    image.save(path)


def sample_grid(rows: list[tuple[str, list[Image.Image], list[bool]]], captions: list[str], path: Path,
                scale: int = 2) -> None:
    """One row of images per (label, images, passed), one column per caption, each framed green
    when it passed and red when it failed, with the captions listed below."""
    font = ImageFont.load_default(size=13)
    side = rows[0][1][0].width * scale
    cell, left, top = side + 10, 190, 26
    picture = Image.new("RGB", (left + cell * len(captions) + 10, top + cell * len(rows) + 20 + 18 * len(captions)), "white")
    draw = ImageDraw.Draw(picture)
    for j, caption in enumerate(captions):
        draw.text((left + cell * j + cell // 2, top - 6), f"{j + 1}{' (novel)' if shapes.is_novel(caption) else ''}",
                  fill="black", font=font, anchor="md")
    for i, (label, images, passed) in enumerate(rows):
        y = top + cell * i
        draw.text((8, y + cell // 2), label, fill="black", font=font, anchor="lm")
        for j, (image, ok) in enumerate(zip(images, passed)):
            x = left + cell * j
            draw.rectangle([x, y, x + cell - 4, y + cell - 4], fill=(40, 160, 60) if ok else (210, 40, 40))
            picture.paste(image.resize((side, side), Image.NEAREST), (x + 3, y + 3))
    for j, caption in enumerate(captions):
        draw.text((8, top + cell * len(rows) + 12 + 18 * j), f"{j + 1}. {caption}", fill="black", font=font)
    picture.save(path)
