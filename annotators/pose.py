"""OpenPose skeletons: keypoint JSON in and out, and the drawing the openpose ControlNets expect (§5.3, v1.1/aux).

People hold coordinates normalised to 0..1 (as ControlNet v1.1 does), so a pose is independent of canvas size;
the JSON side speaks OpenPose's format (pixel coordinates plus canvas size, or 0..1 coordinates).
"""
from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import numpy as np

BODY_KEYPOINTS = 18  # COCO order: 0 nose, 1 neck, 2-4 right arm, 5-7 left arm, 8-10 right leg, 11-13 left leg,
# 14 right eye, 15 left eye, 16 right ear, 17 left ear
HAND_KEYPOINTS = 21
FACE_KEYPOINTS = 70
# Limb k joins these two keypoints and is drawn in COLORS[k], in this order (§5.3; the two shoulder-ear
# pairs of the source list are never drawn).
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
# RGB colour k, for limb k and keypoint k.
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
# Hand: wrist 0, then thumb 1-4, index 5-8, middle 9-12, ring 13-16, little 17-20; bones run wrist -> fingertip.
HAND_BONES: tuple[tuple[int, int], ...] = tuple(
    (0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4))
# Bone e is HSV(e / 20, 1, 1).
HAND_BONE_COLORS: tuple[tuple[int, int, int], ...] = tuple(
    tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(e / len(HAND_BONES), 1.0, 1.0))
    for e in range(len(HAND_BONES)))
HAND_POINT_COLOR = (0, 0, 255)
FACE_POINT_COLOR = (255, 255, 255)
LIMB_HALF_WIDTH = 4  # ellipse minor semi-axis, px
LIMB_DIM = 0.6  # the whole limb canvas is dimmed before keypoints are drawn (v1.1)
BODY_POINT_RADIUS, HAND_POINT_RADIUS, FACE_POINT_RADIUS = 4, 4, 3
HAND_BONE_THICKNESS = 2


class Keypoint(NamedTuple):
    """A keypoint, x and y in 0..1 of the canvas width and height."""

    x: float
    y: float
    score: float = 1.0


Points = list["Keypoint | None"]


@dataclass
class Person:
    """One person's OpenPose keypoints (None where missing): 18 body, 21 per hand, 70 face."""

    body: Points = field(default_factory=lambda: [None] * BODY_KEYPOINTS)
    left_hand: Points = field(default_factory=list)
    right_hand: Points = field(default_factory=list)
    face: Points = field(default_factory=list)


@dataclass
class PoseFrame:
    """People plus the canvas they were posed on."""

    people: list[Person]
    height: int
    width: int


def _triples(flat: list[float] | None, count: int, name: str) -> list[tuple[float, float, float]]:
    if not flat:
        return []
    if len(flat) % 3:
        raise ValueError(f"{name} must hold x, y, confidence triples; got {len(flat)} numbers")
    return [(float(flat[i]), float(flat[i + 1]), float(flat[i + 2])) for i in range(0, min(len(flat), 3 * count), 3)]


def _present(x: float, y: float, score: float) -> bool:
    """OpenPose writes missing points as 0, 0, 0; v1.1 uses -1."""
    return score > 0 and x >= 0 and y >= 0 and not (x == 0 and y == 0)


def read_openpose(text: str | dict | list) -> PoseFrame:
    """People and canvas from OpenPose JSON ({"people": [...], "canvas_width", "canvas_height"}; a list: its first)."""
    try:
        data = json.loads(text) if isinstance(text, str) else text
    except json.JSONDecodeError as exc:
        raise ValueError(f"pose JSON is not valid JSON ({exc}); paste OpenPose keypoint JSON") from None
    frame = (data[0] if data else {"people": []}) if isinstance(data, list) else data
    if not isinstance(frame, dict) or not isinstance(frame.get("people", []), list):
        raise ValueError('pose JSON must be an object like {"people": [{"pose_keypoints_2d": [...]}], '
                         '"canvas_width": 512, "canvas_height": 512}')
    width, height = int(frame.get("canvas_width", 512)), int(frame.get("canvas_height", 512))
    keys = (("pose_keypoints_2d", BODY_KEYPOINTS), ("hand_left_keypoints_2d", HAND_KEYPOINTS),
            ("hand_right_keypoints_2d", HAND_KEYPOINTS), ("face_keypoints_2d", FACE_KEYPOINTS))
    raw = [[_triples(p.get(k), n, k) for k, n in keys] for p in frame.get("people", [])]
    found = [t for parts in raw for part in parts for t in part if _present(*t)]
    normalised = bool(found) and all(x <= 1 and y <= 1 for x, y, _ in found)
    sx, sy = (1.0, 1.0) if normalised else (1.0 / width, 1.0 / height)

    def points(triples: list[tuple[float, float, float]]) -> Points:
        return [Keypoint(x * sx, y * sy, c) if _present(x, y, c) else None for x, y, c in triples]

    people = [Person(body=(points(b) + [None] * BODY_KEYPOINTS)[:BODY_KEYPOINTS], left_hand=points(lh),
                     right_hand=points(rh), face=points(f)) for b, lh, rh, f in raw]
    return PoseFrame(people, height, width)


def parse_openpose_json(text: str | dict | list) -> list[Person]:
    """People from OpenPose keypoint JSON, pixel or 0..1 coordinates (OpenPose output format)."""
    return read_openpose(text).people


def to_openpose_dict(people: list[Person], height: int, width: int) -> dict[str, Any]:
    """OpenPose JSON object (pixel coordinates, missing points 0, 0, 0), as aux's POSE_KEYPOINT entries."""
    def flat(points: Points) -> list[float]:
        return [v for p in points for v in ((p.x * width, p.y * height, p.score) if p else (0.0, 0.0, 0.0))]

    return {"people": [{"pose_keypoints_2d": flat(p.body), "hand_left_keypoints_2d": flat(p.left_hand) or None,
                        "hand_right_keypoints_2d": flat(p.right_hand) or None,
                        "face_keypoints_2d": flat(p.face) or None} for p in people],
            "canvas_width": width, "canvas_height": height}


def map_people(people: list[Person], fn: Callable[[float, float], tuple[float, float]]) -> list[Person]:
    """New people with every keypoint's (x, y) passed through fn (e.g. from the padded detect canvas to the image)."""
    def move(points: Points) -> Points:
        return [Keypoint(*fn(p.x, p.y), p.score) if p else None for p in points]

    return [Person(move(p.body), move(p.left_hand), move(p.right_hand), move(p.face)) for p in people]


def _pixel(point: Keypoint, height: int, width: int) -> tuple[int, int]:
    return int(point.x * width), int(point.y * height)


def _draw_limb(canvas: np.ndarray, a: tuple[float, float], b: tuple[float, float], color: tuple[int, int, int]) -> None:
    """Filled ellipse centred on the segment, semi-axes (length / 2, 4 px), polygon at 1 degree steps."""
    import cv2

    (x1, y1), (x2, y2) = a, b
    length = math.hypot(x2 - x1, y2 - y1)
    # the reference's sign convention (openpose util.draw_bodypose): the angle of a - b, truncated by int()
    angle = math.degrees(math.atan2(y1 - y2, x1 - x2))
    centre = (int((x1 + x2) / 2), int((y1 + y2) / 2))
    polygon = cv2.ellipse2Poly(centre, (int(length / 2), LIMB_HALF_WIDTH), int(angle), 0, 360, 1)
    cv2.fillConvexPoly(canvas, polygon, color)


def _draw_body(canvas: np.ndarray, people: list[Person]) -> np.ndarray:
    import cv2

    height, width = canvas.shape[:2]
    for k, (i, j) in enumerate(LIMBS):
        for person in people:
            a, b = person.body[i], person.body[j]
            if a and b:
                _draw_limb(canvas, (a.x * width, a.y * height), (b.x * width, b.y * height), COLORS[k])
    canvas = (canvas.astype(np.float32) * LIMB_DIM).astype(np.uint8)
    for k in range(BODY_KEYPOINTS):
        for person in people:
            if person.body[k]:
                cv2.circle(canvas, _pixel(person.body[k], height, width), BODY_POINT_RADIUS, COLORS[k], -1)
    return canvas


def _draw_hand(canvas: np.ndarray, hand: Points) -> None:
    import cv2

    height, width = canvas.shape[:2]
    for e, (i, j) in enumerate(HAND_BONES):
        if len(hand) > j and hand[i] and hand[j]:
            cv2.line(canvas, _pixel(hand[i], height, width), _pixel(hand[j], height, width), HAND_BONE_COLORS[e],
                     HAND_BONE_THICKNESS)
    for point in hand:
        if point:
            cv2.circle(canvas, _pixel(point, height, width), HAND_POINT_RADIUS, HAND_POINT_COLOR, -1)


def draw_pose(people: list[Person], height: int, width: int, *, body: bool = True, hands: bool = True,
              face: bool = True) -> np.ndarray:
    """HWC uint8 RGB: black canvas, limbs dimmed x0.6, body keypoints, hand bones and points, face dots (§5.3)."""
    import cv2

    canvas = np.zeros((height, width, 3), np.uint8)
    if body:
        canvas = _draw_body(canvas, people)
    for person in people:
        for hand in (person.left_hand, person.right_hand) if hands else ():
            _draw_hand(canvas, hand)
        for point in person.face if face else ():
            if point:
                cv2.circle(canvas, _pixel(point, height, width), FACE_POINT_RADIUS, FACE_POINT_COLOR, -1)
    return canvas
