"""OpenPose body, hand and face: the weight files' key layout, the nets at native size, and the parsing measured on
synthetic maps of known skeletons (no real weights, no network)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from zeroconv.annotators.learned import openpose as op
from zeroconv.annotators.learned.base import load_file
from zeroconv.annotators.learned.openpose_nets import BodyPoseNet, OpenPoseNets, face_net, hand_net
from zeroconv.annotators.learned.openpose_parse import LIMBS, PAF_CHANNELS, people_from_maps
from zeroconv.annotators.pose import COLORS, HAND_POINT_COLOR, Keypoint
from zeroconv.annotators.registry import annotate_with_keypoints

from .test_annotators_learned_helpers import assert_same_tensors, file_layout, manifest_size, parameter_bytes, write_pth

# Keys and shapes named in the reference model definitions (lllyasviel/ControlNet-v1-1-nightly annotator/openpose).
NETS = {
    "body_pose_model.pth": (BodyPoseNet, 184, {
        "conv1_1.weight": (64, 3, 3, 3), "conv4_4_CPM.weight": (128, 256, 3, 3), "conv5_4_CPM_L1.weight": (512, 128, 1, 1),
        "conv5_5_CPM_L1.weight": (38, 512, 1, 1), "conv5_5_CPM_L2.bias": (19,), "Mconv1_stage2_L1.weight": (128, 185, 7, 7),
        "Mconv6_stage4_L2.weight": (128, 128, 1, 1), "Mconv7_stage6_L1.weight": (38, 128, 1, 1),
        "Mconv7_stage6_L2.weight": (19, 128, 1, 1)}),
    "hand_pose_model.pth": (hand_net, 104, {
        "conv5_3_CPM.weight": (128, 512, 3, 3), "conv6_1_CPM.weight": (512, 128, 1, 1),
        "conv6_2_CPM.weight": (22, 512, 1, 1), "Mconv1_stage2.weight": (128, 150, 7, 7),
        "Mconv7_stage6.weight": (22, 128, 1, 1)}),
    "facenet.pth": (face_net, 104, {
        "conv4_4.weight": (512, 512, 3, 3), "conv6_2_CPM.weight": (71, 512, 1, 1),
        "Mconv1_stage2.weight": (128, 199, 7, 7), "Mconv7_stage6.bias": (71,)}),
}


@pytest.mark.parametrize("filename", list(NETS))
def test_key_layout_and_size_match_the_real_file(filename: str, tmp_path) -> None:
    factory, count, samples = NETS[filename]
    layout = file_layout(factory)
    assert len(layout) == count
    for key, shape in samples.items():
        assert tuple(layout[key].shape) == shape, key
    # fp32 tensors plus ~100-150 bytes of pickle per tensor make up the file's size in the manifest
    overhead = manifest_size(filename) - parameter_bytes(factory)
    assert 0 < overhead < 200 * count
    net = load_file(factory, write_pth(tmp_path / filename, layout))
    assert_same_tensors(net, layout)
    assert next(net.parameters()).dtype == torch.float32 and not net.training


def test_a_file_of_another_layout_is_refused_by_name(tmp_path) -> None:
    layout = file_layout(hand_net)
    del layout["Mconv3_stage4.weight"]
    layout["model1_0.conv1_1.weight"] = layout.pop("conv1_1.weight")  # the in-memory names, not the file's
    with pytest.raises(KeyError, match="Mconv3_stage4.weight.*model1_0.conv1_1.weight"):
        load_file(hand_net, write_pth(tmp_path / "hand.pth", layout))


def test_body_net_at_its_native_box() -> None:
    torch.manual_seed(0)
    net = BodyPoseNet().eval()
    with torch.no_grad():
        paf, heat = net(torch.rand(1, 3, 184, 184) - 0.5)  # 0.5 x 368, the v1.1 body scale
    assert paf.shape == (1, 38, 23, 23) and heat.shape == (1, 19, 23, 23)
    assert heat.min() >= 0, "the released net ends its heatmap branch with a ReLU"
    assert paf.min() < 0, "PAFs are signed vectors"


# --- parsing, on synthetic maps -------------------------------------------------------------------------------------

def skeleton(x0: float, y0: float, scale: float = 1.0) -> dict[int, tuple[float, float]]:
    """Whole-pixel positions of the 18 COCO keypoints of a standing person with the neck at (x0, y0)."""
    offsets = {0: (0, -25), 1: (0, 0), 2: (-20, 0), 3: (-25, 35), 4: (-28, 70), 5: (20, 0), 6: (25, 35), 7: (28, 70),
               8: (-12, 80), 9: (-13, 130), 10: (-14, 180), 11: (12, 80), 12: (13, 130), 13: (14, 180),
               14: (-6, -30), 15: (6, -30), 16: (-12, -26), 17: (12, -26)}
    return {k: (float(round(x0 + dx * scale)), float(round(y0 + dy * scale))) for k, (dx, dy) in offsets.items()}


def synthetic_maps(people: list[dict[int, tuple[float, float]]], height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (Gaussian, sigma 3 px) at the keypoints and unit PAFs within 3 px of each limb, as a trained net draws."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    heat, paf = np.zeros((height, width, 19), np.float32), np.zeros((height, width, 38), np.float32)
    for person in people:
        for k, (x, y) in person.items():
            heat[..., k] = np.maximum(heat[..., k], np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0**2)))
        for (a, b), (cx, cy) in zip(LIMBS, PAF_CHANNELS):
            (xa, ya), (xb, yb) = person[a], person[b]
            v = np.array([xb - xa, yb - ya]) / np.hypot(xb - xa, yb - ya)
            t = np.clip((xx - xa) * v[0] + (yy - ya) * v[1], 0, np.hypot(xb - xa, yb - ya))
            near = np.hypot(xx - (xa + t * v[0]), yy - (ya + t * v[1])) <= 3
            paf[near, cx], paf[near, cy] = v[0], v[1]
    return heat, paf


def test_two_people_are_found_and_kept_apart() -> None:
    truth = [skeleton(80, 60), skeleton(220, 70, scale=0.9)]
    candidates, rows = people_from_maps(*synthetic_maps(truth, 300, 320))
    assert len(rows) == 2
    for person in truth:
        row = min(rows, key=lambda r: abs(candidates[int(r[1]), 0] - person[1][0]))
        assert row[-1] == 18, "every part assigned"
        for k, (x, y) in person.items():
            assert np.hypot(*(candidates[int(row[k]), :2] - (x, y))) <= 1.0, k


def test_a_lone_pair_of_parts_is_not_a_person() -> None:
    person = {k: v for k, v in skeleton(100, 60).items() if k in (1, 2, 3)}  # neck, right shoulder, elbow
    heat, paf = synthetic_maps([skeleton(100, 60)], 300, 200)
    heat[..., [k for k in range(18) if k not in person]] = 0
    assert people_from_maps(heat, paf)[1].shape == (0, 20)


def test_hand_box_follows_the_forearm() -> None:
    body: list = [None] * 18
    body[5], body[6], body[7] = Keypoint(0.25, 0.25), Keypoint(0.25, 0.375), Keypoint(0.25, 0.5)  # left arm, 400 px
    (x, y, size, is_left), = op.hand_boxes(body, 400, 400)
    assert is_left and size == 75  # 1.5 x max(forearm 50, 0.9 x upper arm 50)
    assert (x, y) == (62, 179)  # centred a third of the forearm beyond the wrist
    body[7] = Keypoint(0.25, 0.378)  # a 1 px forearm still gives a box from the upper arm
    assert op.hand_boxes(body, 400, 400)[0][2] == 67


def test_face_box_is_sized_by_eyes_and_ears() -> None:
    body: list = [None] * 18
    body[0], body[14] = Keypoint(0.5, 0.5), Keypoint(0.5 - 10 / 256, 0.5 - 4 / 256)  # nose; right eye 10 px away
    assert op.face_box(body, 256, 256) == (98, 98, 60)  # half-size 3 x the eye distance
    body[16] = Keypoint(0.5 - 24 / 256, 0.5)  # an ear 24 px away: half-size 1.5 x 24
    assert op.face_box(body, 256, 256) == (92, 92, 72)
    body[14] = body[16] = None
    assert op.face_box(body, 256, 256) is None, "a nose alone gives no size"


class BlobNet(nn.Module):
    """Stands in for a keypoint machine: stride-8 heatmaps with a blob at a fixed share of the input per channel."""

    def __init__(self, channels: int, where: dict[int, list[tuple[float, float, float, float]]]) -> None:
        super().__init__()
        self.channels, self.where = channels, where  # channel -> [(u, v, peak, sigma in map px)]
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2] // 8, x.shape[3] // 8
        yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        out = torch.zeros(x.shape[0], self.channels, h, w)
        for c, blobs in self.where.items():
            for u, v, peak, sigma in blobs:
                out[:, c] += peak * torch.exp(-((xx - u * w) ** 2 + (yy - v * h) ** 2) / (2 * sigma**2))
        return out + self.anchor


def test_hand_peaks_take_the_heaviest_blob() -> None:
    where = {p: [(0.2 + 0.03 * p, 0.7 - 0.02 * p, 0.8, 1.5)] for p in range(21)}
    where[0] = [(0.2, 0.2, 0.9, 0.7), (0.75, 0.8, 0.5, 2.5)]  # a sharp peak and a heavier, wider blob
    del where[20]
    crop = np.zeros((120, 90, 3), np.uint8)
    points = op.hand_peaks(BlobNet(22, where), crop, scales=(0.5, 1.0))
    assert points[20] is None
    assert abs(points[0][0] - 0.75 * 90) <= 3 and abs(points[0][1] - 0.8 * 120) <= 3
    for p in range(1, 20):
        assert abs(points[p][0] - where[p][0][0] * 90) <= 3 and abs(points[p][1] - where[p][0][1] * 120) <= 3, p


def test_face_peaks_one_per_landmark_background_ignored() -> None:
    where = {p: [(0.1 + 0.01 * p, 0.3 + 0.005 * p, 1.0, 1.0)] for p in range(70) if p != 33}
    where[70] = [(0.5, 0.5, 5.0, 20.0)]  # background channel, strongest of all
    (points,) = op.face_peaks(BlobNet(71, where), [np.zeros((64, 80, 3), np.uint8)])
    assert len(points) == 70 and points[33] is None
    for p in (0, 10, 69):
        assert abs(points[p][0] - where[p][0][0] * 80) <= 2 and abs(points[p][1] - where[p][0][1] * 64) <= 2


def _fake_body_maps(truth: list[dict[int, tuple[float, float]]]):
    def body_maps(net, bgr):
        heat, paf = synthetic_maps(truth, *bgr.shape[1:3])
        return heat[None].repeat(len(bgr), 0), paf[None].repeat(len(bgr), 0)
    return body_maps


def test_openpose_through_the_registry_maps_people_to_the_picture(monkeypatch) -> None:
    # 200 x 300 at detect 200: no scaling, padded to 256 x 320; people must come back in the picture's 0..1 frame
    truth = [skeleton(150, 40, scale=0.8)]
    monkeypatch.setattr(op, "body_maps", _fake_body_maps(truth))
    nets = OpenPoseNets(nn.Conv2d(3, 3, 1))
    image = np.full((2, 200, 300, 3), 90, np.uint8)
    maps, people = annotate_with_keypoints("openpose", image, detect_resolution=200, model_cache=lambda s, d: nets)
    assert maps.shape == (2, 200, 300, 3) and maps.dtype == np.uint8 and len(people) == 2
    (person,) = people[1]
    for k, (x, y) in truth[0].items():
        assert abs(person.body[k].x * 300 - x) <= 1 and abs(person.body[k].y * 200 - y) <= 1, k
    nose, neck = truth[0][0], truth[0][1]
    assert tuple(maps[1, round(nose[1]), round(nose[0])]) == COLORS[0], "keypoints drawn at full colour"
    mid = maps[1, round((nose[1] + neck[1]) / 2), round(nose[0])]
    assert tuple(mid) == tuple(int(c * 0.6) for c in COLORS[12]), "limb (neck-nose) dimmed to 0.6"


def test_openpose_full_adds_hands_and_face(monkeypatch) -> None:
    truth = [skeleton(150, 60, scale=1.0)]
    monkeypatch.setattr(op, "body_maps", _fake_body_maps(truth))
    monkeypatch.setattr(op, "HAND_SCALES", (0.5,))
    hand = BlobNet(22, {p: [(0.3 + 0.02 * p, 0.6, 0.9, 1.5)] for p in range(21)})
    face = BlobNet(71, {p: [(0.2 + 0.008 * p, 0.5, 1.0, 1.0)] for p in range(70)})
    nets = OpenPoseNets(nn.Conv2d(3, 3, 1), hand, face)
    image = np.zeros((320, 320, 3), np.uint8)
    maps, people = annotate_with_keypoints("openpose_full", image, detect_resolution=None,
                                           model_cache=lambda s, d: nets)
    (person,) = people
    assert len(person.left_hand) == 21 and len(person.right_hand) == 21 and len(person.face) == 70
    assert all(p is not None for p in person.left_hand + person.right_hand + person.face)
    assert (maps == HAND_POINT_COLOR).all(axis=2).sum() > 50, "hand keypoints drawn in blue"
    assert person.left_hand[0].x > person.right_hand[0].x, "the left hand is the one on the picture's right"
    _, plain = annotate_with_keypoints("openpose_full", image, detect_resolution=None, model_cache=lambda s, d: nets,
                                       hands=False, face=False)
    assert plain[0].left_hand == [] and plain[0].face == []


@pytest.mark.slow
def test_full_openpose_nets_at_native_sizes_with_random_weights() -> None:
    torch.manual_seed(0)
    nets = OpenPoseNets(BodyPoseNet(), hand_net(), face_net()).eval()
    image = (np.random.default_rng(0).random((1, 512, 512, 3)) * 255).astype(np.uint8)
    (drawing, people), = op.openpose_full_batch(image, device="cpu", model=nets)
    assert drawing.shape == (512, 512, 3) and isinstance(people, list)
    assert len(op.hand_peaks(nets.hand, image[0, :200, :200])) == 21
    assert len(op.face_peaks(nets.face, [image[0, :150, :150]])[0]) == 70


# --- the layer structure, against the published definitions ---------------------------------------------------------
# Written out from annotator/openpose/model.py (bodypose_model, handpose_model) and face.py (FaceNet) of
# lllyasviel/ControlNet-v1-1-nightly: (name, in, out, kernel, followed by a ReLU). Random weights cannot show a
# missing ReLU (the outputs are merely different), so the plan the nets run is held against this table.
def _table(text: str) -> list[tuple[str, int, int, int, bool]]:
    rows = []
    for item in text.split(","):
        name, cin, cout, k, relu = item.split()
        rows.append((name, int(cin), int(cout), int(k), relu == "R"))
    return rows


VGG = ("conv1_1 3 64 3 R, conv1_2 64 64 3 R, pool 0 0 2 -, conv2_1 64 128 3 R, conv2_2 128 128 3 R, pool 0 0 2 -, "
       "conv3_1 128 256 3 R, conv3_2 256 256 3 R, conv3_3 256 256 3 R, conv3_4 256 256 3 R, pool 0 0 2 -, "
       "conv4_1 256 512 3 R, conv4_2 512 512 3 R, ")
PUBLISHED_BODY_FRONT = _table(VGG + "conv4_3_CPM 512 256 3 R, conv4_4_CPM 256 128 3 R")
PUBLISHED_CPM_FRONT = _table(VGG + "conv4_3 512 512 3 R, conv4_4 512 512 3 R, conv5_1 512 512 3 R, "
                                   "conv5_2 512 512 3 R, conv5_3_CPM 512 128 3 R")


def _published_refinement(suffix: str, cin: int, cout: int, last_relu: bool) -> list[tuple[str, int, int, int, bool]]:
    return _table(f"Mconv1{suffix} {cin} 128 7 R, Mconv2{suffix} 128 128 7 R, Mconv3{suffix} 128 128 7 R, "
                  f"Mconv4{suffix} 128 128 7 R, Mconv5{suffix} 128 128 7 R, Mconv6{suffix} 128 128 1 R, "
                  f"Mconv7{suffix} 128 {cout} 1 {'R' if last_relu else '-'}")


def _plan(net, chain) -> list[tuple[str, int, int, int, bool]]:
    rows = []
    for name, k, relu in net.plan(chain):
        conv = None if name == "pool" else getattr(net, name)
        assert conv is None or conv.kernel_size == (k, k)
        rows.append((name, conv.in_channels if conv else 0, conv.out_channels if conv else 0, k, relu))
    return rows


def test_body_layers_match_the_published_definition() -> None:
    with torch.device("meta"):
        net = BodyPoseNet()
    assert _plan(net, net.front) == PUBLISHED_BODY_FRONT
    for stage, (pafs, heatmaps) in zip(range(1, 7), net.branches):
        for branch, chain, out in ((1, pafs, 38), (2, heatmaps, 19)):
            if stage == 1:
                want = _table(f"conv5_1_CPM_L{branch} 128 128 3 R, conv5_2_CPM_L{branch} 128 128 3 R, "
                              f"conv5_3_CPM_L{branch} 128 128 3 R, conv5_4_CPM_L{branch} 128 512 1 R, "
                              f"conv5_5_CPM_L{branch} 512 {out} 1 -")
            else:  # Mconv7_stage6_L2 is not in the reference's no-ReLU list (it names Mconv7_stage6_L1 twice)
                want = _published_refinement(f"_stage{stage}_L{branch}", 185, out, (stage, branch) == (6, 2))
            assert _plan(net, chain) == want, (stage, branch)


@pytest.mark.parametrize("factory,out", [(hand_net, 22), (face_net, 71)])
def test_hand_and_face_layers_match_the_published_definition(factory, out: int) -> None:
    with torch.device("meta"):
        net = factory()
    assert _plan(net, net.front) == PUBLISHED_CPM_FRONT
    assert _plan(net, net.stages[0]) == _table(f"conv6_1_CPM 128 512 1 R, conv6_2_CPM 512 {out} 1 -")
    for stage, chain in zip(range(2, 7), net.stages[1:]):
        assert _plan(net, chain) == _published_refinement(f"_stage{stage}", out + 128, out, False)


def test_the_shared_features_are_rectified() -> None:
    torch.manual_seed(0)
    net = hand_net()
    with torch.no_grad():
        features = net.run(net.front, torch.rand(1, 3, 32, 32) - 0.5)
    assert features.shape == (1, 128, 4, 4) and features.min() >= 0 and (features == 0).any()


# --- drawing and map resampling as the reference does them ------------------------------------------------------------

def test_limb_angle_follows_the_reference_sign_and_truncation() -> None:
    import cv2

    from zeroconv.annotators.pose import LIMB_HALF_WIDTH, _draw_limb

    a, b = (10.0, 10.0), (50.0, 33.0)  # 29.9 degrees: truncation of -150.1 gives -150 (= 30), of 29.9 gives 29
    ours = np.zeros((64, 64, 3), np.uint8)
    _draw_limb(ours, a, b, (255, 255, 255))
    angle = int(np.degrees(np.arctan2(a[1] - b[1], a[0] - b[0])))  # degrees(atan2) of (a - b), rows/cols as drawn
    length = int(np.hypot(b[0] - a[0], b[1] - a[1]) / 2)
    want = np.zeros_like(ours)
    cv2.fillConvexPoly(want, cv2.ellipse2Poly((30, 21), (length, LIMB_HALF_WIDTH), angle, 0, 360, 1), (255, 255, 255))
    assert angle == -150 and np.array_equal(ours, want)


def test_maps_grow_with_lanczos_and_shrink_by_area() -> None:
    import cv2

    maps = np.random.default_rng(0).random((12, 10, 5)).astype(np.float32)
    grown = op.smart_resize(maps, 96, 80)
    want = cv2.resize(maps[..., 3], (80, 96), interpolation=cv2.INTER_LANCZOS4)
    assert np.array_equal(grown[..., 3], want)
    assert not np.allclose(want, cv2.resize(maps[..., 3], (80, 96), interpolation=cv2.INTER_CUBIC))
    shrunk = op.smart_resize(grown, 24, 20)
    assert np.array_equal(shrunk[..., 0], cv2.resize(grown[..., 0], (20, 24), interpolation=cv2.INTER_AREA))
