"""Augmentations of DSM: the triplet a = b(c1), p = s(b(c2)), n = t(b(c3)) (paper, "Methodology").

    b  basic augmentation: random resized crop and colour jitter, drawn once per view, and a
       horizontal flip drawn once per triplet (a flip can change the class: Left becomes Right,
       so a and p must never differ in direction); all applied identically to every frame
       (temporally consistent).
    s  Spatial Local Disturbance: a thin-plate-spline (TPS) warp, one warp for all frames.
    t  Temporal Local Disturbance: optical-flow scaling (Eq. 3, Farneback flow from OpenCV)
       on top of the temporal shift (Eq. 4), whose frames the dataset (data.py) decodes.

Our reading of "Overall Architecture": c1, c2, c3 are three independent random crops of the
same decoded frames (c3 of the tau-shifted frames when the negative uses the shift), b runs
on all three views and s, t come after it. With `positive="none"` the positive is then
exactly the standard MoCo second view, so the rows of Table 4 differ only in s and t.

The dataset calls `transform(clip, shifted, rng)` with uint8 numpy frames (T, H, W, 3) and a
numpy Generator; every random draw comes from that Generator, so a sample is a function of
its seed. Inside this file clips are float tensors (C, T, H, W) in [0, 1]; MEAN/STD
normalisation is the very last step.

    python augment.py --show VIDEO OUT.png     # one triplet as a picture: rows a, p, n
"""
import argparse
import os

import cv2
import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor

MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as in MoCo
STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 grey, as cv2.COLOR_RGB2GRAY and torchvision

POSITIVES = ("tps", "none")
NEGATIVES = ("disturb", "flow", "shift", "none")  # M-disturb, Scaling-Of, T-Shift, none (Table 4)

# Farneback parameters: OpenCV's documented example values (3 pyramid levels, 15-pixel window);
# a 112 x 112 pair takes ~2 ms on one core, and the test's 2 px shift comes back to 0.1 px.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


# ---- geometry shared by the TPS warp and the flow scaling ---------------------

def pixel_centres(height: int, width: int) -> Tensor:
    """(H, W, 2) float64 (x, y) of every pixel centre in grid_sample units (align_corners=False)."""
    x = (2 * torch.arange(width, dtype=torch.float64) + 1) / width - 1
    y = (2 * torch.arange(height, dtype=torch.float64) + 1) / height - 1
    gy, gx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


# ---- Spatial Local Disturbance s: thin-plate spline ----------------------------

def tps_kernel(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """U(|p_i - q_j|) with U(r) = r^2 log r, for p (n, 2), q (m, 2) -> (n, m)."""
    r2 = ((p[:, None, :] - q[None, :, :]) ** 2).sum(-1)
    return 0.5 * r2 * np.log(np.where(r2 > 0, r2, 1.0))  # r^2 log r = r^2 log(r^2) / 2; U(0) = 0


def tps_features(points: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(M, N+3) rows [U(|p - d_1|) .. U(|p - d_N|), 1, x, y]: f(p) = features(p) @ coefficients."""
    return np.hstack([tps_kernel(points, dst), np.ones((len(points), 1)), points])


def tps_system(dst: np.ndarray) -> np.ndarray:
    """The (N+3, N+3) TPS matrix L = [[K, P], [P^T, 0]]: interpolation plus the side conditions."""
    n = len(dst)
    L = np.zeros((n + 3, n + 3))
    L[:n] = tps_features(dst, dst)
    L[n:, :n] = L[:n, n:].T  # sum_i w_i = 0 and sum_i w_i d_i = 0: the bending part has no affine component
    return L


def tps_grid(dst: Tensor, src: Tensor, height: int, width: int) -> Tensor:
    """(H, W, 2) grid_sample grid of the TPS f with f(dst_i) = src_i.

    dst, src: (N, 2) (x, y) in [-1, 1]. The output pixel at dst_i samples the input at src_i.
    """
    assert dst.shape == src.shape and dst.ndim == 2 and dst.shape[1] == 2, (dst.shape, src.shape)
    d = dst.double().numpy()
    rhs = np.vstack([src.double().numpy(), np.zeros((3, 2))])  # [src; 0]
    coefficients = scipy.linalg.solve(tps_system(d), rhs)  # (N+3, 2): w_1..w_N, a_1, a_x, a_y
    points = pixel_centres(height, width).reshape(-1, 2).numpy()
    return torch.from_numpy(tps_features(points, d) @ coefficients).float().reshape(height, width, 2)


class TPSWarp:
    """s: warp a clip with a random TPS, the same warp for every frame (temporally consistent).

    Destination points d_i: a uniform points x points grid that includes the frame border
    (corners at +-1), so the whole frame is disturbed evenly. Offsets Delta_i ~ U[-C, C] per
    coordinate with C = offset x frame size, i.e. 2 * offset in grid units (the frame spans 2).
    f is linear in src, so L^-1 and the kernel between pixels and d_i fold into one (HW, N)
    matrix A once: a new warp is grid = A @ src plus one grid_sample. Pixels sampled outside
    the frame repeat the border (padding "border"): black corners would mark the positive.
    """

    def __init__(self, height: int, width: int, points: int = 5, offset: float = 0.1):
        if points < 2 or offset < 0:
            raise ValueError(f"TPSWarp needs points >= 2 and offset >= 0, got points={points}, offset={offset}")
        self.height, self.width = height, width
        g = np.linspace(-1.0, 1.0, points)
        gy, gx = np.meshgrid(g, g, indexing="ij")
        dst = np.stack([gx.ravel(), gy.ravel()], axis=1)  # (N, 2), N = points^2
        self.dst = torch.from_numpy(dst).float()
        self.C = 2.0 * offset  # in grid units
        L_inv = scipy.linalg.inv(tps_system(dst))
        K_pix = tps_features(pixel_centres(height, width).reshape(-1, 2).numpy(), dst)  # (HW, N+3)
        self.A = (K_pix @ L_inv[:, : len(dst)]).astype(np.float32)  # (HW, N): the [0] rows of [src; 0] drop out

    def grid(self, src: Tensor) -> Tensor:
        """(H, W, 2) grid of the TPS with f(dst_i) = src_i; equals tps_grid(self.dst, src, H, W)."""
        assert src.shape == self.dst.shape, (src.shape, self.dst.shape)
        # numpy, not torch: on a busy CPU torch's threaded BLAS took ~16 ms for this skinny product, numpy 0.1 ms
        grid = self.A @ src.float().numpy()  # (HW, 2)
        return torch.from_numpy(grid).reshape(self.height, self.width, 2)

    def sample_src(self, rng: np.random.Generator) -> Tensor:
        """(N, 2) source points s_i = d_i + Delta_i, Delta_i ~ U[-C, C]^2."""
        delta = rng.uniform(-self.C, self.C, size=tuple(self.dst.shape))
        return self.dst + torch.from_numpy(delta).float()

    def __call__(self, clip: Tensor, rng: np.random.Generator) -> Tensor:
        channels, T, H, W = clip.shape  # (C, T, H, W)
        assert (H, W) == (self.height, self.width), f"TPSWarp built for {self.height}x{self.width}, got {H}x{W}"
        grid = self.grid(self.sample_src(rng))[None]  # (1, H, W, 2)
        # one grid for all frames: fold channels and time into grid_sample's channel axis
        warped = F.grid_sample(clip.reshape(1, channels * T, H, W), grid, mode="bilinear",
                               padding_mode="border", align_corners=False)
        return warped.reshape(channels, T, H, W)


# ---- Temporal Local Disturbance t: optical-flow scaling ------------------------

def grey_uint8(clip: Tensor) -> np.ndarray:
    """(T, H, W) uint8 grey frames of a (3, T, H, W) clip, float in [0, 1] or uint8."""
    assert clip.ndim == 4 and clip.shape[0] == 3, clip.shape
    x = clip.float() / 255 if clip.dtype == torch.uint8 else clip.float()
    grey = torch.einsum("c,cthw->thw", torch.tensor(LUMA), x)
    return (grey * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def farneback_flow(clip: Tensor, scale: float = 1.0) -> Tensor:
    """(T-1, 2, H, W) flow in pixels (x then y) with clip[:, t+1](p) ~= clip[:, t](p + flow[t](p)) (Eq. 2).

    scale < 1 computes the flow on frames resized by `scale` and upsamples it (values x 1/scale).
    """
    if not 0 < scale <= 1:
        raise ValueError(f"flow scale must be in (0, 1], got {scale}")
    _, T, H, W = clip.shape  # (C, T, H, W)
    if T < 2:
        raise ValueError(f"optical flow needs at least 2 frames, got {T}")
    grey = grey_uint8(clip)  # (T, H, W)
    h, w = max(round(H * scale), 1), max(round(W * scale), 1)
    if (h, w) != (H, W):
        grey = np.stack([cv2.resize(g, (w, h), interpolation=cv2.INTER_AREA) for g in grey])
    # OpenCV returns flow with prev(p) ~= next(p + flow(p)); passing (frame t+1, frame t)
    # as (prev, next) gives the convention of Eq. 2.
    flow = np.stack([cv2.calcOpticalFlowFarneback(grey[t + 1], grey[t], None, **FARNEBACK) for t in range(T - 1)])
    flow = torch.from_numpy(flow).permute(0, 3, 1, 2)  # (T-1, 2, h, w)
    if (h, w) != (H, W):
        flow = F.interpolate(flow, size=(H, W), mode="bilinear", align_corners=False)
        flow = flow * torch.tensor([W / w, H / h]).view(1, 2, 1, 1)  # displacements in full-size pixels
    return flow.contiguous()


def scale_motion(clip: Tensor, flow: Tensor, phi: Tensor, padding: str = "border") -> Tensor:
    """Eq. 3: frame 0 unchanged, frame t+1 = frame t of `clip` sampled at p + phi[t] * flow[t](p).

    Samples that fall outside the frame repeat its border (padding "border"); "zeros" makes them
    black, the paper's "wide black boundary" for a large M. Black blotches mark the negative by
    something other than its motion, so the border is the default.
    """
    channels, T, H, W = clip.shape  # (C, T, H, W)
    assert flow.shape == (T - 1, 2, H, W), (flow.shape, clip.shape)
    assert phi.shape == (T - 1,), (phi.shape, T)
    to_grid = torch.tensor([2.0 / W, 2.0 / H])  # one pixel in grid units
    factor = phi.float().view(-1, 1, 1, 1) * to_grid  # (T-1, 1, 1, 2)
    grid = torch.addcmul(pixel_centres(H, W).float(), flow.permute(0, 2, 3, 1), factor)  # Eq. 3: p + phi(t) V(p)
    previous = clip[:, :-1].transpose(0, 1)  # (T-1, C, H, W): frames 0..T-2 of the original clip
    following = F.grid_sample(previous, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    return torch.cat([clip[:, :1], following.transpose(0, 1)], dim=1)


# ---- basic augmentation b -------------------------------------------------------

def resize_crop(frames: np.ndarray, box: tuple[int, int, int, int], size: int, flip: bool = False) -> Tensor:
    """Crop box (top, left, h, w) of uint8 (T, H, W, 3) frames, resize to size x size, optionally
    mirror left-right: float (C, T, size, size) in [0, 1]."""
    top, left, h, w = box
    # (T, H, W, 3) viewed as (T, 3, H, W) is channels-last uint8: torch's fast antialiased path
    crop = torch.from_numpy(frames[:, top:top + h, left:left + w]).permute(0, 3, 1, 2)
    resized = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if flip:
        resized = resized.flip(-1)
    return resized.permute(1, 0, 2, 3).to(torch.float32, memory_format=torch.contiguous_format).div_(255)


def colour_jitter(clip: Tensor, strength: float, rng: np.random.Generator) -> Tensor:
    """Brightness b, contrast c, saturation s ~ U[1 - strength, 1 + strength], one draw for all frames.

    Each is linear in the colour: brightness x -> b x, contrast x -> c x + (1 - c) m with m the
    mean grey of the whole clip (so every frame moves alike), saturation x -> s x + (1 - s) grey(x).
    Together they are one 3x3 colour matrix plus an offset, applied in a single pass and clamped
    once (torchvision clamps after each step). Hue is left out: its RGB <-> HSV round trip would
    cost more than the rest of b.
    """
    if strength == 0:
        return clip
    b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
    luma = torch.tensor(LUMA)
    m = b * float(torch.einsum("c,cthw->", luma, clip)) / clip[0].numel()  # mean grey after brightness
    saturate = s * torch.eye(3) + (1 - s) * torch.outer(torch.ones(3), luma)  # keeps grey: LUMA sums to 1
    out = torch.einsum("oc,cthw->othw", c * b * saturate, clip)
    return out.add_((1 - c) * m).clamp_(0, 1)


def check_frames(frames: np.ndarray, name: str) -> None:
    """Raise a ValueError naming `name` unless frames are what data.py delivers."""
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3):
        got = (type(frames).__name__, getattr(frames, "dtype", None), getattr(frames, "shape", None))
        raise ValueError(f"{name} must be uint8 numpy frames (T, H, W, 3), got {got}")


class BasicAugment:
    """b: random resized crop + colour jitter, drawn once per view, and a horizontal flip chosen
    by the caller (one coin per triplet, or none where a flip changes the class).

    Crop: area fraction ~ U[crop_scale], log aspect ratio ~ U[log crop_ratio] (torchvision's
    RandomResizedCrop; 10 tries, then the largest centred crop), resized to size x size.
    """

    def __init__(self, size: int = 112, crop_scale: tuple[float, float] = (0.3, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter: float = 0.4):
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.size, self.crop_scale, self.crop_ratio, self.jitter = size, tuple(crop_scale), crop_ratio, jitter

    def crop_box(self, height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(top, left, h, w) of a random crop, the same for every frame of the view."""
        log_ratio = np.log(self.crop_ratio)
        for _ in range(10):
            area = height * width * rng.uniform(*self.crop_scale)
            ratio = np.exp(rng.uniform(*log_ratio))
            w, h = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        # no luck: the whole frame, trimmed to the nearest allowed aspect ratio, centred
        ratio = min(max(width / height, self.crop_ratio[0]), self.crop_ratio[1])
        h, w = min(height, round(width / ratio)), min(width, round(height * ratio))
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, frames: np.ndarray, rng: np.random.Generator, flip: bool = False) -> Tensor:
        """uint8 (T, H, W, 3) -> float (C, T, size, size) in [0, 1]."""
        box = self.crop_box(frames.shape[1], frames.shape[2], rng)
        view = resize_crop(frames, box, self.size, flip=flip)
        return colour_jitter(view, self.jitter, rng)


def normalise_(clip: Tensor) -> Tensor:
    """(..., C, T, H, W) in [0, 1] -> (x - MEAN) / STD per channel, in place (the views are ours)."""
    return clip.sub_(torch.tensor(MEAN).view(3, 1, 1, 1)).div_(torch.tensor(STD).view(3, 1, 1, 1))


# ---- the triplet ----------------------------------------------------------------

class DSMTriplet:
    """transform(clip, shifted, rng) -> (3, C, T, size, size): anchor a, positive p, negative n.

    positive: "tps" p = s(b(c2)) | "none" p = b(c2) (the MoCo second view).
    negative: "disturb" (M-disturb) n = flow-scaled b(c3), c3 from the tau-shifted frames (Eq. 3 + 4)
              "flow" (Scaling-Of) the same on the anchor's frames | "shift" (T-Shift) n = b(c3) of
              the shifted frames | "none" no negative: returns (2, C, T, size, size).
    Flow runs on the [0, 1] view at output size, before normalisation; phi(t) ~ U[0, M] per step.
    flip: one coin per triplet mirrors a, p and n together, so they never differ in direction.
    """

    def __init__(self, size: int = 112, positive: str = "tps", negative: str = "disturb",
                 tps_points: int = 5, tps_offset: float = 0.1, flow_max: float = 5.0, flow_scale: float = 1.0,
                 crop_scale: tuple[float, float] = (0.3, 1.0), jitter: float = 0.4, flip: bool = True,
                 flow_padding: str = "border"):
        if positive not in POSITIVES:
            raise ValueError(f"positive must be one of {POSITIVES}, got {positive!r}")
        if negative not in NEGATIVES:
            raise ValueError(f"negative must be one of {NEGATIVES}, got {negative!r}")
        if flow_max < 0 or not 0 < flow_scale <= 1:
            raise ValueError(f"need flow_max >= 0 and 0 < flow_scale <= 1, got {flow_max}, {flow_scale}")
        self.positive, self.negative = positive, negative
        self.M, self.flow_scale, self.flip, self.flow_padding = flow_max, flow_scale, flip, flow_padding
        self.b = BasicAugment(size, crop_scale, jitter=jitter)
        self.s = TPSWarp(size, size, tps_points, tps_offset) if positive == "tps" else None

    @property
    def uses_shift(self) -> bool:
        """Whether the negative needs the tau-shifted frames (Eq. 4)."""
        return self.negative in ("disturb", "shift")

    def disturb_motion(self, clip: Tensor, rng: np.random.Generator) -> Tensor:
        """Optical-flow scaling (Eq. 3) with phi(t) ~ U[0, M], one value per time step."""
        phi = torch.from_numpy(rng.uniform(0.0, self.M, size=clip.shape[1] - 1)).float()
        return scale_motion(clip, farneback_flow(clip, self.flow_scale), phi, self.flow_padding)

    def __call__(self, clip: np.ndarray, shifted: np.ndarray | None, rng: np.random.Generator) -> Tensor:
        check_frames(clip, "clip")
        flip = self.flip and rng.random() < 0.5
        a = self.b(clip, rng, flip)  # a = b(c1)
        p = self.b(clip, rng, flip)  # b(c2)
        if self.s is not None:
            p = self.s(p, rng)  # p = s(b(c2))
        views = [a, p]
        if self.negative != "none":
            if self.uses_shift:
                if shifted is None:
                    raise ValueError(f"negative={self.negative!r} needs the tau-shifted frames, got shifted=None")
                check_frames(shifted, "shifted")
                if shifted.shape != clip.shape:
                    raise ValueError(f"shifted frames {shifted.shape} differ from clip frames {clip.shape}")
            n = self.b(shifted if self.uses_shift else clip, rng, flip)  # b(c3), Eq. 4 when shifted
            if self.negative in ("disturb", "flow"):
                n = self.disturb_motion(n, rng)  # n = t(b(c3))
            views.append(n)
        return torch.stack([normalise_(v) for v in views])  # (V, C, T, size, size)


class ClipTransform:
    """One normalised view (C, T, size, size) for fine-tuning and retrieval.

    train: b (random crop, colour jitter, and a flip if `flip`); test: the centred square of side 7/8 of the short
    side, resized to size x size (deterministic, rng unused). data.py decodes at a short side of
    8/7 x size, so this is the usual 112-of-128 centre crop with no resampling.
    """

    def __init__(self, size: int = 112, train: bool = True, flip: bool = True,
                 crop_scale: tuple[float, float] = (0.3, 1.0)):
        self.size, self.train, self.flip = size, train, flip
        self.b = BasicAugment(size, crop_scale) if train else None

    def __call__(self, clip: np.ndarray, shifted: np.ndarray | None = None,
                 rng: np.random.Generator | None = None) -> Tensor:
        check_frames(clip, "clip")
        if self.b is not None:
            if rng is None:
                raise ValueError("ClipTransform(train=True) draws its crop from rng; got rng=None")
            return normalise_(self.b(clip, rng, self.flip and rng.random() < 0.5))
        _, H, W, _ = clip.shape
        side = round(min(H, W) * 7 / 8)
        return normalise_(resize_crop(clip, ((H - side) // 2, (W - side) // 2, side, side), self.size))


# ---- flags and DataLoader workers ----------------------------------------------

def add_augment_args(parser: argparse.ArgumentParser) -> None:
    """The disturbance flags of the stage scripts (paper: Spatial / Temporal Local Disturbance)."""
    group = parser.add_argument_group("augmentation (paper: Spatial and Temporal Local Disturbance)")
    group.add_argument("--tps-points", type=int, default=5, help="TPS destination grid, points per side (default: 5)")
    group.add_argument("--tps-offset", type=float, default=0.1,
                       help="TPS offset C as a fraction of the frame size (default: 0.1)")
    group.add_argument("--flow-max", type=float, default=5.0, help="M: flow scale phi(t) ~ U[0, M] (default: 5)")
    group.add_argument("--flow-scale", type=float, default=1.0,
                       help="compute Farneback flow at this fraction of the crop size and upsample it (default: 1.0)")
    group.add_argument("--flow-padding", choices=("border", "zeros"), default="border",
                       help="flow scaling's samples from outside the frame: repeat the border, or black as the "
                            "paper shows it (default: border)")


def worker_init(worker_id: int) -> None:
    """DataLoader workers run one thread each: torch sets its own, OpenCV's must be set here."""
    cv2.setNumThreads(1)


# ---- python augment.py --show VIDEO OUT.png --------------------------------------

def decode_video(path: str) -> np.ndarray:
    """All frames of a video as uint8 (N, H, W, 3), decoded with PyAV."""
    import av  # only the picture tool decodes here; training decodes in data.py

    try:
        with av.open(path) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, IndexError) as e:
        raise SystemExit(f"cannot decode {path}: {e}")
    if not frames:
        raise SystemExit(f"{path} has no video frames")
    return np.stack(frames)


def save_strip(views: Tensor, path: str, labels: tuple[str, ...]) -> None:
    """Write (V, C, T, S, S) normalised views as a PNG: one row per view, one column per frame."""
    from PIL import Image, ImageDraw

    mean, std = torch.tensor(MEAN).view(3, 1, 1, 1), torch.tensor(STD).view(3, 1, 1, 1)
    pixels = ((views * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)  # (V, C, T, S, S)
    V, _, T, S, _ = pixels.shape
    margin = 16  # room for the row label
    canvas = np.full((V * S, margin + T * S, 3), 255, np.uint8)
    canvas[:, margin:] = pixels.permute(0, 3, 2, 4, 1).reshape(V * S, T * S, 3).numpy()
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for row, label in enumerate(labels):
        draw.text((4, row * S + S // 2 - 6), label, fill=(0, 0, 0))
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--show", nargs=2, metavar=("VIDEO", "OUT_PNG"), required=True,
                        help="video file to decode (all frames, with PyAV) and PNG to write")
    parser.add_argument("--size", type=int, default=112, help="output side in pixels (default: 112)")
    parser.add_argument("--frames", type=int, default=8, help="frames per clip T (default: 8)")
    parser.add_argument("--stride", type=int, default=4, help="temporal stride between frames (default: 4)")
    parser.add_argument("--start", type=int, default=0, help="first frame of the anchor (default: 0)")
    parser.add_argument("--tau", type=int, default=10, help="temporal shift of the negative, Eq. 4 (default: 10)")
    parser.add_argument("--positive", choices=POSITIVES, default="tps", help="positive view (default: tps)")
    parser.add_argument("--negative", choices=NEGATIVES, default="disturb", help="negative view (default: disturb)")
    add_augment_args(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the numpy Generator (default: 0)")
    args = parser.parse_args()
    video, out = args.show
    if not os.path.isfile(video):
        parser.error(f"no such video file: {video}")
    if args.frames < 2 or args.stride < 1 or args.tau < 0:
        parser.error("need --frames >= 2, --stride >= 1 and --tau >= 0")

    transform = DSMTriplet(args.size, args.positive, args.negative, args.tps_points, args.tps_offset,
                           args.flow_max, args.flow_scale, flow_padding=args.flow_padding)
    frames = decode_video(video)
    anchor = [(args.start + i * args.stride) % len(frames) for i in range(args.frames)]
    shifted = [(i + args.tau) % len(frames) for i in anchor]  # Eq. 4, looping past the end
    views = transform(frames[anchor], frames[shifted], np.random.default_rng(args.seed))
    save_strip(views, out, ("a", "p", "n")[: len(views)])
    print(f"wrote {out}: rows {('a', 'p', 'n')[: len(views)]}, {args.frames} frames of {video} ({len(frames)} decoded)")


if __name__ == "__main__":
    main()
