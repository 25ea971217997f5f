"""Augmentations of DSM (paper, "Methodology"): the triplet a = b(c1), p = s(b(c2)), n = t(b(c3)).

    b  basic augmentation: random resized crop and colour jitter per view, one horizontal flip per triplet (a flip
       can turn Left into Right, so a and p share it); each the same on every frame.
    s  Spatial Local Disturbance: a thin-plate-spline (TPS) warp, one warp for all frames.
    t  Temporal Local Disturbance: optical-flow scaling (Eq. 3, Farneback flow) on top of the temporal shift (Eq. 4).

Our reading of "Overall Architecture": c1, c2, c3 are independent crops of the same frames (c3 of the tau-shifted ones
with the shift), s and t come after b: with positive="none" p is MoCo's second view, so Table 4 differs only in s, t.
transform(clip, shifted, rng) takes uint8 (T, H, W, 3); every draw comes from rng (a sample is a function of its seed).
Device path (pretrain.py --augment-device cuda): workers decode and draw, the GPU applies (DSMTriplet.apply_batch).

    python augment.py --show VIDEO OUT.png     # one triplet as a picture: rows a, p, n
"""
import argparse

import cv2
import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet statistics, as in MoCo
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 grey, as cv2.COLOR_RGB2GRAY and torchvision
POSITIVES = ("tps", "none")
NEGATIVES = ("disturb", "flow", "shift", "none")  # M-disturb, Scaling-Of, T-Shift, none (Table 4)
# OpenCV's documented example values: ~2 ms per 112 x 112 pair on one core; a 2 px test shift comes back to 0.1 px.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
TPS_POINTS = 5  # destination grid of the TPS, points per side: the authors' 5 x 5
TPS_OFFSET = 0.1  # C of the offsets U[-C, C] as a fraction of the frame size (paper: 1/10)
CropBox = tuple[int, int, int, int]  # top, left, h, w


def pixel_centres(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """(H, W, 2) float64 (x, y) of every pixel centre in grid_sample units (align_corners=False)."""
    x = (2 * torch.arange(width, dtype=torch.float64, device=device) + 1) / width - 1
    y = (2 * torch.arange(height, dtype=torch.float64, device=device) + 1) / height - 1
    gy, gx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


# ---- basic augmentation b -------------------------------------------------------
def resize_crop(frames: np.ndarray | Tensor, box: CropBox, size: int, flip: bool = False) -> Tensor:
    """uint8 (T, H, W, 3) frames -> float (C, T, size, size) in [0, 1] of the box, resized, mirrored if flip."""
    top, left, h, w = box
    # (T, H, W, 3) viewed as (T, 3, H, W) is channels-last uint8: torch's fast antialiased path
    crop = torch.as_tensor(frames)[:, top:top + h, left:left + w].permute(0, 3, 1, 2)
    on_cpu = crop.device.type == "cpu"  # antialiased uint8 resizing exists on the CPU only: resize floats, round
    resized = F.interpolate(crop if on_cpu else crop.float(), size=(size, size), mode="bilinear",
                            align_corners=False, antialias=True)
    resized = resized if on_cpu else resized.round_().clamp_(0, 255)
    resized = resized.flip(-1) if flip else resized
    return resized.permute(1, 0, 2, 3).to(torch.float32, memory_format=torch.contiguous_format).div_(255)


def colour_jitter(clip: Tensor, factors: np.ndarray | Tensor) -> Tensor:
    """Brightness b, contrast c, saturation s = factors (..., 3) on clips (..., C, T, H, W): b x, c x + (1 - c) mean
    grey, s x + (1 - s) grey(x), one colour matrix + offset clamped once. No hue: its HSV trip costs more than b."""
    f = torch.as_tensor(factors, dtype=torch.float64).to(clip.device)
    b, c, s, luma = f[..., 0], f[..., 1], f[..., 2], torch.tensor(LUMA, device=clip.device)
    # float64 where the scalars were float64, float32 where they met the clip: alone or in a batch, the same result
    m = b * torch.einsum("c,...cthw->...", luma, clip).double() / clip.shape[-3:].numel()
    eye, grey_rows = torch.eye(3, device=clip.device), torch.outer(torch.ones(3, device=clip.device), luma)
    saturate = s.float()[..., None, None] * eye + (1 - s).float()[..., None, None] * grey_rows  # keeps grey
    out = torch.einsum("...oc,...cthw->...othw", (c * b).float()[..., None, None] * saturate, clip)
    return out.add_(((1 - c) * m).float()[..., None, None, None, None]).clamp_(0, 1)


def draw_jitter(strength: float, rng: np.random.Generator) -> np.ndarray | None:
    """(b, c, s) ~ U[1 - strength, 1 + strength]^3, one draw for all frames; None (and no draw) at 0."""
    return rng.uniform(1 - strength, 1 + strength, size=3) if strength > 0 else None


def check_frames(frames: np.ndarray, name: str) -> None:
    """Raise a ValueError naming `name` unless frames are what data.py delivers."""
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3):
        got = (type(frames).__name__, getattr(frames, "dtype", None), getattr(frames, "shape", None))
        raise ValueError(f"{name} must be uint8 numpy frames (T, H, W, 3), got {got}")


class BasicAugment:
    """b: a random resized crop (as torchvision's) + colour jitter, drawn once per view; the caller picks the flip."""

    def __init__(self, size: int = 112, crop_scale: tuple[float, float] = (0.3, 1.0),
                 crop_ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter: float = 0.4):
        if not 0 < crop_scale[0] <= crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.size, self.crop_scale, self.crop_ratio, self.jitter = size, tuple(crop_scale), crop_ratio, jitter

    def crop_box(self, height: int, width: int, rng: np.random.Generator) -> CropBox:
        """A random crop, the same for every frame of the view."""
        log_ratio = np.log(self.crop_ratio)
        for _ in range(10):
            area, ratio = height * width * rng.uniform(*self.crop_scale), np.exp(rng.uniform(*log_ratio))
            w, h = round(np.sqrt(area * ratio)), round(np.sqrt(area / ratio))
            if 0 < w <= width and 0 < h <= height:
                return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
        ratio = min(max(width / height, self.crop_ratio[0]), self.crop_ratio[1])  # no luck: the centre, ratio clipped
        h, w = min(height, round(width / ratio)), min(width, round(height * ratio))
        return (height - h) // 2, (width - w) // 2, h, w

    def draw(self, height: int, width: int, rng: np.random.Generator) -> tuple[CropBox, np.ndarray | None]:
        """One view's draws: its crop box, then its jitter factors (None without jitter)."""
        return self.crop_box(height, width, rng), draw_jitter(self.jitter, rng)

    def apply(self, frames: np.ndarray | Tensor, box: CropBox, factors: np.ndarray | None,
              flip: bool = False) -> Tensor:
        """uint8 (T, H, W, 3) -> float (C, T, size, size) in [0, 1], given the view's draws."""
        view = resize_crop(frames, box, self.size, flip=flip)
        return view if factors is None else colour_jitter(view, factors)

    def __call__(self, frames: np.ndarray, rng: np.random.Generator, flip: bool = False) -> Tensor:
        return self.apply(frames, *self.draw(frames.shape[1], frames.shape[2], rng), flip)


def normalise_(clip: Tensor) -> Tensor:
    """(..., C, T, H, W) in [0, 1] -> (x - MEAN) / STD per channel, in place (the views are ours)."""
    mean, std = (torch.tensor(v, device=clip.device).view(3, 1, 1, 1) for v in (MEAN, STD))
    return clip.sub_(mean).div_(std)


# ---- Spatial Local Disturbance s: thin-plate spline ----------------------------
def tps_matrix(dst: np.ndarray, height: int, width: int) -> np.ndarray:
    """(HW, N) A such that A @ src (N, 2) is the TPS f(p) = sum_i w_i U(|p - d_i|) + a_0 + a_x x + a_y y with
    f(dst_i) = src_i at every pixel centre: [w; a] = L^-1 [src; 0] is linear in src, so L^-1 folds into A."""
    def features(points: np.ndarray) -> np.ndarray:  # [U(|p - d_i|), 1, x, y] per point p
        r2 = ((points[:, None, :] - dst[None, :, :]) ** 2).sum(-1)
        kernel = 0.5 * r2 * np.log(np.where(r2 > 0, r2, 1.0))  # U(r) = r^2 log r = r^2 log(r^2) / 2; U(0) = 0
        return np.hstack([kernel, np.ones((len(points), 1)), points])
    n = len(dst)
    L = np.zeros((n + 3, n + 3))
    L[:n] = features(dst)
    L[n:, :n] = L[:n, n:].T
    pixels = pixel_centres(height, width).reshape(-1, 2).numpy()
    return features(pixels) @ scipy.linalg.inv(L)[:, :n]  # the 3 zero rows of [src; 0] drop out


class TPSWarp:
    """s: one random TPS warp for all frames: d_i a points x points grid with corners at +-1, offsets ~ U[-C, C],
    C = offset x frame size. The border repeats outside the frame: black corners would mark the positive."""

    def __init__(self, height: int, width: int, points: int = 5, offset: float = 0.1):
        if points < 2 or offset < 0:
            raise ValueError(f"TPSWarp needs points >= 2 and offset >= 0, got points={points}, offset={offset}")
        self.height, self.width, self.C = height, width, 2.0 * offset  # C in grid units
        gy, gx = np.meshgrid(np.linspace(-1.0, 1.0, points), np.linspace(-1.0, 1.0, points), indexing="ij")
        dst = np.stack([gx.ravel(), gy.ravel()], axis=1)  # (N, 2), N = points^2
        self.dst, self.A = torch.from_numpy(dst).float(), tps_matrix(dst, height, width).astype(np.float32)  # A (HW, N)
        self._A_on: dict[str, Tensor] = {}  # A as a tensor per device, for the device path

    def __getstate__(self) -> dict:
        """No device copies of A for a DataLoader worker: they would open a CUDA context in each one."""
        return {**self.__dict__, "_A_on": {}}

    def grid(self, src: Tensor) -> Tensor:
        """(H, W, 2) grid_sample grid of the TPS f with f(dst_i) = src_i: the output pixel at dst_i samples src_i."""
        assert src.shape == self.dst.shape, (src.shape, self.dst.shape)
        # numpy, not torch: on a busy CPU torch's threaded BLAS took ~16 ms for this skinny product, numpy 0.1 ms
        return torch.from_numpy(self.A @ src.float().numpy()).reshape(self.height, self.width, 2)  # from (HW, 2)

    def sample_src(self, rng: np.random.Generator) -> Tensor:
        """(N, 2) source points s_i = d_i + Delta_i, Delta_i ~ U[-C, C]^2."""
        return self.dst + torch.from_numpy(rng.uniform(-self.C, self.C, size=tuple(self.dst.shape))).float()

    def grids(self, src: Tensor) -> Tensor:
        """(B, H, W, 2) grids of a batch of source points (B, N, 2), on their device (the device path)."""
        key = str(src.device)
        if key not in self._A_on:
            self._A_on[key] = torch.from_numpy(self.A).to(src.device)
        return (self._A_on[key] @ src.float()).reshape(-1, self.height, self.width, 2)

    def warp(self, clip: Tensor, grid: Tensor) -> Tensor:
        """Clips (B, C, T, H, W) sampled at their grids (B, H, W, 2), one grid for all frames of a clip."""
        B, channels, T, H, W = clip.shape
        assert (H, W) == (self.height, self.width), f"TPSWarp built for {self.height}x{self.width}, got {H}x{W}"
        warped = F.grid_sample(clip.reshape(B, channels * T, H, W), grid, mode="bilinear", padding_mode="border",
                               align_corners=False)  # channels and time folded into grid_sample's channel axis
        return warped.reshape(B, channels, T, H, W)

    def apply(self, clip: Tensor, src: Tensor) -> Tensor:
        """s on one clip (C, T, H, W) with the source points src (N, 2)."""
        return self.warp(clip[None], self.grid(src)[None])[0]

    def __call__(self, clip: Tensor, rng: np.random.Generator) -> Tensor:
        return self.apply(clip, self.sample_src(rng))


# ---- Temporal Local Disturbance t: optical-flow scaling ------------------------
def grey_levels(clip: Tensor) -> Tensor:
    """Whole grey levels (..., T, H, W) in [0, 255] of [0, 1] or uint8 (..., 3, T, H, W) clips: OpenCV's flow input."""
    assert clip.ndim >= 4 and clip.shape[-4] == 3, clip.shape
    x = clip.float() / 255 if clip.dtype == torch.uint8 else clip.float()
    grey = torch.einsum("c,...cthw->...thw", torch.tensor(LUMA, device=clip.device), x)
    return (grey * 255).round().clamp(0, 255)


def farneback_flow(clip: Tensor) -> Tensor:
    """(T-1, 2, H, W) flow in pixels (x then y) with clip[:, t+1](p) ~= clip[:, t](p + flow[t](p)) (Eq. 2)."""
    _, T, H, W = clip.shape  # (C, T, H, W)
    if T < 2:
        raise ValueError(f"optical flow needs at least 2 frames, got {T}")
    grey = grey_levels(clip).to(torch.uint8).numpy()  # (T, H, W)
    # OpenCV's flow has prev(p) ~= next(p + flow(p)): (frame t+1, frame t) as (prev, next) gives Eq. 2
    flow = np.stack([cv2.calcOpticalFlowFarneback(grey[t + 1], grey[t], None, **FARNEBACK) for t in range(T - 1)])
    return torch.from_numpy(flow).permute(0, 3, 1, 2).contiguous()  # (T-1, 2, H, W)


def scale_motion(clip: Tensor, flow: Tensor, phi: Tensor) -> Tensor:
    """Eq. 3 on clips (..., C, T, H, W): frame 0 kept, frame t+1 = frame t sampled at p + phi[t] * flow[t](p). Outside
    the frame the border repeats: the paper's "wide black boundary" at large M would mark n by more than motion."""
    *batch, channels, T, H, W = clip.shape
    assert flow.shape == (*batch, T - 1, 2, H, W), (flow.shape, clip.shape)
    assert phi.shape == (*batch, T - 1), (phi.shape, clip.shape)
    to_grid = torch.tensor([2.0 / W, 2.0 / H], device=clip.device)  # one pixel in grid units
    factor = phi.float().reshape(-1, 1, 1, 1) * to_grid  # (B(T-1), 1, 1, 2)
    grid = torch.addcmul(pixel_centres(H, W, clip.device).float(), flow.reshape(-1, 2, H, W).permute(0, 2, 3, 1),
                         factor)  # Eq. 3: p + phi(t) V(p)
    previous = clip.reshape(-1, channels, T, H, W)[:, :, :-1].transpose(1, 2)  # (B, T-1, C, H, W): frames 0..T-2
    following = F.grid_sample(previous.reshape(-1, channels, H, W), grid, mode="bilinear", padding_mode="border",
                              align_corners=False).reshape(-1, T - 1, channels, H, W)
    out = torch.cat([clip.reshape(-1, channels, T, H, W)[:, :, :1], following.transpose(1, 2)], dim=2)
    return out.reshape(clip.shape)


# ---- the triplet a, p, n -------------------------------------------------------
class DSMTriplet:
    """transform(clip, shifted, rng) -> (3, C, T, size, size): anchor a, positive p, negative n. positive: "tps"
    p = s(b(c2)) | "none" p = b(c2) (MoCo's second view). negative: "disturb" (M-disturb) n = flow-scaled b(c3), c3 of
    the tau-shifted frames (Eq. 3 + 4) | "flow" (Scaling-Of) the same on the anchor's frames | "shift" (T-Shift)
    n = b(c3) of the shifted frames | "none": (2, C, T, size, size). phi(t) ~ U[0, M] per step, flow of the [0, 1] view;
    one flip for a, p, n. `draw` alone consumes rng: the CPU path applies its draws per sample (`apply`), the device
    path (FramesAndDraws, `apply_batch`) per batch."""

    def __init__(self, size: int = 112, positive: str = "tps", negative: str = "disturb", flow_max: float = 5.0,
                 crop_scale: tuple[float, float] = (0.3, 1.0), jitter: float = 0.4, flip: bool = True):
        for name, value, allowed in (("positive", positive, POSITIVES), ("negative", negative, NEGATIVES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if flow_max < 0:
            raise ValueError(f"need flow_max >= 0, got {flow_max}")
        self.positive, self.negative, self.M, self.flip = positive, negative, flow_max, flip
        self.uses_shift = negative in ("disturb", "shift")  # n needs the tau-shifted frames (Eq. 4)
        self.scales_flow = negative in ("disturb", "flow")  # n is flow-scaled (Eq. 3)
        self.b = BasicAugment(size, crop_scale, jitter=jitter)
        self.s = TPSWarp(size, size, TPS_POINTS, TPS_OFFSET) if positive == "tps" else None

    def check(self, clip: np.ndarray, shifted: np.ndarray | None) -> None:
        """Raise a ValueError unless the frames are what this triplet needs."""
        check_frames(clip, "clip")
        if self.uses_shift:
            if shifted is None:
                raise ValueError(f"negative={self.negative!r} needs the tau-shifted frames, got shifted=None")
            check_frames(shifted, "shifted")
            if shifted.shape != clip.shape:
                raise ValueError(f"shifted frames {shifted.shape} differ from clip frames {clip.shape}")

    def draw(self, T: int, height: int, width: int, rng: np.random.Generator) -> dict[str, Tensor]:
        """Every random choice of one triplet, in order: flip; box, jitter of a, then of p; TPS points of s; box, jitter
        of n; phi of t. "box" (V, 4); "jitter" (V, 3) with jitter, "src" (N, 2) with s, "phi" (T-1,) with flow."""
        draws = {"flip": torch.tensor(self.flip and rng.random() < 0.5)}
        views = [self.b.draw(height, width, rng), self.b.draw(height, width, rng)]  # c1, c2
        if self.s is not None:
            draws["src"] = self.s.sample_src(rng)
        if self.negative != "none":
            views.append(self.b.draw(height, width, rng))  # c3
            if self.scales_flow:
                draws["phi"] = torch.from_numpy(rng.uniform(0.0, self.M, size=T - 1)).float()  # phi(t) ~ U[0, M]
        draws["box"] = torch.tensor([box for box, _ in views])
        if self.b.jitter > 0:
            draws["jitter"] = torch.from_numpy(np.stack([factors for _, factors in views]))
        return draws

    def sources(self) -> list[int]:
        """Which frames each view crops: 0 the anchor's, 1 the tau-shifted ones (Eq. 4)."""
        return [0, 0] + ([] if self.negative == "none" else [1 if self.uses_shift else 0])

    def apply(self, clip: np.ndarray, shifted: np.ndarray | None, draws: dict[str, Tensor]) -> Tensor:
        """The CPU path: one triplet (V, C, T, size, size) from its frames and its draws."""
        frames, flip = (clip, shifted), bool(draws["flip"])
        views = [self.b.apply(frames[source], tuple(draws["box"][v].tolist()),
                              draws["jitter"][v].numpy() if "jitter" in draws else None, flip)
                 for v, source in enumerate(self.sources())]
        if self.s is not None:
            views[1] = self.s.apply(views[1], draws["src"])  # p = s(b(c2))
        if self.scales_flow:
            views[2] = scale_motion(views[2], farneback_flow(views[2]), draws["phi"])  # Eq. 3
        return torch.stack([normalise_(v) for v in views])  # (V, C, T, size, size)

    def __call__(self, clip: np.ndarray, shifted: np.ndarray | None, rng: np.random.Generator) -> Tensor:
        self.check(clip, shifted)
        return self.apply(clip, shifted, self.draw(*clip.shape[:3], rng))

    def apply_batch(self, frames: list[Tensor], draws: dict[str, Tensor], device: torch.device | str) -> Tensor:
        """The device path: `apply` on a batch on `device`: (B, V, C, T, size, size) from frames and collated draws."""
        boxes, flips = draws["box"].tolist(), draws["flip"].tolist()  # on the host: no device sync
        draws = {k: v.to(device, non_blocking=True) for k, v in draws.items() if k in ("jitter", "src", "phi")}
        frames = [f.to(device, non_blocking=True) for f in frames]
        views = torch.stack([torch.stack([resize_crop(f[source], tuple(boxes[i][v]), self.b.size, flips[i])
                                          for v, source in enumerate(self.sources())])
                             for i, f in enumerate(frames)])
        if "jitter" in draws:
            views = colour_jitter(views, draws["jitter"])  # (B, V, C, T, S, S)
        if self.s is not None:
            views[:, 1] = self.s.warp(views[:, 1], self.s.grids(draws["src"]))  # p = s(b(c2))
        if self.scales_flow:
            n = views[:, 2]
            views[:, 2] = scale_motion(n, farneback_torch(grey_levels(n), **FARNEBACK), draws["phi"])  # Eq. 3
        return normalise_(views)


class ClipTransform:
    """A normalised view (C, T, size, size) for fine-tuning and retrieval: train b (+ `flip`), test the 7/8 centre."""

    def __init__(self, size: int = 112, train: bool = True, flip: bool = True,
                 crop_scale: tuple[float, float] = (0.3, 1.0)):
        self.size, self.train, self.flip, self.b = size, train, flip, BasicAugment(size, crop_scale) if train else None

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


# ---- the device path: workers decode and draw, the GPU applies b, s, t to a batch --
def worker_init(worker_id: int) -> None:
    """DataLoader workers run one thread each: torch sets its own, OpenCV's must be set here."""
    cv2.setNumThreads(1)


class FramesAndDraws:
    """The device path's DataLoader transform: {"frames": uint8 (1 or 2, T, H, W, 3), "draws": triplet.draw(...)}."""

    def __init__(self, triplet: DSMTriplet):
        self.triplet = triplet

    def __call__(self, clip: np.ndarray, shifted: np.ndarray | None, rng: np.random.Generator) -> dict:
        self.triplet.check(clip, shifted)
        frames = np.stack([clip, shifted]) if self.triplet.uses_shift else clip[None]
        return {"frames": torch.from_numpy(frames), "draws": self.triplet.draw(*clip.shape[:3], rng)}


def collate_frames(batch: list[dict]) -> dict:
    """default_collate, except that the device path's frames stay a list: videos differ in size."""
    frames = [sample["views"].pop("frames") for sample in batch]
    out = torch.utils.data.default_collate(batch)
    out["views"]["frames"] = frames
    return out


# Farneback flow in torch, batched: Farneback (2003), "Two-frame motion estimation based on polynomial expansion",
# organised as cv::calcOpticalFlowFarneback (flags=0: box window), so the same FARNEBACK parameters give the same flow.
FARNEBACK_MIN_SIDE = 32  # OpenCV stops the pyramid before a level with a side below this
FARNEBACK_BORDER = (0.14, 0.14, 0.4472, 0.4472, 0.4472)  # OpenCV's weights of the 5 pixels nearest an edge


def farneback_scales(height: int, width: int, pyr_scale: float, levels: int) -> list[float]:
    """Scales of the pyramid levels, finest first: 1 and up to `levels` smaller ones with both sides >= 32 (OpenCV)."""
    scales = [1.0]
    while len(scales) <= levels and min(height, width) * scales[-1] * pyr_scale >= FARNEBACK_MIN_SIDE:
        scales.append(scales[-1] * pyr_scale)
    return scales


def pyramid_level(frames: Tensor, scale: float, height: int, width: int) -> Tensor:
    """(B, 1, H, W) -> (B, 1, h, w) of the full frames, blurred as cv2.GaussianBlur (reflect-101; sigma 0: 1 2 1 /4)."""
    sigma = (1 / scale - 1) / 2
    r = max(round(sigma * 5) | 1, 3) // 2
    taps = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-taps ** 2 / (2 * sigma ** 2)) if sigma > 0 else torch.tensor([0.25, 0.5, 0.25]).double()
    g = (g / g.sum()).to(frames)
    level = F.conv2d(F.pad(frames, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1))
    level = F.conv2d(F.pad(level, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))
    same = (height, width) == tuple(frames.shape[-2:])
    return level if same else F.interpolate(level, size=(height, width), mode="bilinear", align_corners=False)


def poly_expansion(frames: Tensor, n: int, sigma: float) -> Tensor:
    """(B, 1, H, W) -> (B, 5, H, W) least-squares quadratic p^T A p + b^T p + c per pixel under the Gaussian on
    [-n, n]: b_x, b_y, A_xx, A_yy, A_xy (full xy); separable: vertical, then horizontal (OpenCV's replicated border)."""
    sigma = sigma if sigma > 0 else 0.3 * n
    taps = torch.arange(-n, n + 1, dtype=torch.float64)
    g = torch.exp(-taps ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    y, x = torch.meshgrid(taps, taps, indexing="ij")
    basis = torch.stack([torch.ones_like(x), x, y, x * x, y * y, x * y])  # (6, 2n+1, 2n+1)
    solve = torch.linalg.inv(torch.einsum("iyx,jyx,y,x->ij", basis, basis, g, g))[1:]  # the constant is never used
    one, lin, quad = g, taps * g, taps ** 2 * g
    vertical = torch.stack([one, lin, quad]).view(3, 1, -1, 1).to(frames)
    rows = F.conv2d(F.pad(frames, (0, 0, n, n), mode="replicate"), vertical)  # (B, 3, H, W): 1, y, y^2
    horizontal = torch.zeros(6, 3, 1, 2 * n + 1, dtype=torch.float64)
    for out, (row, kernel) in enumerate([(0, one), (0, lin), (1, one), (0, quad), (2, one), (1, lin)]):
        horizontal[out, row, 0] = kernel  # 1, x, y, x^2, y^2, xy
    corr = F.conv2d(F.pad(rows, (n, n, 0, 0), mode="replicate"), horizontal.to(frames))  # (B, 6, H, W)
    return F.conv2d(corr, solve.to(frames)[:, :, None, None])  # (B, 5, H, W): the least-squares fit per pixel


def farneback_update(R0: Tensor, R1: Tensor, flow: Tensor, border: Tensor, xs: Tensor, ys: Tensor,
                     winsize: int) -> Tensor:
    """One iteration on the flow d (B, 2, H, W): per pixel G = A^T A and h = A^T Delta b, A the mean of the two fits,
    Delta b = (b0 - b1(p + d)) / 2 + A d (Farneback 2003, Eq. 7), then d = G^-1 h of their window means (box window,
    replicated border); xs, ys: (H, W) pixel coordinates."""
    _, _, H, W = R0.shape
    px, py = xs + flow[:, 0], ys + flow[:, 1]  # (B, H, W) where p lands in the second frame
    inside = ((px.floor() >= 0) & (px.floor() < W - 1) & (py.floor() >= 0) & (py.floor() < H - 1))[:, None]
    grid = torch.stack([2 * px / (W - 1) - 1, 2 * py / (H - 1) - 1], dim=-1)
    R1p = F.grid_sample(R1, grid, mode="bilinear", padding_mode="border", align_corners=True)
    R1p = torch.where(inside, R1p, torch.cat([torch.zeros_like(R0[:, :2]), R0[:, 2:]], dim=1))
    axx, ayy = (R0[:, 2] + R1p[:, 2]) / 2, (R0[:, 3] + R1p[:, 3]) / 2
    axy = (R0[:, 4] + R1p[:, 4]) / 4  # half the xy coefficient is the off-diagonal of A
    dbx = (R0[:, 0] - R1p[:, 0]) / 2 + axx * flow[:, 0] + axy * flow[:, 1]
    dby = (R0[:, 1] - R1p[:, 1]) / 2 + axy * flow[:, 0] + ayy * flow[:, 1]
    axx, ayy, axy, dbx, dby = (t * border for t in (axx, ayy, axy, dbx, dby))
    M = torch.stack([axx * axx + axy * axy, (axx + ayy) * axy, ayy * ayy + axy * axy,  # G: xx, xy, yy; h: x, y
                     axx * dbx + axy * dby, axy * dbx + ayy * dby], dim=1)
    r = winsize // 2
    M = F.avg_pool2d(F.pad(M, (0, 0, r, r), mode="replicate"), (winsize, 1), stride=1)
    M = F.avg_pool2d(F.pad(M, (r, r, 0, 0), mode="replicate"), (1, winsize), stride=1)
    gxx, gxy, gyy, hx, hy = M.unbind(1)
    det = gxx * gyy - gxy * gxy + 1e-3  # OpenCV's regulariser for flat windows
    return torch.stack([(gyy * hx - gxy * hy) / det, (gxx * hy - gxy * hx) / det], dim=1)


def farneback_torch(grey: Tensor, pyr_scale: float = 0.5, levels: int = 3, winsize: int = 15, iterations: int = 3,
                    poly_n: int = 5, poly_sigma: float = 1.2, flags: int = 0) -> Tensor:
    """(N, T, H, W) grey in [0, 255] -> (N, T-1, 2, H, W) flow as farneback_flow (Eq. 2), all pairs at once (a frame's
    fit serves both its pairs); flags=0 only. cuDNN's TF32 (default on Ampere+) is off: it moved the flow 0.17 px."""
    if flags != 0:
        raise ValueError(f"farneback_torch implements flags=0 only, got {flags}")
    N, T, H, W = grey.shape
    frames, flow, saved = grey.reshape(N * T, 1, H, W).float(), None, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        for scale in reversed(farneback_scales(H, W, pyr_scale, levels)):  # coarse to fine
            h, w = round(H * scale), round(W * scale)
            R = poly_expansion(pyramid_level(frames, scale, h, w), poly_n, poly_sigma).view(N, T, 5, h, w)
            R0, R1 = R[:, 1:].reshape(-1, 5, h, w), R[:, :-1].reshape(-1, 5, h, w)  # flow from frame t+1 into t
            flow = (torch.zeros(N * (T - 1), 2, h, w, device=grey.device) if flow is None
                    else F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False) / pyr_scale)
            ramps = [torch.ones(n, device=grey.device) for n in (h, w)]  # OpenCV's down-weighting near the edges
            for ramp in ramps:
                k = min(len(FARNEBACK_BORDER), len(ramp))
                edge = torch.tensor(FARNEBACK_BORDER[:k], device=grey.device)
                ramp[:k] *= edge
                ramp[len(ramp) - k:] *= edge.flip(0)
            border = ramps[0][:, None] * ramps[1][None, :]
            ys, xs = torch.meshgrid(torch.arange(h, device=grey.device, dtype=flow.dtype),
                                    torch.arange(w, device=grey.device, dtype=flow.dtype), indexing="ij")
            for _ in range(iterations):
                flow = farneback_update(R0, R1, flow, border, xs, ys, winsize)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    return flow.view(N, T - 1, 2, H, W)


def main() -> None:
    import data  # the picture shows the frames training decodes: data.py's, at its short side
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--show", nargs=2, metavar=("VIDEO", "OUT_PNG"), required=True, help="video file and PNG to write")
    add("--size", type=int, default=112, help="output side in pixels (default: 112)")
    add("--frames", type=int, default=8, help="frames per clip T (default: 8)")
    add("--stride", type=int, default=4, help="temporal stride between frames (default: 4)")
    add("--start", type=int, default=0, help="first frame of the anchor (default: 0)")
    add("--tau", type=int, default=10, help="temporal shift of the negative, Eq. 4 (default: 10)")
    add("--positive", choices=POSITIVES, default="tps", help="positive view (default: tps)")
    add("--negative", choices=NEGATIVES, default="disturb", help="negative view (default: disturb)")
    add("--flow-max", type=float, default=5.0, help="M: phi(t) ~ U[0, M] (Eq. 3; default: 5)")
    add("--seed", type=int, default=0, help="seed of the numpy Generator (default: 0)")
    args = parser.parse_args()
    video, out = args.show
    if args.frames < 2 or args.stride < 1 or args.tau < 0:
        parser.error("need --frames >= 2, --stride >= 1 and --tau >= 0")
    files = data.VideoFiles([data.VideoRecord(video, 0)], data.short_side_for(args.size))
    frames_from = lambda start: lambda n: data.temporal_indices(n, start, args.frames, args.stride)
    try:
        clip, shifted = files.read(0, frames_from(args.start)), files.read(0, frames_from(args.start + args.tau))
    except data.BadVideo as error:
        raise SystemExit(f"cannot show {video}: {error}")
    transform = DSMTriplet(args.size, args.positive, args.negative, args.flow_max)
    views = transform(clip, shifted, np.random.default_rng(args.seed))
    labels = ("a", "p", "n")[: len(views)]  # the PNG: one row per view, one column per frame
    mean, std = torch.tensor(MEAN).view(3, 1, 1, 1), torch.tensor(STD).view(3, 1, 1, 1)
    pixels = ((views * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)  # (V, C, T, S, S)
    V, _, T, S, _ = pixels.shape
    margin = 16  # room for the row label
    canvas = np.full((V * S, margin + T * S, 3), 255, np.uint8)
    canvas[:, margin:] = pixels.permute(0, 3, 2, 4, 1).reshape(V * S, T * S, 3).numpy()
    for row, label in enumerate(labels):
        cv2.putText(canvas, label, (3, row * S + S // 2 + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.imwrite(out, cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    print(f"wrote {out}: rows {labels}, {args.frames} frames of {video}")


if __name__ == "__main__":
    main()
