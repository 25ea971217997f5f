"""Where does the network look? Motion saliency heat-maps and response curves (paper, "Analysis", Figs. 5-6).

Fig. 5: 16-frame windows (--stride 1) slide by 4 over the uncropped frames; each clip's last feature map, averaged over
the channels and upsampled, is overlaid (a frame's heat: its windows' mean); its mean, min-max'ed over the video, is
the clip's "response value". Fig. 6 probes (--probe): static (one frame repeated), paste (a still patch of another
video), insert (another video's still frame blended in). On synthetic videos "DSM focuses on the moving area" becomes
a number: the heat's share in the object's box, next to chance; --eval averages it over the test split per checkpoint.

    python visualize.py --pretrained runs/pretrain/checkpoint.pth --probe static   # a synthetic test video
    python visualize.py --pretrained CKPT --arch i3d --size 224 --video v.avi --out vis
    python visualize.py --eval --pretrained none runs/moco/checkpoint.pth runs/pretrain/checkpoint.pth \\
        --names random moco dsm --clip-len 8 --stride 2
Writes OUT/NAME[_PROBE]_heat.mp4, _sheet.png, _response.csv and _response.png; with --eval OUT/eval.json and a table.
"""
import argparse
import json
import os
import pickle
from dataclasses import dataclass

import av
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure  # not pyplot: files only, and no figures kept alive
from tqdm import tqdm

import augment
import data
import models

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels, as data.SyntheticVideos.box


def energy(feature_map: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, T', h, w) -> (B, T, H, W): the paper's "average over all channels" (Fig. 5), upsampled trilinearly."""
    mean = feature_map.float().mean(dim=1, keepdim=True)
    return F.interpolate(mean, size=size, mode="trilinear", align_corners=False)[:, 0]


def minmax(x: np.ndarray) -> np.ndarray:
    """(x - min) / (max - min); a flat x has no contrast at all and maps to 0."""
    low, high = float(x.min()), float(x.max())
    return (x - low) / (high - low) if high > low else np.zeros_like(x)


@torch.no_grad()
def video_heat(backbone: torch.nn.Module, frames: np.ndarray, clip_len: int, stride: int, window_stride: int,
               device: torch.device | str, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Heat (L', H, W) in [0, 1] of the L' frames some window covers, the windows' responses, their starts."""
    span = (clip_len - 1) * stride + 1
    if len(frames) < span:
        raise ValueError(f"the video has {len(frames)} frames, fewer than one window of {span}")
    starts = list(range(0, len(frames) - span + 1, window_stride))
    L = starts[-1] + span
    video = augment.normalise_(torch.from_numpy(frames[:L]).permute(3, 0, 1, 2).float().div_(255))
    total, count, means = torch.zeros(L, *video.shape[2:]), torch.zeros(L, 1, 1), []
    for i in range(0, len(starts), batch_size):
        batch = starts[i:i + batch_size]
        clips = torch.stack([video[:, data.temporal_indices(L, s, clip_len, stride)] for s in batch])
        feature_map = backbone(clips.to(device)).float().cpu()
        means += feature_map.mean(dim=(1, 2, 3, 4)).tolist()
        for s, e in zip(batch, energy(feature_map, (span, *video.shape[2:]))):
            total[s:s + span] += e
            count[s:s + span] += 1
    return minmax((total / count).numpy()), minmax(np.array(means, dtype=np.float32)), starts


def box_mask(box: Box, height: int, width: int) -> np.ndarray:
    """bool (H, W): pixels whose centre lies in box; past an edge it continues on the opposite side."""
    x0, y0, x1, y1 = box
    inside_x = (np.arange(width) + 0.5 - x0) % width <= x1 - x0  # the modulo wraps, as the object does
    return ((np.arange(height) + 0.5 - y0) % height <= y1 - y0)[:, None] & inside_x[None, :]


def box_mass(heat: np.ndarray, boxes: list[Box]) -> float:
    """Share of the heat (T, H, W) inside boxes[t], mean over the frames with heat (uniform heat: chance; none: nan)."""
    masks = np.stack([box_mask(box, *heat.shape[1:]) for box in boxes])
    total, inside = (x.sum(axis=(1, 2), dtype=np.float64) for x in (heat, heat * masks))
    seen = total > 0
    return float((inside[seen] / total[seen]).mean()) if seen.any() else float("nan")


def probe_static(frames: np.ndarray, t: int) -> np.ndarray:
    """Frame t repeated for the whole video: the scene without any motion (Fig. 6's probes)."""
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
    """(1 - weight) frame + weight still on every frame (a still every k-th frame would add motion): static noise."""
    return ((1 - weight) * frames.astype(np.float32) + weight * still.astype(np.float32)).round().astype(np.uint8)


@dataclass
class Case:
    frames: np.ndarray                  # uint8 (L, H, W, 3), after the probe
    boxes: list[Box] | None = None      # the moving object's box in every frame (synthetic videos)
    patch: list[Box] | None = None      # the pasted still patch in every frame (paste probe)


def make_case(source: data.SyntheticVideos | data.VideoFiles, i: int, other: int, probe: str, weight: float,
              max_frames: int = 300) -> Case:
    """Video i with the probe; patch or still of video other's middle frame (paste: its object or a central square)."""
    frames = source.read(i, lambda n: list(range(min(n, max_frames))))
    L, H, W, _ = frames.shape
    synthetic = isinstance(source, data.SyntheticVideos)
    boxes = [source.box(i, t) for t in range(L)] if synthetic else None
    if probe == "static":  # the object stands still where it is in the middle frame
        return Case(probe_static(frames, L // 2), boxes and [boxes[L // 2]] * L)
    if probe == "none":
        return Case(frames, boxes)
    still = cv2.resize(source.read(other, lambda n: [n // 2])[0], (W, H), interpolation=cv2.INTER_AREA)  # files differ
    if probe == "insert":
        return Case(probe_insert(frames, still, weight), boxes)
    if synthetic:  # the other object, moved inside the frame if it wraps around an edge
        x0, y0, x1, y1 = source.box(other, source.num_frames // 2)
        w, h = round(x1 - x0), round(y1 - y0)
        left, top = min(max(round(x0), 0), W - w), min(max(round(y0), 0), H - h)
        patch = still[top:top + h, left:left + w]
    else:  # at the left edge, vertically centred, where actors seldom are
        w = h = min(H, W) // 3
        left, top = 0, (H - h) // 2
        patch = still[top:top + h, (W - w) // 2:(W - w) // 2 + w]
    return Case(probe_paste(frames, patch, top, left), boxes, [(left, top, left + w, top + h)] * L)


def overlay(frames: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """uint8 RGB (T, H, W, 3) frames blended with OpenCV's jet colours of heat (T, H, W) in [0, 1]."""
    grey = (np.clip(heat, 0, 1) * 255).round().astype(np.uint8)
    colours = cv2.applyColorMap(grey.reshape(-1, grey.shape[2]), cv2.COLORMAP_JET)  # it takes one 2-D image
    colours = colours.reshape(frames.shape)[..., ::-1]  # OpenCV's colours are BGR
    return ((1 - alpha) * frames.astype(np.float32) + alpha * colours).round().astype(np.uint8)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--pretrained", nargs="+", default=["none"],
        help="checkpoint(s), pretrain.py's checkpoint.pth or backbone.pth; none = random init (default: none)")
    add("--names", nargs="+", help="one name per checkpoint (default: 'random' for none, else its folder's name)")
    add("--arch", choices=models.ARCHS, default="mini", help="backbone (default: mini)")
    add("--video", help="video file (default: none = a synthetic test video)")
    add("--out", default="runs/visualize", help="output folder (default: runs/visualize)")
    add("--size", type=int, help="frames are decoded at short side 8/7 of it (default: 64 synthetic, else 224)")
    add("--clip-len", type=int, default=16, help="frames T per window (default: 16)")
    add("--stride", type=int, default=1, help="temporal stride within a window; 1 as in the paper (default: 1)")
    add("--window-stride", type=int, default=4, help="frames between window starts (default: 4)")
    add("--probe", choices=("none", "static", "paste", "insert"), default="none", help="Fig. 6 probe (default: none)")
    add("--index", type=int, default=0, help="synthetic test video to show (default: 0)")
    add("--other-index", type=int, help="synthetic video the patch / still comes from (default: index + 1)")
    add("--other-video", help="video file the patch / still comes from, needed with --video")
    add("--insert-weight", type=float, default=0.5, help="w of the insert blend, in [0, 1] (default: 0.5)")
    add("--eval", action="store_true", help="box mass over the synthetic test split, per checkpoint (default: off)")
    add("--num-test", type=int, default=80, help="synthetic test videos (default: 80)")
    add("--data-seed", type=int, default=0, help="seed of the synthetic videos (default: 0)")
    add("--max-frames", type=int, default=300, help="frames read per video (default: 300)")
    add("--batch-size", type=int, default=8, help="windows per forward pass (default: 8)")
    add("--fps", type=int, default=25, help="frame rate of the MP4 (default: 25)")
    add("--zoom", type=int, help="integer upscaling of the MP4 and sheet (default: 256 // short side, >= 1)")
    add("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    add("--seed", type=int, default=0, help="seed of a random-init network (default: 0)")
    args = parser.parse_args(argv)
    args.size = (224 if args.video else 64) if args.size is None else args.size
    args.names = args.names or ["random" if p == "none" else os.path.basename(os.path.dirname(os.path.abspath(p)))
                                or "ckpt" for p in args.pretrained]
    args.other_index = (args.index + 1) % args.num_test if args.other_index is None else args.other_index
    counts = ("size", "clip_len", "stride", "window_stride", "num_test", "batch_size", "max_frames", "fps", "zoom")
    small = [f"--{k.replace('_', '-')}" for k in counts if getattr(args, k) is not None and getattr(args, k) < 1]
    for bad, message in [  # every argument error before any work starts
            (small, f"{', '.join(small)} must be >= 1"),
            (not len(set(args.names)) == len(args.names) == len(args.pretrained),
             f"--names needs {len(args.pretrained)} distinct names, one per --pretrained; got {args.names}"),
            (args.video and args.eval, "--eval runs on the synthetic test split; leave out --video"),
            (args.video and args.probe in ("paste", "insert") and not args.other_video,
             f"--probe {args.probe} with --video needs --other-video"),
            (not {args.index, args.other_index} <= set(range(args.num_test)),
             f"--index and --other-index must be in [0, --num-test = {args.num_test})"),
            (not 0 <= args.insert_weight <= 1, f"--insert-weight must be in [0, 1], got {args.insert_weight}")]:
        if bad:
            parser.error(message)
    return args


def load_model(path: str, args: argparse.Namespace) -> torch.nn.Module:
    """The backbone of a checkpoint, or a random-init one for "none", in eval mode (BN statistics)."""
    if path == "none":
        torch.manual_seed(args.seed)
        return models.build_backbone(args.arch).to(args.device).eval()
    try:
        trained = models.load_checkpoint(path).get("args", {})  # pretrain.py's checkpoint.pth keeps its flags
        backbone = models.load_backbone(path, args.arch)
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise SystemExit(f"cannot load {path}: {str(error).splitlines()[0]}")
    differ = {k: v for k, v in trained.items() if k in ("clip_len", "stride", "size") and v != getattr(args, k)}
    if differ:  # allowed, but the net then sees clips unlike those it learned on
        print(f"note: {path} was trained with {differ}; this run uses {({k: getattr(args, k) for k in differ})}")
    return backbone.to(args.device).eval()


def write_outputs(base: str, frames: np.ndarray, shown: np.ndarray, starts: list[int], response: np.ndarray,
                  fps: int) -> None:
    """BASE_heat.mp4 (the overlay), _sheet.png (8 frames, input above, overlay below), _response.csv and .png."""
    H, W = shown.shape[1] // 2 * 2, shown.shape[2] // 2 * 2  # yuv420p: even sizes
    with av.open(base + "_heat.mp4", "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        for image in shown:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image[:H, :W]), "rgb24")))
        container.mux(stream.encode())
    picks = np.unique(np.linspace(0, len(frames) - 1, min(8, len(frames))).round().astype(int))
    row = np.hstack(frames[picks])
    canvas = np.vstack([np.full((14, row.shape[1], 3), 255, np.uint8), row, np.hstack(shown[picks])])  # 14: header
    for c, t in enumerate(picks):
        cv2.putText(canvas, f"t={t}", (c * frames.shape[2] + 3, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1,
                    cv2.LINE_AA)
    cv2.imwrite(base + "_sheet.png", canvas[..., ::-1])  # OpenCV writes BGR
    rows = [f"{k},{s},{r:.6f}" for k, (s, r) in enumerate(zip(starts, response))]
    with open(base + "_response.csv", "w") as f:
        f.write("\n".join(["window,start_frame,response", *rows]) + "\n")
    ax = Figure(figsize=(4.8, 2.4), dpi=100).subplots()
    ax.plot(starts, response, "o-", color="tab:red", markersize=3)
    ax.set(xlabel="window start frame", ylabel="response", ylim=(-0.05, 1.05), title="min-max over the video")
    ax.figure.tight_layout()
    ax.figure.savefig(base + "_response.png")


def show(name: str, backbone: torch.nn.Module, case: Case, args: argparse.Namespace) -> None:
    """Fig. 5 for one case: the heat, its mass in the object's (and a pasted patch's) box, then write_outputs."""
    heat, response, starts = video_heat(backbone, case.frames, args.clip_len, args.stride, args.window_stride,
                                        args.device, args.batch_size)
    L = len(heat)
    frames, shown = case.frames[:L], overlay(case.frames[:L], heat)
    prefix = name if args.probe == "none" else f"{name}_{args.probe}"
    print(f"{name}: {len(starts)} windows over {L} frames -> {args.out}/{prefix}_*")
    for boxes, colour, what in [(case.boxes, (255, 255, 255), "moving object's box"),
                                (case.patch, (255, 0, 255), "pasted still patch")]:
        if boxes is not None:
            for image, (x0, y0, x1, y1) in zip(shown, boxes):  # the box's border; unlike cv2.rectangle it wraps
                inner = (x0 + 1, y0 + 1, x1 - 1, y1 - 1)  # the pixels whose four neighbours are all inside
                image[box_mask((x0, y0, x1, y1), *image.shape[:2]) & ~box_mask(inner, *image.shape[:2])] = colour
            mass, chance = box_mass(heat, boxes[:L]), box_mass(np.ones_like(heat), boxes[:L])
            print(f"  heat mass in the {what} {mass:.3f} (chance {chance:.3f}, ratio {mass / chance:.2f})")
    k = args.zoom or max(1, 256 // min(frames.shape[1:3]))
    frames, shown = (x.repeat(k, axis=1).repeat(k, axis=2) for x in (frames, shown))  # nearest: stays sharp
    write_outputs(os.path.join(args.out, prefix), frames, shown, starts, response, args.fps)


def run_eval(backbones: dict[str, torch.nn.Module], source: data.SyntheticVideos, args: argparse.Namespace) -> None:
    """Box mass per checkpoint over the synthetic test split, as a table and OUT/eval.json; flat-heat videos skipped."""
    masses, chances = {name: [] for name in backbones}, []
    for i in tqdm(range(args.num_test), desc="eval"):
        case = make_case(source, i, (i + 1) % args.num_test, args.probe, args.insert_weight, args.max_frames)
        for name, backbone in backbones.items():
            heat = video_heat(backbone, case.frames, args.clip_len, args.stride, args.window_stride, args.device,
                              args.batch_size)[0]
            masses[name].append(box_mass(heat, case.boxes[:len(heat)]))
        chances.append(box_mass(np.ones_like(heat), case.boxes[:len(heat)]))
    chance, table = float(np.mean(chances)), {}
    print(f"\nheat mass inside the moving object's box, {args.num_test} synthetic test videos, "
          f"probe {args.probe}\n\n| checkpoint | box mass | chance | ratio |\n|---|---|---|---|")
    for name, values in masses.items():
        seen = [m for m in values if not np.isnan(m)]
        flat = [source.name(i) for i, m in enumerate(values) if np.isnan(m)]
        mass = float(np.mean(seen)) if seen else float("nan")
        table[name] = {"box_mass": mass, "chance": chance, "ratio": mass / chance, "videos": len(seen),
                       "skipped_flat_heat": flat}
        print(f"| {name}{f' ({len(flat)} flat videos skipped)' if flat else ''} | {mass:.3f} | {chance:.3f} | "
              f"{mass / chance:.2f} |")
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump({"args": vars(args), "results": table}, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    backbones = {name: load_model(path, args) for name, path in zip(args.names, args.pretrained)}
    short_side = data.short_side_for(args.size)
    if args.video:
        records = [data.VideoRecord(p, 0) for p in (args.video, args.other_video or args.video)]
        source, i, other = data.VideoFiles(records, short_side), 0, 1
    else:
        source = data.SyntheticVideos("test", args.num_test, args.data_seed, short_side=short_side)
        if args.eval:
            return run_eval(backbones, source, args)
        i, other = args.index, args.other_index
    try:
        case = make_case(source, i, other, args.probe, args.insert_weight, args.max_frames)
    except data.BadVideo as error:
        raise SystemExit(f"cannot read video: {error}")
    if len(case.frames) < (args.clip_len - 1) * args.stride + 1:
        raise SystemExit(f"{args.video or 'video'}: {len(case.frames)} frames, fewer than one window of "
                         f"--clip-len {args.clip_len} x --stride {args.stride}")
    for name, backbone in backbones.items():
        show(name, backbone, case, args)


if __name__ == "__main__":
    main()
