"""Draws docs/annotators.png: a synthetic picture and the control maps ZeroConv makes from it, offline.

    python docs/make_annotator_figure.py
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from zeroconv.annotators.pose import draw_pose, parse_openpose_json
from zeroconv.annotators.registry import annotate

SIZE = 256


def scene() -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[:] = np.linspace(40, 200, SIZE, dtype=np.uint8)[:, None, None] * np.array([0.4, 0.6, 1.0])
    cv2.circle(image, (90, 110), 55, (230, 80, 60), -1)
    cv2.rectangle(image, (150, 140), (235, 230), (60, 200, 90), -1)
    cv2.line(image, (10, 240), (250, 180), (250, 250, 250), 4)
    return image


def sphere_depth() -> np.ndarray:
    yy, xx = np.mgrid[:SIZE, :SIZE] - SIZE // 2
    depth = np.sqrt(np.clip(100**2 - xx**2 - yy**2, 0, None))
    return (depth / depth.max() * 255).astype(np.uint8)


def main() -> int:
    image = scene()
    body = [[128, 40], [128, 80], [98, 80], [85, 125], [80, 170], [158, 80], [171, 125], [176, 170], [108, 160],
            [104, 205], [100, 250], [148, 160], [152, 205], [156, 250], [120, 34], [136, 34], [112, 40], [144, 40]]
    pose_json = json.dumps({"people": [{"pose_keypoints_2d": [v for x, y in body for v in (x, y, 1)]}],
                            "canvas_width": SIZE, "canvas_height": SIZE})
    panels = [("picture", image), ("canny", annotate("canny", image, 0)),
              ("scribble (seed 1)", annotate("scribble_synthesis", image, 0, seed=1)),
              ("lines (Hough)", annotate("lines", image, 0)), ("xdog", annotate("scribble_xdog", image, 0)),
              ("normal from depth", annotate("normal_from_depth", sphere_depth(), 0, background_threshold=0.05)),
              ("colour grid", annotate("color_grid", image, 0, factor=32)),
              ("openpose from JSON", draw_pose(*parse_openpose_json(pose_json)))]
    tiles = []
    for title, panel in panels:
        tile = np.full((SIZE + 28, SIZE, 3), 255, np.uint8)
        tile[28:] = panel
        cv2.putText(tile, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(tile)
    grid = np.vstack([np.hstack(tiles[:4]), np.hstack(tiles[4:])])
    out = Path(__file__).resolve().parent / "annotators.png"
    cv2.imwrite(str(out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
