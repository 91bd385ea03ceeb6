"""OpenPose's convolutional pose machines (Cao et al. CVPR 2017; Simon et al. CVPR 2017 for hands), as data.

Every conv is a direct child named as in the weight files (`body_pose_model.pth`, `hand_pose_model.pth`,
`facenet.pth` of lllyasviel/Annotators; names from annotator/openpose/model.py and face.py of
lllyasviel/ControlNet-v1-1-nightly), so the files load with no renaming: `conv1_1.weight`,
`conv5_5_CPM_L2.bias`, `Mconv7_stage6_L1.weight`, `conv6_2_CPM.weight`, `Mconv1_stage2.weight`, ...
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Layer = tuple[str, int, int, int]  # (name, in channels, out channels, kernel); stride 1, "same" padding
POOL = ("pool", 0, 0, 2)  # 2x2 max-pool, stride 2

BODY_PAFS, BODY_HEATMAPS = 38, 19  # 19 limbs x (x, y); 18 keypoints + background
HAND_HEATMAPS = 22  # 21 keypoints + background
FACE_HEATMAPS = 71  # 70 landmarks + background
STAGES = range(2, 7)  # refinement stages 2..6 after stage 1

VGG19_FRONT: tuple[Layer, ...] = (
    ("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), POOL,
    ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), POOL,
    ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3), POOL,
    ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3),
)
BODY_FRONT = VGG19_FRONT + (("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3))
CPM_FRONT = VGG19_FRONT + (("conv4_3", 512, 512, 3), ("conv4_4", 512, 512, 3), ("conv5_1", 512, 512, 3),
                           ("conv5_2", 512, 512, 3), ("conv5_3_CPM", 512, 128, 3))
FEATURES = 128  # channels of the front's output, concatenated to every stage's input


def _no_relu() -> frozenset[str]:
    """The convs not followed by a ReLU: each stage's output conv, as in the published definitions (model.py and
    face.py of annotator/openpose in lllyasviel/ControlNet-v1-1-nightly). Every other conv, the fronts' last ones
    (conv4_4_CPM, conv5_3_CPM) included, is followed by one. The reference lists Mconv7_stage6_L1 twice and never
    Mconv7_stage6_L2, so the body's final heatmaps go through a ReLU; kept, as the released inference (and its
    thresholds) ran that way."""
    body = {f"conv5_5_CPM_L{b}" for b in (1, 2)} | {f"Mconv7_stage{s}_L1" for s in STAGES}
    body |= {f"Mconv7_stage{s}_L2" for s in STAGES if s != STAGES[-1]}
    return frozenset(body | {"conv6_2_CPM"} | {f"Mconv7_stage{s}" for s in STAGES})


NO_RELU = _no_relu()


def body_stage(stage: int, branch: int, outputs: int) -> tuple[Layer, ...]:
    """Branch L1 (PAFs) or L2 (heatmaps) of a body stage."""
    if stage == 1:
        return tuple((f"conv5_{i}_CPM_L{branch}", FEATURES, FEATURES, 3) for i in (1, 2, 3)) + (
            (f"conv5_4_CPM_L{branch}", FEATURES, 512, 1), (f"conv5_5_CPM_L{branch}", 512, outputs, 1))
    inputs = BODY_PAFS + BODY_HEATMAPS + FEATURES
    return _refinement(lambda i: f"Mconv{i}_stage{stage}_L{branch}", inputs, outputs)


def cpm_stage(stage: int, outputs: int) -> tuple[Layer, ...]:
    """A stage of the single-branch machines (hand, face)."""
    if stage == 1:
        return (("conv6_1_CPM", FEATURES, 512, 1), ("conv6_2_CPM", 512, outputs, 1))
    return _refinement(lambda i: f"Mconv{i}_stage{stage}", outputs + FEATURES, outputs)


def _refinement(name, inputs: int, outputs: int) -> tuple[Layer, ...]:
    """Five 7x7 convs, a 1x1 conv, and a 1x1 conv to the outputs (stages 2..6)."""
    return ((name(1), inputs, FEATURES, 7),) + tuple((name(i), FEATURES, FEATURES, 7) for i in (2, 3, 4, 5)) + (
        (name(6), FEATURES, FEATURES, 1), (name(7), FEATURES, outputs, 1))


class NamedConvs(nn.Module):
    """Convs registered flat under their checkpoint names; chains of them run with ReLU between."""

    def add_layers(self, layers: tuple[Layer, ...]) -> tuple[Layer, ...]:
        for name, cin, cout, k in layers:
            if name != "pool":
                self.add_module(name, nn.Conv2d(cin, cout, k, padding=k // 2))
        return layers

    def plan(self, layers: tuple[Layer, ...]) -> list[tuple[str, int, bool]]:
        """(name, kernel, followed by a ReLU) for each layer of a chain, pools as ("pool", 2, False); what run does."""
        return [(name, k, name != "pool" and name not in NO_RELU) for name, _, _, k in layers]

    def run(self, layers: tuple[Layer, ...], x: torch.Tensor) -> torch.Tensor:
        """The chain, a ReLU after every conv but the stages' output convs (NO_RELU)."""
        for name, _, relu in self.plan(layers):
            x = F.max_pool2d(x, 2, 2) if name == "pool" else getattr(self, name)(x)
            if relu:
                x = F.relu(x)
        return x


class BodyPoseNet(NamedConvs):
    """Two-branch CPM: VGG-19 front, 6 stages of PAFs (L1, 38 channels) and heatmaps (L2, 19), stride 8."""

    def __init__(self) -> None:
        super().__init__()
        self.front = self.add_layers(BODY_FRONT)
        self.branches = [(self.add_layers(body_stage(s, 1, BODY_PAFS)), self.add_layers(body_stage(s, 2, BODY_HEATMAPS)))
                         for s in (1, *STAGES)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) BGR /256 - 0.5 -> PAFs (N, 38, H/8, W/8), heatmaps (N, 19, H/8, W/8)."""
        features = self.run(self.front, x)
        h = features
        for pafs, heatmaps in self.branches:
            paf, heat = self.run(pafs, h), self.run(heatmaps, h)
            h = torch.cat([paf, heat, features], dim=1)
        return paf, heat


class KeypointNet(NamedConvs):
    """Single-branch CPM (hand: 22 heatmaps, face: 71): VGG-19 front to conv5_3_CPM, 6 stages, stride 8."""

    def __init__(self, heatmaps: int) -> None:
        super().__init__()
        self.front = self.add_layers(CPM_FRONT)
        self.stages = [self.add_layers(cpm_stage(s, heatmaps)) for s in (1, *STAGES)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) BGR /256 - 0.5 -> last stage's heatmaps (N, K, H/8, W/8)."""
        features = self.run(self.front, x)
        h = features
        for i, stage in enumerate(self.stages):
            h = self.run(stage, h if i == 0 else torch.cat([h, features], dim=1))
        return h


def hand_net() -> KeypointNet:
    """The hand pose machine (hand_pose_model.pth)."""
    return KeypointNet(HAND_HEATMAPS)


def face_net() -> KeypointNet:
    """The face landmark machine (facenet.pth)."""
    return KeypointNet(FACE_HEATMAPS)


class OpenPoseNets(nn.Module):
    """Body, and optionally hand and face machines, as one module the host can move and offload together."""

    def __init__(self, body: BodyPoseNet, hand: KeypointNet | None = None, face: KeypointNet | None = None) -> None:
        super().__init__()
        self.body, self.hand, self.face = body, hand, face
