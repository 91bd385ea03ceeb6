"""Control maps that need no weights (controlnet-formats.md §5): HWC uint8 RGB in, white-on-black HWC uint8 out."""
from __future__ import annotations

import numpy as np
import cv2


def hwc3(image: np.ndarray) -> np.ndarray:
    """Grey to 3 channels, RGBA composited over white, as the reference annotators expect."""
    if image.dtype != np.uint8:
        raise ValueError(f"annotators take uint8 images, got {image.dtype}; scale 0..1 floats by 255 first")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.float32) / 255.0
        return (image[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)
    return image


def canny(image: np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """OpenCV Canny (3x3 Sobel, L1 gradient, hysteresis on 0..255), the v1.0/v1.1 canny annotator."""
    if not 0 <= low_threshold <= high_threshold <= 255:
        raise ValueError(f"need 0 <= low <= high <= 255, got {low_threshold}, {high_threshold}")
    return hwc3(cv2.Canny(hwc3(image), low_threshold, high_threshold))


def random_canny(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Canny with random thresholds, as ControlNet's canny model was trained (paper §4, appendix)."""
    low = int(rng.integers(50, 151))
    return canny(image, low, int(rng.integers(low + 1, min(low * 3, 255) + 1)))


def xdog(image: np.ndarray, threshold: int = 32) -> np.ndarray:
    """Difference of Gaussians (sigma 0.5 vs 5.0) lines, the v1.1 scribble_xdog annotator."""
    grey = hwc3(image).astype(np.float32)
    dog = cv2.GaussianBlur(grey, (0, 0), 0.5) - cv2.GaussianBlur(grey, (0, 0), 5.0)
    edges = (255.0 - dog).min(axis=2)
    return hwc3(((2 * (255 - edges) > threshold) * 255).astype(np.uint8))


def clean_user_scribble(image: np.ndarray, threshold: int = 127) -> np.ndarray:
    """A user's dark strokes on white become the white-on-black scribble the models expect (v1.0 rule)."""
    rgb = hwc3(image)
    return hwc3(((rgb.min(axis=2) < threshold) * 255).astype(np.uint8))


def _nms(edges: np.ndarray, threshold: int = 127, sigma: float = 3.0) -> np.ndarray:
    """Thin an edge map with 4 directional dilations (the v1.1 scribble post-process)."""
    x = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), sigma)
    kernels = [np.array(k, dtype=np.uint8) for k in (
        [[0, 0, 0], [1, 1, 1], [0, 0, 0]], [[0, 1, 0], [0, 1, 0], [0, 1, 0]],
        [[0, 0, 1], [0, 1, 0], [1, 0, 0]], [[1, 0, 0], [0, 1, 0], [0, 0, 1]])]
    out = np.zeros_like(x)
    for k in kernels:
        out[cv2.dilate(x, k) == x] = 1
    return ((out * x) > threshold).astype(np.uint8) * 255


def synthesize_scribble(image: np.ndarray, seed: int) -> np.ndarray:
    """Human-like scribbles from an image, as the paper trains its scribble model (paper §4, appendix).

    Edges (random-threshold Canny) -> NMS -> Gaussian blur -> threshold, then random morphology and random masking.
    """
    rng = np.random.default_rng(seed)
    edges = random_canny(image, rng)[..., 0]
    thin = _nms(cv2.dilate(edges, np.ones((3, 3), np.uint8)), threshold=30, sigma=3.0)
    scribble = (cv2.GaussianBlur(thin.astype(np.float32), (0, 0), 3.0) > 4).astype(np.uint8) * 255
    size = int(rng.integers(1, 4))
    kernel = np.ones((size, size), np.uint8)
    scribble = cv2.dilate(scribble, kernel) if rng.random() < 0.5 else cv2.erode(cv2.dilate(scribble, kernel), kernel)
    h, w = scribble.shape
    cells = int(rng.integers(4, 9))
    keep = rng.random((cells, cells)) > rng.uniform(0.0, 0.3)  # random masking of patches
    scribble *= cv2.resize(keep.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    return hwc3(scribble)


def straight_lines(image: np.ndarray, threshold: int = 50, min_length: int = 20, max_gap: int = 4) -> np.ndarray:
    """Straight segments by the probabilistic Hough transform on Canny edges: the offline line (M-LSD-like) map."""
    rgb = hwc3(image)
    edges = cv2.Canny(rgb, 50, 150)
    lines = cv2.HoughLinesP(edges, 1, np.pi / 180, threshold, minLineLength=min_length, maxLineGap=max_gap)
    out = np.zeros(rgb.shape[:2], np.uint8)
    for x1, y1, x2, y2 in ([] if lines is None else lines.reshape(-1, 4)):
        cv2.line(out, (int(x1), int(y1)), (int(x2), int(y2)), 255, 1)
    return hwc3(out)


def normal_from_depth(depth: np.ndarray, background_threshold: float = 0.4) -> np.ndarray:
    """Normal map from a depth map (near = bright), the v1.0 normal annotator's geometry (Sobel, z = 2*pi).

    Output channels are (x, y, z) mapped to 0..255 with +x to the right, +y up, +z towards the viewer.
    """
    d = hwc3(depth)[..., 0].astype(np.float32)
    gx = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3)
    # depth grows towards the viewer, so the surface faces where depth falls off: n = (-dD/dx, dD/dy (image y down), z)
    x, y, z = -gx, gy, np.full_like(d, 2 * np.pi)
    background = (d - d.min()) / max(float(np.ptp(d)), 1e-6) < background_threshold
    x[background], y[background] = 0, 0
    n = np.stack([x, y, z], axis=2)
    n /= np.linalg.norm(n, axis=2, keepdims=True)
    return (n * 127.5 + 127.5).clip(0, 255).astype(np.uint8)


def tile(image: np.ndarray, levels: int = 3) -> np.ndarray:
    """Blur by down- then up-sampling (pyrDown x levels, pyrUp x levels): the tile model's condition."""
    rgb = hwc3(image)
    h, w = rgb.shape[:2]
    small = rgb
    for _ in range(levels):
        small = cv2.pyrDown(small)
    for _ in range(levels):
        small = cv2.pyrUp(small)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def color_grid(image: np.ndarray, factor: int = 64) -> np.ndarray:
    """Colour palette grid: shrink by `factor` (cubic), grow back (nearest)."""
    rgb = hwc3(image)
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (max(1, w // factor), max(1, h // factor)), interpolation=cv2.INTER_CUBIC)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def binary(image: np.ndarray, threshold: int = 0) -> np.ndarray:
    """Black/white by Otsu (threshold 0) or a fixed threshold, inverted so dark lines become white."""
    grey = cv2.cvtColor(hwc3(image), cv2.COLOR_RGB2GRAY)
    flag = cv2.THRESH_BINARY_INV | (cv2.THRESH_OTSU if threshold == 0 else 0)
    return hwc3(cv2.threshold(grey, threshold, 255, flag)[1])


def shuffle(image: np.ndarray, seed: int, f: int = 256) -> np.ndarray:
    """Content shuffle: remap by a random smooth flow (v1.1 shuffle annotator)."""
    rgb = hwc3(image)
    h, w = rgb.shape[:2]
    rng = np.random.default_rng(seed)

    def field(extent: int) -> np.ndarray:
        noise = rng.uniform(0, 1, (h // f + 2, w // f + 2)).astype(np.float32)
        grown = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f:f + h, f:f + w]
        return (grown - grown.min()) / max(float(np.ptp(grown)), 1e-6) * (extent - 1)

    return cv2.remap(rgb, field(w), field(h), cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


def inpaint_hint(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The inpaint model's hint, float32 HWC: RGB in [0, 1], masked pixels -1.0 (v1.1 inpaint convention)."""
    rgb = hwc3(image).astype(np.float32) / 255.0
    m = mask.astype(np.float32)
    m = m / 255.0 if mask.dtype == np.uint8 else m
    if m.shape[:2] != rgb.shape[:2]:
        m = cv2.resize(m, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR)
    rgb[m > 0.5] = -1.0
    return rgb


def canny_kornia(images: "torch.Tensor", low_threshold: int = 100, high_threshold: int = 200) -> "torch.Tensor":
    """Canny on a (B, 3, H, W) float 0..1 batch with kornia, on whatever device the batch is (the GPU path).

    Thresholds are on OpenCV's 0..255 scale; kornia works on 0..1 images with a normalised Sobel and an L2
    magnitude, so they are divided by 255 * 4 (chosen by measurement). Agreement with `canny` on synthetic scenes:
    F1 0.89-1.00 within 1 px (tests/test_annotators_classical.py asserts >= 0.85); the maps differ, not the edges.
    """
    import kornia

    grey = kornia.color.rgb_to_grayscale(images)
    scale = 255.0 * 4.0
    _, edges = kornia.filters.canny(grey, low_threshold / scale, high_threshold / scale, kernel_size=(3, 3),
                                    sigma=(0.5, 0.5))
    return edges.expand(-1, 3, -1, -1)
