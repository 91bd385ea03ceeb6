"""OpenPose skeletons drawn from keypoint JSON, as the openpose ControlNets expect (controlnet-formats.md §5.3)."""
from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass, field

import numpy as np
import cv2

# 18 COCO keypoints: 0 nose, 1 neck, 2-4 right arm, 5-7 left arm, 8-10 right leg, 11-13 left leg, 14-17 eyes/ears.
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17),
)
COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
# Hand: wrist 0, then thumb 1-4, index 5-8, middle 9-12, ring 13-16, little 17-20.
HAND_BONES: tuple[tuple[int, int], ...] = tuple(
    pair for finger in range(5) for pair in zip([0, *range(4 * finger + 1, 4 * finger + 4)],
                                                 range(4 * finger + 1, 4 * finger + 5)))
LIMB_WIDTH, POINT_RADIUS, LIMB_DIM = 4, 4, 0.6

Point = tuple[float, float] | None


@dataclass
class Person:
    body: list[Point]  # 18 points in pixels, None where missing
    left_hand: list[Point] = field(default_factory=list)
    right_hand: list[Point] = field(default_factory=list)
    face: list[Point] = field(default_factory=list)


def _points(flat: list[float] | None, width: int, height: int, count: int) -> list[Point]:
    if not flat:
        return []
    triples = [flat[i:i + 3] for i in range(0, len(flat), 3)]
    normalised = all(0 <= x <= 1 and 0 <= y <= 1 for x, y, *_ in triples)
    points: list[Point] = []
    for x, y, *conf in triples[:count]:
        if (conf and conf[0] <= 0) or (x <= 0 and y <= 0):
            points.append(None)
        else:
            points.append((x * width, y * height) if normalised else (x, y))
    return points


def parse_openpose_json(text: str) -> tuple[list[Person], int, int]:
    """People from OpenPose JSON ({"people": [...], "canvas_width", "canvas_height"}), pixel or 0..1 coordinates."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"pose JSON is not valid JSON ({exc})") from None
    frames = data if isinstance(data, list) else [data]
    width, height = int(frames[0].get("canvas_width", 512)), int(frames[0].get("canvas_height", 512))
    people = [Person(body=_points(p.get("pose_keypoints_2d"), width, height, 18) or [None] * 18,
                     left_hand=_points(p.get("hand_left_keypoints_2d"), width, height, 21),
                     right_hand=_points(p.get("hand_right_keypoints_2d"), width, height, 21),
                     face=_points(p.get("face_keypoints_2d"), width, height, 70))
              for p in frames[0].get("people", [])]
    return people, height, width


def to_openpose_json(people: list[Person], height: int, width: int) -> str:
    def flat(points: list[Point]) -> list[float]:
        return [v for p in points for v in ((p[0], p[1], 1.0) if p else (0.0, 0.0, 0.0))]

    return json.dumps({"people": [{"pose_keypoints_2d": flat(p.body), "hand_left_keypoints_2d": flat(p.left_hand),
                                   "hand_right_keypoints_2d": flat(p.right_hand), "face_keypoints_2d": flat(p.face)}
                                  for p in people], "canvas_width": width, "canvas_height": height})


def _limb(canvas: np.ndarray, a: tuple[float, float], b: tuple[float, float], color: tuple[int, int, int]) -> None:
    """Filled ellipse along the segment, semi-axes (length / 2, 4 px)."""
    (x1, y1), (x2, y2) = a, b
    length = math.hypot(x2 - x1, y2 - y1)
    angle = int(math.degrees(math.atan2(y2 - y1, x2 - x1)))
    polygon = cv2.ellipse2Poly((int((x1 + x2) / 2), int((y1 + y2) / 2)), (int(length / 2), LIMB_WIDTH), angle, 0, 360, 1)
    cv2.fillConvexPoly(canvas, polygon, color)


def draw_pose(people: list[Person], height: int, width: int, hands: bool = True, face: bool = True) -> np.ndarray:
    """Black canvas; limbs in their colours, dimmed x0.6; keypoints on top; hands and face as in v1.1."""
    canvas = np.zeros((height, width, 3), np.uint8)
    for person in people:
        for k, (i, j) in enumerate(LIMBS):
            if len(person.body) > max(i, j) and person.body[i] and person.body[j]:
                _limb(canvas, person.body[i], person.body[j], COLORS[k])
    canvas = (canvas.astype(np.float32) * LIMB_DIM).astype(np.uint8)
    for person in people:
        for k, point in enumerate(person.body[:18]):
            if point:
                cv2.circle(canvas, (int(point[0]), int(point[1])), POINT_RADIUS, COLORS[k], -1)
        for hand in (person.left_hand, person.right_hand) if hands else ():
            for e, (i, j) in enumerate(HAND_BONES):
                if len(hand) > max(i, j) and hand[i] and hand[j]:
                    rgb = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(e / len(HAND_BONES), 1.0, 1.0))
                    cv2.line(canvas, tuple(int(v) for v in hand[i]), tuple(int(v) for v in hand[j]), rgb, 2)
            for point in hand:
                if point:
                    cv2.circle(canvas, (int(point[0]), int(point[1])), POINT_RADIUS, (0, 0, 255), -1)
        for point in person.face if face else ():
            if point:
                cv2.circle(canvas, (int(point[0]), int(point[1])), 3, (255, 255, 255), -1)
    return canvas
