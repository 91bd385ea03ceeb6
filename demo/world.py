"""A synthetic world in the spirit of Fill50K (the paper's toy dataset, lllyasviel/ControlNet docs/train.md): one filled shape on a flat background.

The target is a shape filled with colour A on a background of colour B, the condition is the shape's outline
(white, about 1.5 px, anti-aliased, on black), the caption is "<A> <shape> with <B> background". Everything is
drawn from a seed, so any size of data set can be rewritten bit for bit.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# CSS named colours (CSS Color Module Level 4), one word each, chosen to be far apart in RGB.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "orange": (255, 165, 0),
    "yellow": (255, 255, 0),
    "green": (0, 128, 0),
    "cyan": (0, 255, 255),
    "blue": (0, 0, 255),
    "purple": (128, 0, 128),
    "magenta": (255, 0, 255),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
CAPTION_TEMPLATE = "{shape_colour} {shape} with {background} background"  # Fill50K's wording
CAPTION_WORDS: tuple[str, ...] = ("with", "background")  # the template's own words (the text encoder's vocabulary)
RADIUS_RANGE = (0.18, 0.42)  # circumradius as a share of the image side
CENTRE_RANGE = (0.15, 0.85)  # centre coordinates as a share of the side; large shapes may leave the frame
OUTLINE_WIDTH = 1.5  # outline width in pixels (Fill50K: about 1-2 px)
SUPERSAMPLE = 4  # drawing scale before the box-filter downsample that anti-aliases edges


@dataclass(frozen=True)
class ShapeSpec:
    """One world picture: what is drawn where, in units of the image side (so any resolution renders it)."""

    shape: str  # one of SHAPES
    colour: str  # shape colour, a PALETTE name
    background: str  # background colour, a PALETTE name, never the shape colour
    cx: float  # centre x in [0, 1]
    cy: float  # centre y in [0, 1]
    radius: float  # circumradius as a share of the side
    angle: float  # rotation in radians (squares and triangles)

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        for name in (self.colour, self.background):
            if name not in PALETTE:
                raise ValueError(f"colour {name!r} is not in the world palette; choose one of {sorted(PALETTE)}")
        if self.colour == self.background:
            raise ValueError(f"shape and background colours must differ, both are {self.colour!r}")

    @property
    def caption(self) -> str:
        return CAPTION_TEMPLATE.format(shape_colour=self.colour, shape=self.shape, background=self.background)


def random_spec(rng: np.random.Generator) -> ShapeSpec:
    """One uniformly drawn picture of the world."""
    colour, background = rng.choice(len(PALETTE), size=2, replace=False)
    names = list(PALETTE)
    return ShapeSpec(shape=SHAPES[int(rng.integers(len(SHAPES)))], colour=names[colour], background=names[background],
                     cx=float(rng.uniform(*CENTRE_RANGE)), cy=float(rng.uniform(*CENTRE_RANGE)),
                     radius=float(rng.uniform(*RADIUS_RANGE)), angle=float(rng.uniform(0, 2 * math.pi)))


def random_specs(count: int, seed: int) -> list[ShapeSpec]:
    """`count` pictures from `seed` (numpy PCG64), the same on every machine."""
    rng = np.random.default_rng(seed)
    return [random_spec(rng) for _ in range(count)]


def _polygon(spec: ShapeSpec, side: float) -> list[tuple[float, float]]:
    corners = {"square": 4, "triangle": 3}[spec.shape]
    cx, cy, r = spec.cx * side, spec.cy * side, spec.radius * side
    return [(cx + r * math.cos(spec.angle + 2 * math.pi * k / corners),
             cy + r * math.sin(spec.angle + 2 * math.pi * k / corners)) for k in range(corners)]


def _draw(spec: ShapeSpec, size: int, fill: int | None, outline: int | None, width: float) -> np.ndarray:
    """Grey-level coverage (H, W) in [0, 1] of the shape's fill or outline, supersampled then box-filtered."""
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    line = max(1, round(width * SUPERSAMPLE)) if outline is not None else 0
    if spec.shape == "circle":
        cx, cy, r = spec.cx * big, spec.cy * big, spec.radius * big
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=line)
    else:
        points = _polygon(spec, big)
        if fill is not None:
            draw.polygon(points, fill=fill)
        if outline is not None:
            draw.line(points + points[:1], fill=outline, width=line, joint="curve")
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def shape_mask(spec: ShapeSpec, size: int) -> np.ndarray:
    """(H, W) bool: pixels at least half covered by the filled shape (the outline's filled area)."""
    return _draw(spec, size, fill=255, outline=None, width=0) >= 0.5


def render_target(spec: ShapeSpec, size: int) -> np.ndarray:
    """(H, W, 3) uint8: the shape in its colour on the background colour, anti-aliased."""
    cover = _draw(spec, size, fill=255, outline=None, width=0)[..., None]
    fg, bg = np.array(PALETTE[spec.colour], np.float32), np.array(PALETTE[spec.background], np.float32)
    return np.round(cover * fg + (1 - cover) * bg).astype(np.uint8)


def render_outline(spec: ShapeSpec, size: int, width: float = OUTLINE_WIDTH) -> np.ndarray:
    """(H, W, 3) uint8: the condition, the shape's outline in white on black."""
    line = _draw(spec, size, fill=None, outline=255, width=width)
    return np.repeat(np.round(line * 255).astype(np.uint8)[..., None], 3, axis=2)


def write_dataset(folder: str | Path, count: int, size: int = 64, seed: int = 0) -> Path:
    """Write Fill50K's layout: source/<n>.png (outline), target/<n>.png, prompt.json (JSON Lines); returns the jsonl."""
    if count < 1 or size < 8 or size % 8:
        raise ValueError(f"need count >= 1 and size a multiple of 8 (latents are 1/8 size), got {count}, {size}")
    folder = Path(folder)
    (folder / "source").mkdir(parents=True, exist_ok=True)
    (folder / "target").mkdir(parents=True, exist_ok=True)
    specs = random_specs(count, seed)
    rows = []
    for n, spec in enumerate(specs):
        source, target = f"source/{n}.png", f"target/{n}.png"
        Image.fromarray(render_outline(spec, size)).save(folder / source)
        Image.fromarray(render_target(spec, size)).save(folder / target)
        rows.append(json.dumps({"source": source, "target": target, "prompt": spec.caption}))
    (folder / "world.json").write_text(json.dumps({"count": count, "size": size, "seed": seed,
                                                   "specs": [asdict(s) for s in specs]}))
    prompt_file = folder / "prompt.json"
    prompt_file.write_text("\n".join(rows) + "\n")
    return prompt_file


# ---- measuring generated pictures of the world --------------------------------------------------------------
def nearest_colour(rgb: np.ndarray) -> str:
    """The palette name nearest (Euclidean RGB) to a colour."""
    names = list(PALETTE)
    table = np.array([PALETTE[n] for n in names], np.float32)
    return names[int(np.argmin(((table - np.asarray(rgb, np.float32)) ** 2).sum(axis=1)))]


def segment_shape(image: np.ndarray, spec: ShapeSpec) -> np.ndarray:
    """(H, W) bool: pixels nearer the caption's shape colour than its background colour."""
    pixels = image.astype(np.float32)
    fg = ((pixels - np.array(PALETTE[spec.colour], np.float32)) ** 2).sum(axis=-1)
    bg = ((pixels - np.array(PALETTE[spec.background], np.float32)) ** 2).sum(axis=-1)
    return fg < bg


def colours_match(image: np.ndarray, shape: np.ndarray, spec: ShapeSpec) -> bool:
    """True when the mean colours of the shape and of the rest are nearest to the caption's two colours."""
    if shape.all() or not shape.any():
        return False
    return (nearest_colour(image[shape].mean(axis=0)) == spec.colour
            and nearest_colour(image[~shape].mean(axis=0)) == spec.background)


def main(argv: list[str] | None = None) -> int:
    """python -m zeroconv.demo.world --out data/world --count 20000 --size 64 --seed 1"""
    import argparse
    import logging

    parser = argparse.ArgumentParser(prog="python -m zeroconv.demo.world", description=__doc__)
    parser.add_argument("--out", required=True, help="folder to write source/, target/ and prompt.json into")
    parser.add_argument("--count", type=int, default=20000, help="number of pictures")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 8)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the pictures")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = write_dataset(args.out, args.count, args.size, args.seed)
    logging.getLogger(__name__).info("wrote %d pictures and %s", args.count, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
