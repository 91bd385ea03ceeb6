"""From OpenPose maps to people: heatmap peaks, part affinity field scoring, greedy assembly (Cao et al. 2017).

Conventions follow ControlNet v1.1's annotator/openpose (body.py): peaks on sigma-3 blurred heatmaps above 0.1,
10 samples per limb with PAF threshold 0.05 on 80 % of them, and a length prior of half the image height.
Coordinates are pixels of the map; `people_from_maps` returns rows of 18 candidate indices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PEAK_SIGMA = 3.0
PEAK_THRESHOLD = 0.1  # thre1
PAF_THRESHOLD = 0.05  # thre2
PAF_SAMPLES = 10
PAF_HIT_SHARE = 0.8
MIN_PARTS, MIN_MEAN_SCORE = 4, 0.4  # people with fewer parts, or a lower score per part, are dropped
BODY_PARTS = 18
# Limb k joins parts LIMBS[k] (0-based COCO order) and is scored on PAF channels PAF_CHANNELS[k] (x, y). The last two
# (shoulder-ear) only help assembly: they never start a person.
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)
PAF_CHANNELS: tuple[tuple[int, int], ...] = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11),
    (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)
STARTING_LIMBS = 17  # only limbs before this index may create a new person


def blur(heatmap: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with mirrored borders and a 4-sigma radius (scipy.ndimage.gaussian_filter's defaults)."""
    import cv2

    return cv2.GaussianBlur(heatmap.astype(np.float32), (0, 0), sigma, borderType=cv2.BORDER_REFLECT)


def find_peaks(heatmaps: np.ndarray, threshold: float = PEAK_THRESHOLD, sigma: float = PEAK_SIGMA) -> list[np.ndarray]:
    """Per part of (H, W, P) maps: (k, 3) peaks x, y, score (the unblurred value) where the blurred map is a 4-max."""
    peaks = []
    for part in range(heatmaps.shape[2]):
        raw = heatmaps[..., part]
        b = np.pad(blur(raw, sigma), 1, constant_values=-np.inf)
        centre = b[1:-1, 1:-1]
        is_peak = ((centre >= b[:-2, 1:-1]) & (centre >= b[2:, 1:-1]) & (centre >= b[1:-1, :-2])
                   & (centre >= b[1:-1, 2:]) & (centre > threshold))
        ys, xs = np.nonzero(is_peak)
        peaks.append(np.stack([xs, ys, raw[ys, xs]], axis=1).astype(np.float64) if len(xs) else np.zeros((0, 3)))
    return peaks


@dataclass
class Limbs:
    """Chosen connections of one limb type: candidate ids of both ends and the PAF score."""

    a: np.ndarray  # (k,) int, global candidate index
    b: np.ndarray
    score: np.ndarray  # (k,) float


def score_pairs(cand_a: np.ndarray, cand_b: np.ndarray, paf: np.ndarray, image_height: int) -> np.ndarray:
    """(nA, nB) PAF line integral with the length prior, -inf where a pair fails either criterion."""
    height, width = paf.shape[:2]
    vec = cand_b[None, :, :2] - cand_a[:, None, :2]  # (nA, nB, 2)
    norm = np.maximum(np.linalg.norm(vec, axis=2), 1e-3)
    unit = vec / norm[..., None]
    t = np.linspace(0.0, 1.0, PAF_SAMPLES)
    points = cand_a[:, None, None, :2] + t[None, None, :, None] * vec[:, :, None, :]  # (nA, nB, S, 2)
    xs = np.clip(np.round(points[..., 0]).astype(int), 0, width - 1)
    ys = np.clip(np.round(points[..., 1]).astype(int), 0, height - 1)
    field = paf[ys, xs]  # (nA, nB, S, 2)
    along = (field * unit[:, :, None, :]).sum(axis=3)
    prior = along.mean(axis=2) + np.minimum(0.5 * image_height / norm - 1.0, 0.0)
    ok = ((along > PAF_THRESHOLD).sum(axis=2) > PAF_HIT_SHARE * PAF_SAMPLES) & (prior > 0)
    return np.where(ok, prior, -np.inf)


def connect(peaks: list[np.ndarray], offsets: np.ndarray, pafs: np.ndarray, image_height: int) -> list[Limbs | None]:
    """Per limb type, the best one-to-one connections (greedy by score); None where an end has no peaks."""
    limbs: list[Limbs | None] = []
    for (pa, pb), (cx, cy) in zip(LIMBS, PAF_CHANNELS):
        cand_a, cand_b = peaks[pa], peaks[pb]
        if not len(cand_a) or not len(cand_b):
            limbs.append(None)
            continue
        scores = score_pairs(cand_a, cand_b, pafs[..., [cx, cy]], image_height)
        order = np.argsort(-scores, axis=None, kind="stable")
        used_a, used_b, chosen = set(), set(), []
        for flat in order:
            i, j = divmod(int(flat), len(cand_b))
            if not np.isfinite(scores[i, j]) or len(chosen) >= min(len(cand_a), len(cand_b)):
                break
            if i not in used_a and j not in used_b:
                used_a.add(i), used_b.add(j), chosen.append((i, j, scores[i, j]))
        rows = np.array(chosen, dtype=np.float64).reshape(-1, 3)
        limbs.append(Limbs(rows[:, 0].astype(int) + offsets[pa], rows[:, 1].astype(int) + offsets[pb], rows[:, 2]))
    return limbs


def assemble(limbs: list[Limbs | None], scores: np.ndarray) -> np.ndarray:
    """(people, 20) rows: 18 candidate ids (-1 missing), total score, part count; weak people removed."""
    people: list[np.ndarray] = []
    for k, found in enumerate(limbs):
        if found is None:
            continue
        pa, pb = LIMBS[k]
        for a, b, s in zip(found.a, found.b, found.score):
            owners = [p for p in people if p[pa] == a or p[pb] == b][:2]
            if len(owners) == 2 and not ((owners[0][:BODY_PARTS] >= 0) & (owners[1][:BODY_PARTS] >= 0)).any():
                first, second = owners
                first[:BODY_PARTS] += second[:BODY_PARTS] + 1  # missing is -1: -1 + x + 1 = x
                first[BODY_PARTS:] += second[BODY_PARTS:]
                first[BODY_PARTS] += s
                people = [p for p in people if p is not second]
            elif owners:
                person = owners[0]
                if person[pb] != b or len(owners) == 2:
                    person[pb] = b
                    person[BODY_PARTS + 1] += 1
                    person[BODY_PARTS] += scores[b] + s
            elif k < STARTING_LIMBS:
                row = np.full(BODY_PARTS + 2, -1.0)
                row[pa], row[pb] = a, b
                row[BODY_PARTS], row[BODY_PARTS + 1] = scores[a] + scores[b] + s, 2
                people.append(row)
    kept = [p for p in people if p[-1] >= MIN_PARTS and p[-2] / p[-1] >= MIN_MEAN_SCORE]
    return np.array(kept).reshape(-1, BODY_PARTS + 2)


def people_from_maps(heatmaps: np.ndarray, pafs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 19) heatmaps and (H, W, 38) PAFs -> candidates (K, 3) x, y, score and people (n, 20)."""
    peaks = find_peaks(heatmaps[..., :BODY_PARTS])
    counts = np.array([len(p) for p in peaks])
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    candidates = np.concatenate(peaks, axis=0) if counts.sum() else np.zeros((0, 3))
    people = assemble(connect(peaks, offsets, pafs, heatmaps.shape[0]), candidates[:, 2])
    return candidates, people
