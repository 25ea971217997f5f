"""Where does the network look? Motion saliency heat-maps and response curves (paper, "Analysis",
Figs. 5-6), and on the synthetic videos a number for it.

Fig. 5: a window of T = 16 frames slides over the video with a stride of 4 frames, "generating
(L - 16)/4 clips". Each clip goes through the backbone f; the last 3D feature map before global
average pooling, (C, T', N, N), is averaged over the channels, upsampled to the clip's frames and
overlaid on the video as a heat-map. The mean of each clip's map, normalised over the video, is
its "response value", drawn as a curve over time.

Fig. 6 probes: `--probe static` (one frame repeated: no motion at all), `--probe paste` (a static
patch of another video pasted into every frame: a still distractor), `--probe insert` (a static
frame of another video blended into every frame as noise: the scene changes, the motion does not).

On the built-in synthetic videos the moving object's box is known, so the paper's claim ("DSM
focuses on the moving area") becomes a number: the share of the heat inside the box, next to the
box's share of the frame (chance). `--eval` averages it over the test split for several
checkpoints.

Our readings where the paper leaves a choice:
  * Windows: the paper's "(L - 16)/4 clips" means a window spans 16 consecutive frames, so
    `--stride` (frames within a window) defaults to 1. Window k starts at frame 4k; every window
    that fits in the video is used, (L - span) // 4 + 1 of them (one more than the paper's count,
    so the last frames are covered too). Frames after the last window (fewer than the window
    stride) are dropped.
  * Time: a window's map is upsampled (trilinear) to all `span` frames it covers, so a frame's
    heat is the mean over all windows covering it (each frame is seen by up to span / 4 windows).
  * Normalisation: min-max over the whole video (not per window), so windows and frames compare.
  * Input: the whole frame, decoded at short side 8/7 x `--size` as in training, normalised
    with augment.MEAN/STD, with no centre crop: the nets are fully convolutional, the pixel scale
    equals that of the test-time centre crop, and nothing of the frame (or the box) is cut off.
    The boxes of data.SyntheticVideos.box are in these very pixels.
  * insert: a blend frame' = (1 - w) frame + w still, w = `--insert-weight`, on every frame. A
    still frame swapped in every k-th frame would add abrupt changes, i.e. motion, which is not
    the "static noise" the paper means.

Run:
    python visualize.py                                   # synthetic test video 0, random init
    python visualize.py --pretrained runs/pretrain/checkpoint.pth --probe static
    python visualize.py --pretrained CKPT --arch i3d --size 224 --video v.avi --out vis
    python visualize.py --eval --pretrained none runs/moco/checkpoint.pth runs/dsm/checkpoint.pth \\
        --names random moco dsm --clip-len 8 --stride 2
Writes OUT/NAME[_PROBE]_heat.mp4 (overlay), _sheet.png (frames over overlays), _response.csv and
_response.png; with --eval OUT/eval.json and the table on stdout.
"""
import argparse
import csv
import json
import os
import pickle
from dataclasses import dataclass

import av
import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

import augment
import data
import models

PROBES = ("none", "static", "paste", "insert")
BOX_COLOUR = (255, 255, 255)    # the moving object's ground truth
PATCH_COLOUR = (255, 0, 255)    # the pasted still patch


# ---- heat-maps: pure functions ----------------------------------------------------------------

def energy(feature_map: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T', h, w) -> (B, T, H, W): the channel mean (the paper's "average over all channels"),
    upsampled trilinearly to `size` = (T, H, W). Not normalised."""
    assert feature_map.dim() == 5, f"expected (B, C, T', h, w), got {tuple(feature_map.shape)}"
    mean = feature_map.float().mean(dim=1, keepdim=True)  # (B, 1, T', h, w)
    return F.interpolate(mean, size=size, mode="trilinear", align_corners=False)[:, 0]


def minmax(x: np.ndarray) -> np.ndarray:
    """(x - min) / (max - min); a flat x has no contrast at all and maps to 0."""
    low, high = float(x.min()), float(x.max())
    return (x - low) / (high - low) if high > low else np.zeros_like(x)


def heatmap(feature_map: torch.Tensor, size: tuple[int, int, int]) -> np.ndarray:
    """One clip's (1, C, T', h, w) feature map -> float32 (T, H, W) heat in [0, 1]."""
    assert feature_map.shape[0] == 1, "one clip at a time; video_heat batches windows"
    return minmax(energy(feature_map, size)[0].numpy())


def box_mask(box: tuple[float, float, float, float], height: int, width: int) -> np.ndarray:
    """bool (H, W): pixels whose centre lies in box (x0, y0, x1, y1). As in SyntheticVideos.box, a
    box reaching past an edge continues on the opposite side."""
    x0, y0, x1, y1 = box
    assert x1 - x0 <= width and y1 - y0 <= height, (box, height, width)
    inside_x = (np.arange(width) + 0.5 - x0) % width <= x1 - x0  # (W,) toroidal offset from x0
    inside_y = (np.arange(height) + 0.5 - y0) % height <= y1 - y0  # (H,)
    return inside_y[:, None] & inside_x[None, :]


def box_mass(heat: np.ndarray, boxes: list[tuple[float, float, float, float]]) -> float:
    """Share of the heat (T, H, W) inside boxes[t], averaged over the frames.

    1.0: all heat on the boxes; a uniform heat gives the boxes' share of the frame (chance).
    Frames with no heat at all have no share and are left out; nan when no frame has heat.
    """
    T, H, W = heat.shape
    assert len(boxes) == T, f"{len(boxes)} boxes for {T} frames"
    masks = np.stack([box_mask(box, H, W) for box in boxes])  # (T, H, W)
    total = heat.sum(axis=(1, 2), dtype=np.float64)  # (T,)
    inside = (heat * masks).sum(axis=(1, 2), dtype=np.float64)
    seen = total > 0
    return float((inside[seen] / total[seen]).mean()) if seen.any() else float("nan")


def jet(x: np.ndarray) -> np.ndarray:
    """[0, 1] -> uint8 RGB (..., 3) on the jet ramp: blue, cyan, yellow, red."""
    x = np.clip(x, 0, 1)[..., None]
    centres = np.array([3.0, 2.0, 1.0])  # where red, green and blue peak, in quarters of the ramp
    return (np.clip(1.5 - np.abs(4 * x - centres), 0, 1) * 255).round().astype(np.uint8)


def overlay(frames: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 (T, H, W, 3) frames blended with the jet colours of heat (T, H, W) in [0, 1]."""
    assert frames.shape[:3] == heat.shape and frames.dtype == np.uint8, (frames.shape, heat.shape)
    mixed = (1 - alpha) * frames.astype(np.float32) + alpha * jet(heat).astype(np.float32)
    return mixed.round().astype(np.uint8)


# ---- the sliding window (Fig. 5) --------------------------------------------------------------

def window_starts(num_frames: int, span: int, window_stride: int) -> list[int]:
    """First frames of the windows that fit in the video: 0, s, 2s, ... (paper: "(L - 16)/4 clips")."""
    if num_frames < span:
        raise ValueError(f"the video has {num_frames} frames, fewer than one window of {span}")
    return list(range(0, num_frames - span + 1, window_stride))


def frames_to_normalised_tensor(frames: np.ndarray) -> torch.Tensor:
    """uint8 (L, H, W, 3) -> float (3, L, H, W) normalised as in training (augment.MEAN/STD)."""
    return augment.normalise_(torch.from_numpy(frames).permute(3, 0, 1, 2).float().div_(255))


@torch.no_grad()
def video_heat(backbone: nn.Module, frames: np.ndarray, clip_len: int, stride: int, window_stride: int,
               device: torch.device, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Heat of every covered frame, float32 (L', H, W) in [0, 1] (L' <= L, the frames some window
    covers), the response of every window in [0, 1], and the windows' first frames."""
    span = (clip_len - 1) * stride + 1
    starts = window_starts(len(frames), span, window_stride)
    L = starts[-1] + span
    video = frames_to_normalised_tensor(frames[:L])  # (3, L, H, W)
    _, _, H, W = video.shape
    total, count = torch.zeros(L, H, W), torch.zeros(L, 1, 1)
    means = []
    for i in range(0, len(starts), batch_size):
        batch = starts[i:i + batch_size]
        clips = torch.stack([video[:, data.temporal_indices(L, s, clip_len, stride)] for s in batch])
        feature_map = backbone(clips.to(device)).float().cpu()  # (B, C, T', h, w), clips (B, 3, T, H, W)
        means += feature_map.mean(dim=(1, 2, 3, 4)).tolist()  # the response before normalisation
        for s, e in zip(batch, energy(feature_map, (span, H, W))):  # e: (span, H, W)
            total[s:s + span] += e
            count[s:s + span] += 1
    assert bool((count > 0).all()), "every frame up to the last window's end is covered"
    heat = minmax((total / count).numpy())  # per-video min-max: frames and windows compare
    return heat, minmax(np.array(means, dtype=np.float32)), starts


# ---- probes (Fig. 6) ----------------------------------------------------------------------------

def probe_static(frames: np.ndarray, t: int) -> np.ndarray:
    """Frame t repeated for the whole video: the scene without any motion."""
    return np.repeat(frames[t:t + 1], len(frames), axis=0)


def probe_paste(frames: np.ndarray, patch: np.ndarray, top: int, left: int) -> np.ndarray:
    """The still patch (h, w, 3) pasted at (top, left) into every frame: a distractor that never moves."""
    h, w, _ = patch.shape
    if top < 0 or left < 0 or top + h > frames.shape[1] or left + w > frames.shape[2]:
        raise ValueError(f"a {h}x{w} patch at ({top}, {left}) does not fit in {frames.shape[1:3]} frames")
    out = frames.copy()
    out[:, top:top + h, left:left + w] = patch
    return out


def probe_insert(frames: np.ndarray, still: np.ndarray, weight: float) -> np.ndarray:
    """(1 - weight) frame + weight still on every frame: static noise over the whole video."""
    if still.shape != frames.shape[1:] or not 0 <= weight <= 1:
        raise ValueError(f"need a still frame of shape {frames.shape[1:]} and 0 <= weight <= 1, "
                         f"got {still.shape} and {weight}")
    mixed = (1 - weight) * frames.astype(np.float32) + weight * still.astype(np.float32)
    return mixed.round().astype(np.uint8)


# ---- inputs: a synthetic test video or a file, with its probe --------------------------------

@dataclass
class Case:
    frames: np.ndarray                       # uint8 (L, H, W, 3), after the probe
    boxes: list | None = None                # the moving object's box in every frame (synthetic)
    patch_box: tuple | None = None           # where the still patch sits (paste probe)


def synthetic_case(source: data.SyntheticVideos, i: int, probe: str, other: int, weight: float) -> Case:
    """Test video i, its object's boxes, and the probe; other = the video patches and stills come from."""
    L, side = source.num_frames, source.short_side
    frames = source.render(i, range(L))
    boxes = [source.box(i, t) for t in range(L)]
    if probe == "static":  # the object stands still where it is in the middle frame
        return Case(probe_static(frames, L // 2), [boxes[L // 2]] * L)
    if probe == "none":
        return Case(frames, boxes)
    still = source.render(other, [L // 2])[0]  # (H, W, 3)
    if probe == "insert":
        return Case(probe_insert(frames, still, weight), boxes)
    x0, y0, x1, y1 = source.box(other, L // 2)  # the other object, moved inside the frame if it wraps
    w, h = round(x1 - x0), round(y1 - y0)
    left, top = min(max(round(x0), 0), side - w), min(max(round(y0), 0), side - h)
    patch = still[top:top + h, left:left + w]
    return Case(probe_paste(frames, patch, top, left), boxes, (left, top, left + w, top + h))


def read_video(path: str, short_side: int, choose) -> np.ndarray:
    """Frames choose(num_frames) of a video file at `short_side`, or a clear error naming the file."""
    source = data.VideoFiles([data.VideoRecord(path, 0)], short_side)
    try:
        return source.read(0, choose)
    except data.BadVideo as error:
        raise SystemExit(f"cannot read video: {error}")


def file_case(path: str, short_side: int, max_frames: int, probe: str, other_path: str | None,
              weight: float) -> Case:
    """A video file and its probe. paste: the central square (a third of the short side) of the other
    video's middle frame, pasted at the left edge, vertically centred, where actors seldom are."""
    frames = read_video(path, short_side, lambda n: list(range(min(n, max_frames))))
    L, H, W, _ = frames.shape
    if probe == "static":
        return Case(probe_static(frames, L // 2))
    if probe == "none":
        return Case(frames)
    still = read_video(other_path, short_side, lambda n: [n // 2])[0]
    still = cv2.resize(still, (W, H), interpolation=cv2.INTER_AREA)  # (H, W, 3)
    if probe == "insert":
        return Case(probe_insert(frames, still, weight))
    s = min(H, W) // 3
    patch = still[(H - s) // 2:(H - s) // 2 + s, (W - s) // 2:(W - s) // 2 + s]
    return Case(probe_paste(frames, patch, (H - s) // 2, 0), patch_box=(0, (H - s) // 2, s, (H - s) // 2 + s))


# ---- outputs -----------------------------------------------------------------------------------

def outline(frames: np.ndarray, boxes: list, colour: tuple[int, int, int]) -> np.ndarray:
    """Draw each frame's box border (wrapping like the box) onto uint8 (T, H, W, 3) frames."""
    out = frames.copy()
    for frame, box in zip(out, boxes):
        mask = box_mask(box, *frame.shape[:2])
        interior = mask.copy()
        for axis in (0, 1):  # np.roll wraps, as the boxes do
            interior &= np.roll(mask, 1, axis) & np.roll(mask, -1, axis)
        frame[mask & ~interior] = colour
    return out


def zoom(frames: np.ndarray, k: int) -> np.ndarray:
    """Nearest-neighbour upscaling by an integer k: small frames stay sharp."""
    return frames.repeat(k, axis=-3).repeat(k, axis=-2)


def write_mp4(path: str, frames: np.ndarray, fps: int) -> None:
    """H.264 (MPEG-4 part 2 where FFmpeg lacks libx264), yuv420p; an odd last row/column is dropped."""
    H, W = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2  # yuv420p needs even sizes
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:H, :W]), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def write_sheet(path: str, frames: np.ndarray, shown: np.ndarray, columns: int = 8) -> None:
    """PNG contact sheet: `columns` frames spread over the video, input above, heat-map below."""
    picks = np.unique(np.linspace(0, len(frames) - 1, min(columns, len(frames))).round().astype(int))
    _, H, W, _ = frames.shape
    header = 14
    canvas = np.full((header + 2 * H, len(picks) * W, 3), 255, np.uint8)
    for c, t in enumerate(picks):
        canvas[header:header + H, c * W:(c + 1) * W] = frames[t]
        canvas[header + H:, c * W:(c + 1) * W] = shown[t]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for c, t in enumerate(picks):
        draw.text((c * W + 3, 1), f"t={t}", fill=(0, 0, 0))
    image.save(path)


def write_response(csv_path: str, png_path: str, starts: list[int], response: np.ndarray) -> None:
    """CSV (window, start_frame, response) and a line plot of the response over the start frames."""
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["window", "start_frame", "response"])
        writer.writerows((k, s, f"{r:.6f}") for k, (s, r) in enumerate(zip(starts, response)))
    plot_curve(png_path, starts, response)


def plot_curve(path: str, xs: list[int], ys: np.ndarray, width: int = 480, height: int = 240) -> None:
    """Line plot of ys in [0, 1] over xs with labelled axes, in Pillow alone."""
    left, right, top, bottom = 44, 16, 20, 36
    span = max(xs[-1] - xs[0], 1)
    px = lambda x: left + (x - xs[0]) / span * (width - left - right)
    py = lambda y: top + (1 - float(y)) * (height - top - bottom)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.line([(left, top), (left, py(0)), (width - right, py(0))], fill="black")
    for y in (0.0, 0.5, 1.0):
        draw.line([(left - 4, py(y)), (left, py(y))], fill="black")
        draw.text((left - 28, py(y) - 6), f"{y:.1f}", fill="black")
    for x in sorted({xs[0], xs[len(xs) // 2], xs[-1]}):
        draw.line([(px(x), py(0)), (px(x), py(0) + 4)], fill="black")
        draw.text((px(x) - 6, py(0) + 6), str(x), fill="black")
    points = [(px(x), py(y)) for x, y in zip(xs, ys)]
    if len(points) > 1:
        draw.line(points, fill=(200, 30, 30), width=2)
    for x, y in points:
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(200, 30, 30))
    draw.text((width // 2 - 50, height - 16), "window start frame", fill="black")
    draw.text((4, 4), "response (min-max over the video)", fill="black")
    image.save(path)


# ---- command line --------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", nargs="+", default=["none"],
                        help="checkpoint(s) (pretrain.py's checkpoint.pth or backbone.pth); none = random init "
                             "(default: none)")
    parser.add_argument("--names", nargs="+", default=None,
                        help="one name per checkpoint for files and the table (default: 'random' for none, "
                             "else the checkpoint's folder name)")
    parser.add_argument("--arch", choices=models.ARCHS, default="mini", help="backbone (default: mini)")
    parser.add_argument("--video", default=None, help="video file (default: none = a synthetic test video)")
    parser.add_argument("--out", default="runs/visualize", help="output folder (default: runs/visualize)")
    parser.add_argument("--size", type=int, default=None,
                        help="frames are decoded at short side 8/7 of it (default: 64 on synthetic, else 224)")
    parser.add_argument("--clip-len", type=int, default=16, help="frames T per window (default: 16)")
    parser.add_argument("--stride", type=int, default=1,
                        help="temporal stride of the frames within a window; the paper's windows are "
                             "consecutive frames (default: 1)")
    parser.add_argument("--window-stride", type=int, default=4, help="frames between window starts (default: 4)")
    parser.add_argument("--probe", choices=PROBES, default="none", help="Fig. 6 input probe (default: none)")
    parser.add_argument("--other-index", type=int, default=None,
                        help="synthetic test video the paste patch / insert still comes from (default: index + 1)")
    parser.add_argument("--other-video", default=None, help="video file the paste patch / insert still comes "
                        "from, needed with --video (default: none)")
    parser.add_argument("--insert-weight", type=float, default=0.5, help="w of the insert blend (default: 0.5)")
    parser.add_argument("--index", type=int, default=0, help="synthetic test video to show (default: 0)")
    parser.add_argument("--eval", action="store_true",
                        help="box mass averaged over the synthetic test split, a table per checkpoint (default: off)")
    parser.add_argument("--num-test", type=int, default=80, help="synthetic test videos (default: 80)")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic videos (default: 0)")
    parser.add_argument("--max-frames", type=int, default=300, help="frames read from --video (default: 300)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    parser.add_argument("--fps", type=int, default=25, help="frame rate of the MP4 (default: 25)")
    parser.add_argument("--zoom", type=int, default=None,
                        help="integer upscaling of the MP4 and sheet (default: 256 // short side, at least 1)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a random-init network (default: 0)")
    return check_args(parser, parser.parse_args(argv))


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """Every argument error before any work starts."""
    args.size = (224 if args.video else 64) if args.size is None else args.size
    args.names = args.names or [default_name(p) for p in args.pretrained]
    if min(args.size, args.clip_len, args.stride, args.window_stride, args.num_test, args.batch_size,
           args.max_frames, args.fps) < 1 or (args.zoom is not None and args.zoom < 1):
        parser.error("--size, --clip-len, --stride, --window-stride, --num-test, --batch-size, --max-frames, "
                     "--fps and --zoom must be >= 1")
    args.other_index = (args.index + 1) % args.num_test if args.other_index is None else args.other_index
    if len(args.names) != len(args.pretrained) or len(set(args.names)) != len(args.names):
        parser.error(f"--names needs {len(args.pretrained)} distinct names, one per --pretrained; got {args.names}")
    missing = [p for p in args.pretrained if p != "none" and not os.path.isfile(p)]
    if missing:
        parser.error(f"no such checkpoint: {', '.join(missing)}")
    if args.video is not None and not os.path.isfile(args.video):
        parser.error(f"no such video: {args.video}")
    if args.video and args.eval:
        parser.error("--eval runs on the synthetic test split; leave out --video")
    if args.video and args.probe in ("paste", "insert") and not (args.other_video and os.path.isfile(args.other_video)):
        parser.error(f"--probe {args.probe} with --video needs --other-video, an existing file")
    if not (0 <= args.index < args.num_test and 0 <= args.other_index < args.num_test):
        parser.error(f"--index and --other-index must be in [0, --num-test = {args.num_test})")
    if not 0 <= args.insert_weight <= 1:
        parser.error(f"--insert-weight must be in [0, 1], got {args.insert_weight}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    return args


def default_name(path: str) -> str:
    return "random" if path == "none" else os.path.basename(os.path.dirname(os.path.abspath(path))) or "ckpt"


def load_model(path: str, args: argparse.Namespace) -> nn.Module:
    """The backbone of a checkpoint, or a random-init one for "none", in eval mode (BN statistics)."""
    if path == "none":
        torch.manual_seed(args.seed)
        backbone = models.build_backbone(args.arch)
    else:
        try:
            checkpoint = models.load_checkpoint(path)
            backbone = models.load_backbone(path, args.arch)
        except (ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
            raise SystemExit(f"cannot load {path}: {str(error).splitlines()[0]}")
        trained = checkpoint.get("args", {})  # pretrain.py's checkpoint.pth keeps its flags
        ours = {"clip_len": args.clip_len, "stride": args.stride, "size": args.size}
        differ = {k: trained[k] for k in ours if k in trained and trained[k] != ours[k]}
        if differ:
            print(f"note: {path} was trained with {differ}; this run uses {ours}")
    return backbone.to(args.device).eval()


def show(backbone: nn.Module, case: Case, prefix: str, args: argparse.Namespace) -> dict:
    """Heat-map video, contact sheet and response curve of one case; the box masses if boxes are known."""
    heat, response, starts = video_heat(backbone, case.frames, args.clip_len, args.stride, args.window_stride,
                                        torch.device(args.device), args.batch_size)
    frames = case.frames[:len(heat)]
    shown = overlay(frames, heat)
    result = {"windows": len(starts), "frames": len(heat)}
    if case.boxes is not None:
        boxes = case.boxes[:len(heat)]
        shown = outline(shown, boxes, BOX_COLOUR)
        result.update(box_mass=box_mass(heat, boxes), chance=box_mass(np.ones_like(heat), boxes))
    if case.patch_box is not None:
        patch = [case.patch_box] * len(heat)
        shown = outline(shown, patch, PATCH_COLOUR)
        result.update(patch_mass=box_mass(heat, patch), patch_chance=box_mass(np.ones_like(heat), patch))
    k = args.zoom or max(1, 256 // min(frames.shape[1:3]))
    base = os.path.join(args.out, prefix)
    write_mp4(base + "_heat.mp4", zoom(shown, k), args.fps)
    write_sheet(base + "_sheet.png", zoom(frames, k), zoom(shown, k))
    write_response(base + "_response.csv", base + "_response.png", starts, response)
    return result


def run_eval(backbones: dict[str, nn.Module], args: argparse.Namespace) -> dict:
    """Box mass over the synthetic test split per checkpoint: the Figs. 5-6 claim as a number.

    A video whose heat is flat (no contrast at all) has no box mass: it is skipped, named, counted.
    ratio = mean box mass / mean chance.
    """
    source = data.SyntheticVideos("test", args.num_test, args.data_seed, short_side=data.short_side_for(args.size))
    masses, flat, chances = {name: [] for name in backbones}, {name: [] for name in backbones}, []
    for i in tqdm(range(args.num_test), desc="eval"):
        case = synthetic_case(source, i, args.probe, (i + 1) % args.num_test, args.insert_weight)
        for name, backbone in backbones.items():
            heat, _, _ = video_heat(backbone, case.frames, args.clip_len, args.stride, args.window_stride,
                                    torch.device(args.device), args.batch_size)
            mass = box_mass(heat, case.boxes[:len(heat)])
            if np.isnan(mass):
                flat[name].append(source.name(i))
            else:
                masses[name].append(mass)
        chances.append(box_mass(np.ones_like(heat), case.boxes[:len(heat)]))  # uniform heat: chance
    chance = float(np.mean(chances))
    table = {}
    for name in backbones:
        mass = float(np.mean(masses[name])) if masses[name] else float("nan")
        table[name] = {"box_mass": mass, "chance": chance, "ratio": mass / chance, "videos": len(masses[name]),
                       "skipped_flat_heat": flat[name]}
    return table


def print_table(table: dict, args: argparse.Namespace) -> None:
    print(f"\nheat mass inside the moving object's box, {args.num_test} synthetic test videos, "
          f"probe {args.probe}\n\n| checkpoint | box mass | chance | ratio |\n|---|---|---|---|")
    for name, row in table.items():
        skipped = f" ({len(row['skipped_flat_heat'])} flat videos skipped)" if row["skipped_flat_heat"] else ""
        print(f"| {name}{skipped} | {row['box_mass']:.3f} | {row['chance']:.3f} | {row['ratio']:.2f} |")


def print_result(name: str, prefix: str, result: dict, args: argparse.Namespace) -> None:
    print(f"{name}: {result['windows']} windows over {result['frames']} frames -> {args.out}/{prefix}_*")
    if "box_mass" in result:
        print(f"  heat mass in the moving object's box {result['box_mass']:.3f} "
              f"(chance {result['chance']:.3f}, ratio {result['box_mass'] / result['chance']:.2f})")
    if "patch_mass" in result:
        print(f"  heat mass in the pasted still patch {result['patch_mass']:.3f} (chance {result['patch_chance']:.3f})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    backbones = {name: load_model(path, args) for name, path in zip(args.names, args.pretrained)}
    if args.eval:
        table = run_eval(backbones, args)
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump({"args": vars(args), "results": table}, f, indent=2)
        print_table(table, args)
        return
    if args.video:
        case = file_case(args.video, data.short_side_for(args.size), args.max_frames, args.probe,
                         args.other_video, args.insert_weight)
        span = (args.clip_len - 1) * args.stride + 1
        if len(case.frames) < span:
            raise SystemExit(f"{args.video}: {len(case.frames)} frames, fewer than one window of {span} "
                             f"(--clip-len {args.clip_len}, --stride {args.stride})")
    else:
        source = data.SyntheticVideos("test", args.num_test, args.data_seed, short_side=data.short_side_for(args.size))
        case = synthetic_case(source, args.index, args.probe, args.other_index, args.insert_weight)
    for name, backbone in backbones.items():
        prefix = name if args.probe == "none" else f"{name}_{args.probe}"
        print_result(name, prefix, show(backbone, case, prefix, args), args)


if __name__ == "__main__":
    main()
