"""OpenPose body, hand and face keypoints (Cao et al. 2017; Simon et al. 2017) as ControlNet v1.1 runs them.

Body: BGR /256 - 0.5 at 0.5 x 368 / height, padded right/bottom to stride 8 with 128; maps brought back to the
image and parsed by openpose_parse. Hands: square boxes from wrist, elbow and shoulder (OpenPose handDetector), four
scales of 368, peaks of the largest blob per heatmap. Face: a square box from nose, eyes and ears, 384 x 384 input,
the strongest pixel per landmark heatmap. Output: the §5.3 drawing and `pose.Person`s in 0..1 coordinates.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..common import AnnotatorSpec, ParamSpec
from ..pose import BODY_KEYPOINTS, FACE_KEYPOINTS, HAND_KEYPOINTS, Keypoint, Person, draw_pose
from .base import build, device_of
from .openpose_nets import BodyPoseNet, KeypointNet, OpenPoseNets, face_net, hand_net
from .openpose_parse import blur, people_from_maps

BODY_WEIGHTS, HAND_WEIGHTS, FACE_WEIGHTS = "body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"
BOX_SIZE, STRIDE, PAD_VALUE = 368, 8, 128
BODY_SCALES = (0.5,)  # v1.1 (the CMU demo averages 0.5, 1, 1.5, 2)
HAND_SCALES = (0.5, 1.0, 1.5, 2.0)
HAND_BLUR_SIGMA, HAND_MAP_SIZE, HAND_THRESHOLD = 0.8, 128, 0.05
HAND_BOX_RATIO, HAND_BOX_SCALE, HAND_SHOULDER_SHARE = 0.33, 1.5, 0.9  # OpenPose handDetector.cpp
FACE_SIZE, FACE_THRESHOLD = 384, 0.05
FACE_EYE_SCALE, FACE_EAR_SCALE = 3.0, 1.5  # box half-size: distance nose-eye x 3, nose-ear x 1.5
MIN_BOX = 20  # px; smaller hand or face boxes are skipped
# (shoulder, elbow, wrist, is_left) in COCO order
ARMS: tuple[tuple[int, int, int, bool], ...] = ((5, 6, 7, True), (2, 3, 4, False))
NOSE, EYES, EARS = 0, (14, 15), (16, 17)


def network_input(bgr: np.ndarray, device: torch.device) -> torch.Tensor:
    """(N, H, W, 3) uint8 BGR -> (N, 3, H, W) float /256 - 0.5."""
    return torch.from_numpy(np.ascontiguousarray(bgr)).to(device).permute(0, 3, 1, 2).float() / 256.0 - 0.5


def resize_images(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W, 3) uint8 resized: area when shrinking, Lanczos when growing (openpose util.smart_resize)."""
    import cv2

    if images.shape[1:3] == (height, width):
        return images
    grow = height + width > images.shape[1] + images.shape[2]
    method = cv2.INTER_LANCZOS4 if grow else cv2.INTER_AREA
    return np.stack([cv2.resize(im, (width, height), interpolation=method) for im in images])


def pad_to_stride(images: np.ndarray) -> np.ndarray:
    """Pad right and bottom to a multiple of the stride with grey 128 (util.padRightDownCorner)."""
    _, h, w, _ = images.shape
    return np.pad(images, ((0, 0), (0, -h % STRIDE), (0, -w % STRIDE), (0, 0)), constant_values=PAD_VALUE)


def smart_resize(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) float maps resized channel by channel: area when the sides' sum shrinks, else Lanczos (openpose
    util.smart_resize of ControlNet v1.1, which the heatmaps and PAFs go through)."""
    import cv2

    if maps.shape[:2] == (height, width):
        return maps
    shrink = height + width < maps.shape[0] + maps.shape[1]
    method = cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4
    return np.stack([cv2.resize(np.ascontiguousarray(maps[..., c]), (width, height), interpolation=method)
                     for c in range(maps.shape[2])], axis=2)


def stride_maps(net: torch.nn.Module, bgr: np.ndarray, scale_hw: tuple[int, int],
                out_hw: tuple[int, int]) -> list[np.ndarray]:
    """Run a pose machine at `scale_hw`; its stride-8 outputs grown by 8, the padding cropped, and resized to
    `out_hw` with smart_resize: (N, *out_hw, C) float32 each."""
    scaled = resize_images(bgr, *scale_hw)
    padded = pad_to_stride(scaled)
    outputs = net(network_input(padded, device_of(net)))
    maps = []
    for out in outputs if isinstance(outputs, tuple) else (outputs,):
        per_image = []
        for m in out.float().permute(0, 2, 3, 1).cpu().numpy():
            up = smart_resize(m, m.shape[0] * STRIDE, m.shape[1] * STRIDE)[:scale_hw[0], :scale_hw[1]]
            per_image.append(smart_resize(up, *out_hw))
        maps.append(np.stack(per_image))
    return maps


@torch.no_grad()
def body_maps(net: BodyPoseNet, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W, 3) BGR -> heatmaps (N, H, W, 19) and PAFs (N, H, W, 38), averaged over BODY_SCALES."""
    height, width = bgr.shape[1:3]
    heat_sum = paf_sum = 0
    for scale in BODY_SCALES:
        factor = scale * BOX_SIZE / height
        scaled = (max(1, round(height * factor)), max(1, round(width * factor)))
        paf, heat = stride_maps(net, bgr, scaled, (height, width))
        heat_sum, paf_sum = heat_sum + heat / len(BODY_SCALES), paf_sum + paf / len(BODY_SCALES)
    return heat_sum, paf_sum


def body_keypoints(candidates: np.ndarray, row: np.ndarray, height: int, width: int) -> list[Keypoint | None]:
    """One assembled person (a row of candidate ids) as 18 keypoints in 0..1 coordinates."""
    points: list[Keypoint | None] = []
    for part in range(BODY_KEYPOINTS):
        index = int(row[part])
        x, y, score = candidates[index] if index >= 0 else (0.0, 0.0, 0.0)
        points.append(Keypoint(x / width, y / height, float(score)) if index >= 0 else None)
    return points


def hand_boxes(body: list[Keypoint | None], height: int, width: int) -> list[tuple[int, int, int, bool]]:
    """Square hand boxes (x, y, size, is_left) in pixels from each arm with shoulder, elbow and wrist."""
    boxes = []
    for shoulder, elbow, wrist, is_left in ARMS:
        if not (body[shoulder] and body[elbow] and body[wrist]):
            continue
        (x1, y1), (x2, y2), (x3, y3) = ((body[i].x * width, body[i].y * height) for i in (shoulder, elbow, wrist))
        size = HAND_BOX_SCALE * max(math.hypot(x3 - x2, y3 - y2), HAND_SHOULDER_SHARE * math.hypot(x2 - x1, y2 - y1))
        x = max(0.0, x3 + HAND_BOX_RATIO * (x3 - x2) - size / 2)
        y = max(0.0, y3 + HAND_BOX_RATIO * (y3 - y2) - size / 2)
        size = min(size, width - x, height - y)
        if size >= MIN_BOX:
            boxes.append((int(x), int(y), int(size), is_left))
    return boxes


def face_box(body: list[Keypoint | None], height: int, width: int) -> tuple[int, int, int] | None:
    """Square face box (x, y, size) in pixels around the nose, sized by the eyes and ears found."""
    nose = body[NOSE]
    if nose is None:
        return None
    half = 0.0
    for parts, factor in ((EYES, FACE_EYE_SCALE), (EARS, FACE_EAR_SCALE)):
        for p in (body[i] for i in parts):
            if p is not None:
                half = max(half, factor * max(abs(p.x - nose.x) * width, abs(p.y - nose.y) * height))
    if half == 0.0:
        return None
    x, y = max(0.0, nose.x * width - half), max(0.0, nose.y * height - half)
    size = min(2 * half, width - x, height - y)
    return (int(x), int(y), int(size)) if size >= MIN_BOX else None


@torch.no_grad()
def hand_peaks(net: KeypointNet, crop_bgr: np.ndarray,
               scales: tuple[float, ...] | None = None) -> list[tuple[int, int] | None]:
    """21 hand keypoints (x, y) in crop pixels, None where no heatmap blob passes the threshold."""
    import cv2

    scales = HAND_SCALES if scales is None else scales
    blurred = cv2.GaussianBlur(crop_bgr, (0, 0), HAND_BLUR_SIGMA)[None]
    side = (HAND_MAP_SIZE, HAND_MAP_SIZE)
    heat = sum(stride_maps(net, blurred, (round(s * BOX_SIZE),) * 2, side)[0] for s in scales) / len(scales)
    heat = heat[0].transpose(2, 0, 1)
    height, width = crop_bgr.shape[:2]
    points: list[tuple[int, int] | None] = []
    for part in range(HAND_KEYPOINTS):
        raw = heat[part]
        mask = (blur(raw, 3.0) > HAND_THRESHOLD).astype(np.uint8)
        count, labels = cv2.connectedComponents(mask, connectivity=8)
        if count <= 1:
            points.append(None)
            continue
        sums = np.bincount(labels.ravel(), weights=raw.ravel(), minlength=count)[1:]
        blob = np.where(labels == 1 + int(np.argmax(sums)), raw, 0.0)
        y, x = np.unravel_index(int(np.argmax(blob)), blob.shape)
        points.append((int(x * width / HAND_MAP_SIZE), int(y * height / HAND_MAP_SIZE)))
    return points


@torch.no_grad()
def face_peaks(net: KeypointNet, crops_bgr: list[np.ndarray]) -> list[list[tuple[int, int] | None]]:
    """70 landmarks (x, y) per face crop, in crop pixels; the background heatmap is not a landmark."""
    if not crops_bgr:
        return []
    batch = np.stack([resize_images(c[None], FACE_SIZE, FACE_SIZE)[0] for c in crops_bgr])
    heat = net(network_input(batch, device_of(net)))
    faces = []
    for crop, maps in zip(crops_bgr, heat):
        maps = F.interpolate(maps[None, :FACE_KEYPOINTS], size=crop.shape[:2], mode="bilinear", align_corners=True)[0]
        best, where = maps.flatten(1).max(dim=1)
        faces.append([(int(i) % crop.shape[1], int(i) // crop.shape[1]) if v > FACE_THRESHOLD else None
                      for v, i in zip(best.tolist(), where.tolist())])
    return faces


def _to_image(points: list[tuple[int, int] | None], box: tuple[int, int, int], height: int,
              width: int) -> list[Keypoint | None]:
    x0, y0 = box[:2]
    return [Keypoint((p[0] + x0) / width, (p[1] + y0) / height) if p else None for p in points]


def detect_people(nets: OpenPoseNets, images: np.ndarray, hands: bool = False, face: bool = False) -> list[list[Person]]:
    """(N, H, W, 3) uint8 RGB -> people per image, 0..1 coordinates; hands and faces need those nets loaded."""
    if (hands and nets.hand is None) or (face and nets.face is None):
        raise ValueError("hands and faces need the hand and face nets: load them with load_openpose_full")
    bgr = np.ascontiguousarray(images[..., ::-1])
    height, width = images.shape[1:3]
    heatmaps, pafs = body_maps(nets.body, bgr)
    found = []
    for image, heat, paf in zip(bgr, heatmaps, pafs):
        candidates, rows = people_from_maps(heat, paf)
        people = [Person(body=body_keypoints(candidates, row, height, width)) for row in rows]
        for person in people if hands else ():
            for x, y, size, is_left in hand_boxes(person.body, height, width):
                points = _to_image(hand_peaks(nets.hand, image[y:y + size, x:x + size]), (x, y, size), height, width)
                if is_left:
                    person.left_hand = points
                else:
                    person.right_hand = points
        boxes = [(p, face_box(p.body, height, width)) for p in people] if face else []
        boxes = [(p, b) for p, b in boxes if b is not None]
        crops = [image[y:y + s, x:x + s] for _, (x, y, s) in boxes]
        for (person, box), points in zip(boxes, face_peaks(nets.face, crops) if face else []):
            person.face = _to_image(points, box, height, width)
        found.append(people)
    return found


def openpose_batch(images: np.ndarray, *, device: str | torch.device, model: OpenPoseNets, hands: bool = False,
                   face: bool = False) -> list[tuple[np.ndarray, list[Person]]]:
    """(N, H, W, 3) uint8 RGB -> per image (the §5.3 pose drawing, the people found)."""
    height, width = images.shape[1:3]
    return [(draw_pose(people, height, width, hands=hands, face=face), people)
            for people in detect_people(model, images, hands=hands, face=face)]


def openpose_full_batch(images: np.ndarray, *, device: str | torch.device, model: OpenPoseNets, hands: bool = True,
                        face: bool = True) -> list[tuple[np.ndarray, list[Person]]]:
    """openpose_batch with hands and face on by default (v1.1 'Openpose Full')."""
    return openpose_batch(images, device=device, model=model, hands=hands, face=face)


def openpose(image: np.ndarray, *, model: OpenPoseNets, hands: bool = False,
             face: bool = False) -> tuple[np.ndarray, list[Person]]:
    """One HWC uint8 RGB image -> (pose drawing, people)."""
    return openpose_batch(image[None], device=device_of(model), model=model, hands=hands, face=face)[0]


def openpose_full(image: np.ndarray, *, model: OpenPoseNets, hands: bool = True,
                  face: bool = True) -> tuple[np.ndarray, list[Person]]:
    """One HWC uint8 RGB image -> (pose drawing with hands and face, people)."""
    return openpose(image, model=model, hands=hands, face=face)


def load_openpose(device: str | torch.device = "cpu") -> OpenPoseNets:
    """The body net with body_pose_model.pth."""
    return OpenPoseNets(build(BodyPoseNet, BODY_WEIGHTS, device))


def load_openpose_full(device: str | torch.device = "cpu") -> OpenPoseNets:
    """Body, hand and face nets with their three weight files."""
    return OpenPoseNets(build(BodyPoseNet, BODY_WEIGHTS, device), build(hand_net, HAND_WEIGHTS, device),
                        build(face_net, FACE_WEIGHTS, device))


SPECS: tuple[AnnotatorSpec, ...] = (
    AnnotatorSpec("openpose", "ZeroConvOpenPose", "OpenPose Body (ZeroConv)", openpose, weights=(BODY_WEIGHTS,),
                  control_types=("openpose",), category="learned", loader=load_openpose, batch_fn=openpose_batch,
                  resample="nearest", keypoints=True,
                  description="CMU OpenPose body (18 keypoints), drawn the ControlNet v1.1 way; also keypoint JSON"),
    AnnotatorSpec("openpose_full", "ZeroConvOpenPoseFull", "OpenPose Body, Hands, Face (ZeroConv)", openpose_full,
                  (ParamSpec("hands", "bool", True, tooltip="find and draw 21 keypoints per hand"),
                   ParamSpec("face", "bool", True, tooltip="find and draw 70 face landmarks")),
                  weights=(BODY_WEIGHTS, HAND_WEIGHTS, FACE_WEIGHTS), control_types=("openpose",),
                  category="learned", loader=load_openpose_full, batch_fn=openpose_full_batch, resample="nearest",
                  keypoints=True, description="OpenPose body plus hands and face (v1.1 'Openpose Full')"),
)
