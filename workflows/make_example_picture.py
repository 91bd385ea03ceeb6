"""Draws workflows/inputs/example.png, the picture every annotator workflow loads, from code (ours, no photo).

    python workflows/make_example_picture.py

A 768x512 scene with what each annotator looks for: straight edges and a roof (Canny, M-LSD, lines), a sun and a
tree (soft edges, scribbles), a figure with a head, arms and legs (pose), a near-to-far ground (depth), thin fence
lines and a dark outline drawing (lineart, binary). Flat colours with a few gradients, so the PNG stays small and
the same bytes come out every run. Also workflows/inputs/inpaint.png: the scene with the tree made transparent.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

OUT = Path(__file__).resolve().parent / "inputs" / "example.png"
INPAINT_OUT = OUT.with_name("inpaint.png")  # the same scene with a transparent hole (LoadImage's MASK): the tree
HEIGHT, WIDTH = 512, 768


def scene() -> np.ndarray:
    """The picture, HxWx3 uint8 RGB."""
    img = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    horizon = 330
    sky = np.linspace(0.0, 1.0, horizon)[:, None]
    img[:horizon] = (np.array([90, 150, 230]) * (1 - sky) + np.array([200, 225, 245]) * sky)[:, None, :]
    ground = np.linspace(0.0, 1.0, HEIGHT - horizon)[:, None]
    img[horizon:] = (np.array([150, 190, 110]) * (1 - ground) + np.array([70, 120, 50]) * ground)[:, None, :]
    cv2.circle(img, (660, 80), 45, (250, 215, 80), -1)
    # house: walls, roof, door, windows
    cv2.rectangle(img, (90, 200), (330, 370), (205, 120, 90), -1)
    cv2.fillPoly(img, [np.array([[70, 205], [210, 110], [350, 205]], np.int32)], (120, 60, 50))
    cv2.rectangle(img, (185, 280), (235, 370), (90, 60, 40), -1)
    for x in (115, 265):
        cv2.rectangle(img, (x, 230), (x + 45, 270), (235, 240, 250), -1)
        cv2.rectangle(img, (x, 230), (x + 45, 270), (60, 40, 30), 3)
    # tree
    cv2.rectangle(img, (600, 250), (625, 380), (100, 70, 40), -1)
    for (cx, cy), r in (((612, 215), 55), ((575, 245), 40), ((650, 245), 40)):
        cv2.circle(img, (cx, cy), r, (50, 130, 60), -1)
    # fence: thin lines across the ground
    for x in range(20, 560, 30):
        cv2.line(img, (x, 385), (x, 430), (245, 245, 235), 2)
    cv2.line(img, (10, 395), (560, 395), (245, 245, 235), 2)
    cv2.line(img, (10, 420), (560, 420), (245, 245, 235), 2)
    _figure(img, 460, 230)
    return img


def _figure(img: np.ndarray, x: int, top: int) -> None:
    """A standing person: head, neck, torso, two arms and two legs, dark limbs on the light background."""
    dark, skin = (40, 40, 60), (230, 190, 160)
    neck, hip = (x, top + 45), (x, top + 130)
    cv2.line(img, neck, hip, (60, 80, 170), 22)  # torso
    for side in (-1, 1):
        elbow, hand = (x + side * 35, top + 90), (x + side * 50, top + 135)
        cv2.line(img, (x + side * 12, top + 50), elbow, dark, 9)
        cv2.line(img, elbow, hand, dark, 8)
        cv2.circle(img, hand, 7, skin, -1)
        knee, foot = (x + side * 18, top + 185), (x + side * 24, top + 240)
        cv2.line(img, (x + side * 8, top + 130), knee, dark, 11)
        cv2.line(img, knee, foot, dark, 10)
    cv2.circle(img, (x, top + 20), 22, skin, -1)
    for side in (-1, 1):
        cv2.circle(img, (x + side * 8, top + 15), 3, dark, -1)


def with_hole(image: np.ndarray) -> np.ndarray:
    """RGBA: the picture, transparent over the tree (what annotator_inpaint_hint.json inpaints)."""
    alpha = np.full(image.shape[:2], 255, np.uint8)
    cv2.ellipse(alpha, (612, 270), (95, 125), 0, 0, 360, 0, -1)
    return np.dstack([image, alpha])


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    image = scene()
    cv2.imwrite(str(OUT), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    cv2.imwrite(str(INPAINT_OUT), cv2.cvtColor(with_hole(image), cv2.COLOR_RGBA2BGRA), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    for path in (OUT, INPAINT_OUT):
        print(f"wrote {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
