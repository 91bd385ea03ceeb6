"""The weight-free annotators as data: one AnnotatorSpec per control map (the preprocessors of
lllyasviel/ControlNet-v1-1-nightly, gradio_*.py).

The functions live in edges.py, scribble.py, normal.py and misc.py; registry.py registers SPECS.
"""
from __future__ import annotations

from .common import AnnotatorSpec, ParamSpec
from .edges import binary, canny, canny_torch, lineart_standard, straight_lines, xdog
from .misc import color_grid, inpaint_hint, shuffle, tile
from .normal import normal_from_depth
from .scribble import clean_user_scribble, synthesize_scribble

__all__ = ["SPECS", "binary", "canny", "canny_torch", "clean_user_scribble", "color_grid", "inpaint_hint",
           "lineart_standard", "normal_from_depth", "shuffle", "straight_lines", "synthesize_scribble", "tile", "xdog"]


def _int(name: str, default: int, low: int, high: int, tooltip: str, step: int = 1) -> ParamSpec:
    return ParamSpec(name, "int", default, low, high, step, tooltip=tooltip)


def _float(name: str, default: float, low: float, high: float, step: float, tooltip: str) -> ParamSpec:
    return ParamSpec(name, "float", default, low, high, step, tooltip=tooltip)


# Order matters where two feed one control type: suggest_annotator picks the first (or the one named like it).
SPECS: tuple[AnnotatorSpec, ...] = (
    AnnotatorSpec(
        "canny", "ZeroConvCannyEdge", "Canny Edges (ZeroConv)", canny,
        (_int("low_threshold", 100, 1, 255, "weaker gradients than this are never edges"),
         _int("high_threshold", 200, 1, 255, "gradients above this always are edges")),
        control_types=("canny",), resample="edges", batch_fn=canny_torch, batch_requires=("kornia",),
        description="OpenCV Canny on the CPU, kornia's on a GPU; white edges on black"),
    AnnotatorSpec(
        "scribble_synthesis", "ZeroConvScribbleSynthesis", "Scribble from Picture (ZeroConv)", synthesize_scribble,
        control_types=("scribble",), seeded=True, resample="binary",
        description="human-like scribble as the paper trains it: random thresholds, NMS, morphology, masking"),
    AnnotatorSpec(
        "scribble_clean", "ZeroConvScribbleClean", "Clean User Scribble (ZeroConv)", clean_user_scribble,
        (_int("threshold", 127, 1, 255, "pixels darker than this (on light paper) are strokes"),),
        control_types=("scribble",), resample="binary",
        description="your own drawing, dark on light or light on dark, as white strokes on black"),
    AnnotatorSpec(
        "lineart_standard", "ZeroConvLineartStandard", "Lineart, Standard (ZeroConv)", lineart_standard,
        (_float("gaussian_sigma", 6.0, 0.5, 32.0, 0.1, "blur the picture is compared with"),
         _int("intensity_threshold", 8, 0, 255, "differences above this set the line strength scale")),
        control_types=("lineart",), description="soft lines where the picture is darker than its surround"),
    AnnotatorSpec(
        "scribble_xdog", "ZeroConvScribbleXDoG", "XDoG Lines (ZeroConv)", xdog,
        (_int("threshold", 32, 1, 255, "lower draws more lines"),),
        control_types=("scribble", "lineart"), resample="binary",
        description="difference of Gaussians (sigma 0.5 vs 5.0), thresholded"),
    AnnotatorSpec(
        "lines", "ZeroConvStraightLines", "Straight Lines, Hough (ZeroConv)", straight_lines,
        (_int("threshold", 50, 1, 500, "Hough votes a line needs"),
         _int("min_length", 20, 1, 1000, "shortest segment kept, px at detect resolution"),
         _int("max_gap", 4, 0, 100, "gaps up to this many px are bridged")),
        control_types=("mlsd",), resample="edges",
        description="straight segments (probabilistic Hough on Canny), the offline M-LSD map"),
    AnnotatorSpec(
        "normal_from_depth", "ZeroConvNormalFromDepth", "Normal from Depth (ZeroConv)", normal_from_depth,
        (_float("background_threshold", 0.4, 0.0, 1.0, 0.01, "depth below this share of the range is flat"),),
        control_types=("normal",), description="v1.0 normal map (R towards you, G up, B left) from a depth map"),
    AnnotatorSpec(
        "shuffle", "ZeroConvShuffle", "Content Shuffle (ZeroConv)", shuffle, control_types=("shuffle",),
        seeded=True, at_output_size=True, description="the picture remapped by a random smooth flow"),
    AnnotatorSpec(
        "tile", "ZeroConvTileBlur", "Tile Blur (ZeroConv)", tile,
        (_int("levels", 3, 0, 6, "halvings before growing back: more is blurrier"),), control_types=("tile",),
        description="the picture blurred by down- and up-sampling"),
    AnnotatorSpec(
        "color_grid", "ZeroConvColorGrid", "Colour Grid (ZeroConv)", color_grid,
        (_int("factor", 64, 2, 256, "cell size in px at detect resolution"),), control_types=("color",),
        resample="nearest", description="colour palette: the picture shrunk and grown back in blocks"),
    AnnotatorSpec(
        "binary", "ZeroConvBinary", "Binary Lines (ZeroConv)", binary,
        (_int("threshold", 0, 0, 255, "0 picks Otsu's threshold; pixels darker than it become white"),),
        control_types=("scribble",), resample="binary", description="dark strokes as white on black"),
)
