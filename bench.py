"""Speed and memory of the hot paths as ratios against their references, and the synthetic results.

Each ratio is timed side by side in one run, so it holds on a noisy shared machine where absolute
times do not. `python bench.py WHICH --help` shows the flags of WHICH.

    python bench.py augment     # TPS warp, flow-scaled negative, a triplet from a file, each against its reference
    python bench.py data        # the paper's data path per core, stage by stage; seek vs sequential; raw vs prepared
    python bench.py flow        # torch Farneback against OpenCV's: end-point error and CPU time
    python bench.py model       # forward+backward per clip and GFLOP/s of every arch, against torchvision r3d_18
    python bench.py train       # a DSM step against the same net built from torchvision's parts
    python bench.py retrieval   # blocked top-k against one matmul, and its memory
    python bench.py results     # the README's synthetic results table and its figure (every stage, hours)
    python bench.py gpu         # the CUDA paths on this machine's GPU, one table (about 5 minutes)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import av
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.video.resnet import BasicBlock, Conv3DSimple, VideoResNet, r3d_18

import augment
import data
import models
import pretrain
import retrieve

BENCHES: dict[str, Callable[[argparse.Namespace], None]] = {}  # name -> bench, filled section by section
OWN_FLAGS: set[str] = set()  # benches that parse their own flags, --help included, from args.rest
CPU = time.process_time  # every thread of the process (FFmpeg decodes with several), no neighbour's load
PAPER_CLIPS = dict(clip_len=16, stride=4, shift=(2, 20))  # 16 x 4 frames, and the same tau ~ U[2, 20] later


# ---- shared: clocks, the ratio lines, generated videos ----------------------
def _seconds(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> tuple[float, object]:
    t0 = clock()
    out = fn()
    return clock() - t0, out


def side_by_side(fn: Callable[[], object], reference: Callable[[], object], repeat: int,
                 clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """Medians of 2 x repeat + 1 timings of fn and of reference in alternation, so that a burst of load
    hits both alike, after an untimed call of each (first calls fill caches)."""
    fn(), reference()
    pairs = [(_seconds(fn, clock)[0], _seconds(reference, clock)[0]) for _ in range(2 * repeat + 1)]
    return float(np.median([a for a, _ in pairs])), float(np.median([b for _, b in pairs]))


def print_ratios(rows: list[tuple[str, str, float, float, str | None]]) -> None:
    """A line per (what, reference, seconds, reference's seconds, target): "<= 1.2" caps the ratio, ">= 3" floors it."""
    for what, reference, t, t_ref, target in rows:
        op, bound = (target or "<= inf").split()
        met = t / t_ref <= float(bound) if op == "<=" else t / t_ref >= float(bound)
        print(f"{what:44s} {t * 1e3:9.2f} ms | {reference:34s} {t_ref * 1e3:9.2f} ms | {t / t_ref:5.2f}x"
              + (f" (target {target}: {'ok' if met else 'MISSED'})" if target else ""))


def _one_thread() -> None:
    """One torch and one OpenCV thread, as torch gives each DataLoader worker: with two threads on a busy
    small machine every op waits on a descheduled thread (~4-16 ms)."""
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def _texture(shape: tuple[int, ...], sigma: float, seed: int = 0) -> np.ndarray:
    """uint8 smooth random texture (blurred noise stretched to 0-255): content every flow can follow."""
    texture = cv2.GaussianBlur(np.random.default_rng(seed).random(shape).astype(np.float32), (0, 0), sigma)
    return ((texture - texture.min()) / (texture.max() - texture.min()) * 255).astype(np.uint8)


def _moving_video(path: str, frames: int = 100, height: int = 240, width: int = 320, codec: str = "mpeg4",
                  keyint: int | None = None) -> None:
    """Write a video of a smooth texture panning right with a bright square crossing it, with a
    keyframe every `keyint` frames (None: the encoder's default, 250 for x264), since where a seek
    can land decides what it saves."""
    texture = _texture((height, width + 2 * frames, 3), 4.0)
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if keyint is not None:
            stream.codec_context.gop_size = keyint  # x264's keyint ("keyint" in stream.options is ignored)
        for t in range(frames):
            frame = np.ascontiguousarray(texture[:, 2 * frames - 2 * t: 2 * frames - 2 * t + width])
            frame[100:140, 3 * t % width: 3 * t % width + 40] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _record(path: str) -> dict:
    """A run's figures: the last line of its log.jsonl (the final epoch), or its results.json."""
    with open(path) as f:
        return json.loads(f.read().strip().splitlines()[-1]) if path.endswith(".jsonl") else json.load(f)


def triplet_stages(path: str, size: int, samples: int) -> dict[str, float]:
    """CPU seconds of one DSM triplet from the video `path` at crop `size`, medians over `samples` draws:
    each stage (decoded by data.VideoFiles), the whole CPU path, the device path's worker share (decode,
    draws, frames into shared memory), and decoding the same frames as data.py does (seeking) and from
    frame 0 on, the file opened untimed for both so that only the decoding differs."""
    triplet, files = augment.DSMTriplet(size), data.VideoFiles([data.VideoRecord(path, 0)], data.short_side_for(size))
    runs = []
    for seed in range(samples):
        rng, t = np.random.default_rng(seed), {}
        draw_frames = lambda num_frames, rng=rng: data.train_indices(num_frames, **PAPER_CLIPS, rng=rng)
        t["decode"], frames = _seconds(lambda: files.read(0, draw_frames), CPU)
        clip, shifted = frames[:16], frames[16:]
        draws = triplet.draw(16, *clip.shape[1:3], rng)
        flip, boxes, jitter = bool(draws["flip"]), draws["box"].tolist(), draws["jitter"].numpy()
        t["b"], (_, p, n) = _seconds(lambda: [triplet.b.apply(f, tuple(box), j, flip)
                                              for f, box, j in zip((clip, clip, shifted), boxes, jitter)], CPU)
        t["s"], _ = _seconds(lambda: triplet.s.apply(p, draws["src"]), CPU)
        t["Farneback"], flow = _seconds(lambda: augment.farneback_flow(n), CPU)
        t["flow scaling"], _ = _seconds(lambda: augment.scale_motion(n, flow, draws["phi"]), CPU)
        t["total"] = t["decode"] + _seconds(lambda: triplet.apply(clip, shifted, draws), CPU)[0]
        to_device = augment.FramesAndDraws(triplet)
        t["worker"] = t["decode"] + _seconds(
            lambda: to_device(clip, shifted, np.random.default_rng(seed))["frames"].share_memory_(), CPU)[0]
        for seek in (True, False):
            with av.open(path) as container:
                stream = container.streams.video[0]
                stream.thread_type = "AUTO"  # as data.VideoFiles decodes
                wanted = sorted(set(draw_frames(stream.frames, np.random.default_rng(seed))))  # the same draw
                where = (container, stream, wanted, stream.frames, data.short_side_for(size))
                decode = lambda: data._decode(*where) if seek else data._scan(*where, seeked=False)
                t["seek" if seek else "from frame 0"] = _seconds(decode, CPU)[0]
        runs.append(t)
    return {k: float(np.median([t[k] for t in runs])) for k in runs[0]}


# ---- augment ---------------------------------------------------------------
def bench_augment(args: argparse.Namespace) -> None:
    """TPS warp against a bare grid_sample with a ready grid and the flow-scaled negative against the raw
    Farneback calls it makes (wall time in alternation), then one triplet from a 320x240 MPEG-4 file
    against decoding its frames, alone and with their flow (triplet_stages); one thread, as in a worker."""
    _one_thread()
    rng = np.random.default_rng(0)
    clip, warp = torch.rand(3, 16, 112, 112), augment.TPSWarp(112, 112)  # (C, T, H, W)
    grid = warp.grid(warp.sample_src(rng))[None]
    bare = lambda: F.grid_sample(clip.reshape(1, 48, 112, 112), grid, padding_mode="border", align_corners=False)
    with tempfile.TemporaryDirectory() as tmp:
        video = os.path.join(tmp, "moving.mp4")
        _moving_video(video)
        frames = data.VideoFiles([data.VideoRecord(video, 0)], 128).read(0, lambda num_frames: list(range(0, 64, 4)))
        m = triplet_stages(video, 112, args.repeat)
    view = augment.BasicAugment(112, jitter=0.0)(frames, rng)  # (C, T, 112, 112) of real content
    grey = augment.grey_levels(view).to(torch.uint8).numpy()
    raw = lambda: [cv2.calcOpticalFlowFarneback(grey[t + 1], grey[t], None, **augment.FARNEBACK) for t in range(15)]
    phi = lambda: torch.from_numpy(rng.uniform(0, 5.0, size=15)).float()  # U[0, M] per step, M = 5 (Eq. 3)
    negative = lambda: augment.scale_motion(view, augment.farneback_flow(view), phi())
    print(f"1 torch and 1 OpenCV thread; wall time, medians of {2 * args.repeat + 1} alternating calls, then "
          f"CPU time, medians of {args.repeat} samples")
    print_ratios([("TPS warp 3x16x112x112", "bare grid_sample",
                   *side_by_side(lambda: warp(clip, rng), bare, args.repeat), "<= 2"),
                  ("flow-scaled negative 16x112x112", "raw Farneback calls", *side_by_side(negative, raw, args.repeat),
                   "<= 1.2"),
                  ("triplet, short side 128, crops 112", "its decode", m["total"], m["decode"], None),
                  ("  same", "its decode + Farneback", m["total"], m["decode"] + m["Farneback"], "<= 2")])


BENCHES["augment"] = bench_augment


# ---- data ------------------------------------------------------------------
def _raw_against_prepared(repeat: int) -> tuple[float, float, float]:
    """CPU seconds of a training sample's decode at the paper's setting (data.ClipDataset, short side 256
    for crops of 224) from a generated 1280x720 H.264 video of 250 frames with x264's defaults (one
    keyframe) and from its `data.prepare_video` copy (short side 256, a keyframe every 16), sample i
    the same frames from both, in alternation; and what preparing the copy cost."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [os.path.join(tmp, "raw.mp4"), os.path.join(tmp, "prepared.mp4")]
        _moving_video(paths[0], frames=250, height=720, width=1280, codec="libx264")
        prepare, _ = _seconds(lambda: data.prepare_video(paths[0], paths[1], 256, 16), CPU)
        raw, prepared = (data.ClipDataset(data.VideoFiles([data.VideoRecord(path, 0)], data.short_side_for(224)),
                                          **PAPER_CLIPS) for path in paths)
        seconds = [(_seconds(lambda: raw[i], CPU)[0], _seconds(lambda: prepared[i], CPU)[0]) for i in range(repeat)]
    return *np.median(seconds, axis=0), prepare


def bench_data(args: argparse.Namespace) -> None:
    """The data path at the paper's setting (16 x 4 frames, shift 2-20, crops of 224 from a short side of
    256, and of 112 from 128) per core: triplet_stages on a generated 640x272 H.264 video of 300 frames
    with a keyframe every 250 (x264's default: a seek lands on frame 0) and every 25 (1 s, as in many
    UCF101 and Kinetics files); then a raw 1280x720 video against its `data.py prepare` copy."""
    _one_thread()
    stages = {}
    with tempfile.TemporaryDirectory() as tmp:
        for keyint in (250, 25):
            _moving_video(os.path.join(tmp, f"{keyint}.mp4"), 300, 272, 640, codec="libx264", keyint=keyint)
            for size in (224, 112):
                stages[keyint, size] = triplet_stages(os.path.join(tmp, f"{keyint}.mp4"), size, args.repeat)
    columns = ("decode", "b", "s", "Farneback", "flow scaling", "total")
    print(f"one DSM triplet from 640x272 H.264, CPU ms, 1 torch/OpenCV thread, median of {args.repeat} samples")
    print(f"{'keyframes':>9} {'crop':>5} " + " ".join(f"{c:>12}" for c in columns) + f" {'triplets/s/core':>16}")
    for (keyint, size), m in stages.items():
        print(f"{keyint:>9} {size:>5} " + " ".join(f"{m[c] * 1e3:12.1f}" for c in columns) + f" {1 / m['total']:16.2f}")
    raw, prepared, prepare = _raw_against_prepared(args.repeat)
    m = stages[250, 224]
    print_ratios([("224: device path's worker (decode, draws)", "the decode alone", m["worker"], m["decode"], "<= 1.2"),
                  ("224: CPU path (decode, b, s, t)", "the decode alone", m["total"], m["decode"], None)]
                 + [(f"{size}: decode seeking, keyframe every {k}", "from frame 0", d["seek"], d["from frame 0"], None)
                    for (k, size), d in stages.items()]
                 + [("a sample from raw 1280x720 H.264", "from its prepared copy", raw, prepared, ">= 3")])
    print(f"preparing the 250 frames once cost {prepare:.2f} s CPU ({prepare / 250 * 1e3:.1f} ms per frame)")


BENCHES["data"] = bench_data


# ---- flow ------------------------------------------------------------------
def bench_flow(args: argparse.Namespace) -> None:
    """augment.farneback_torch against cv2.calcOpticalFlowFarneback with the same parameters on generated
    16-frame clips (a texture panning 2 px per frame; a textured square moving 3 px right and 2 down per
    frame over a still one): mean end-point error over every pixel of the 15 frame pairs, and CPU ms per
    clip on one thread, medians of 2 x --repeat + 1."""
    _one_thread()
    print(f"Farneback {augment.FARNEBACK}, 1 thread, medians of {2 * args.repeat + 1}")
    print(f"{'clip':>7} {'size':>5} {'|flow| px':>9} {'EPE px':>9} {'max EPE':>9} {'OpenCV ms':>10} {'torch ms':>9}")
    for size in (112, 224):
        wide, patch = _texture((size, size + 32), 2.0, seed=0), _texture((size // 3, size // 3), 1.5, seed=2)
        obj = np.repeat(_texture((size, size), 2.0, seed=1)[None], 16, axis=0)
        for t in range(16):
            y, x = size // 6 + 2 * t, size // 6 + 3 * t
            obj[t, y:y + len(patch), x:x + len(patch)] = patch
        pan = np.stack([wide[:, 32 - 2 * t: 32 - 2 * t + size] for t in range(16)])  # (T, size, size)
        for name, grey in (("pan", pan), ("object", obj)):
            opencv = lambda: np.stack([cv2.calcOpticalFlowFarneback(grey[t + 1], grey[t], None, **augment.FARNEBACK)
                                       for t in range(15)])
            ours = lambda: augment.farneback_torch(torch.from_numpy(grey)[None].float(), **augment.FARNEBACK)[0]
            theirs = torch.from_numpy(opencv()).permute(0, 3, 1, 2)  # (T-1, 2, H, W) as ours
            epe = (ours() - theirs).norm(dim=1)
            t_torch, t_cv = side_by_side(ours, opencv, args.repeat, CPU)
            print(f"{name:>7} {size:>5} {theirs.norm(dim=1).mean():9.3f} {epe.mean():9.2e} {epe.max():9.2e} "
                  f"{t_cv * 1e3:10.1f} {t_torch * 1e3:9.1f}")


BENCHES["flow"] = bench_flow


# ---- model -----------------------------------------------------------------
def bench_model(args: argparse.Namespace) -> None:
    """Forward+backward per 16x112x112 clip on the CPU for every arch, as GFLOP/s next to torchvision's
    r3d_18: the same work per FLOP should cost the same. The nets take turns, one step each per round,
    and each keeps its fastest round: a neighbour's load spike then slows one round of every net, not
    all of one. FLOPs (2 x multiply-adds) are counted on the meta device, so even c3d costs no compute."""
    shape = (2, 3, 16, 112, 112)
    builders = {arch: lambda a=arch: models.Classifier(a, 400) for arch in models.ARCHS}
    builders["torchvision r3d_18"] = lambda: r3d_18(weights=None)
    flops = {}
    for name, build in builders.items():
        with FlopCounterMode(display=False) as counter:
            build().to("meta")(torch.empty(shape, device="meta"))
        flops[name] = counter.get_total_flops() / shape[0]  # forward, per clip
    nets, x = {name: build().train() for name, build in builders.items()}, torch.randn(shape)
    best = dict.fromkeys(nets, float("inf"))
    for round_ in range(args.repeat + 1):  # round 0 warms up
        for name, net in nets.items():
            net.zero_grad(set_to_none=True)
            seconds = _seconds(lambda: net(x).sum().backward())[0] / shape[0]
            if round_:
                best[name] = min(best[name], seconds)
    rate = {name: 3 * flops[name] / best[name] for name in nets}  # backward ~ 2 x forward
    print(f"forward+backward, batch {shape[0]}, {torch.get_num_threads()} threads, fastest of {args.repeat} rounds")
    print(f"{'network':<20} {'s/clip':>8} {'GFLOPs/clip':>12} {'GFLOP/s':>8} {'vs tv':>6}")
    for name in nets:
        print(f"{name:<20} {best[name]:>8.3f} {flops[name] / 1e9:>12.2f} {rate[name] / 1e9:>8.1f} "
              f"{rate[name] / rate['torchvision r3d_18']:>6.2f}")


BENCHES["model"] = bench_model


# ---- train -----------------------------------------------------------------
def hara_r3d18_from_torchvision() -> torch.nn.Module:
    """models.build_backbone("r3d18") assembled from torchvision's video-ResNet parts: Hara's
    7x7x7 stem, BasicBlocks [2, 2, 2, 2], shortcut B, no pooling head."""
    stem = torch.nn.Sequential(torch.nn.Conv3d(3, 64, 7, (1, 2, 2), 3, bias=False), torch.nn.BatchNorm3d(64),
                               torch.nn.ReLU(inplace=True), torch.nn.MaxPool3d(3, 2, 1))
    net = VideoResNet(BasicBlock, [Conv3DSimple] * 4, [2, 2, 2, 2], lambda: stem)
    backbone = torch.nn.Sequential(*list(net.children())[:5])  # stem, layer1..layer4
    backbone.out_channels = 512
    return backbone


def bench_train(args: argparse.Namespace) -> None:
    """A DSM training step (f_q forward+backward on a and n, f_k forward on p, SGD) on a fixed batch:
    our r3d18 against the same network from torchvision's parts, in alternation."""
    torch.manual_seed(0)
    views = torch.randn(4, 3, 3, 8, 64, 64)  # (B, a/p/n, C, T, H, W)
    step_args = pretrain.parse_args(["--loss", "both", "--moco-k", "64", "--batch-size", str(len(views))])
    steps, scaler = [], torch.amp.GradScaler("cpu", enabled=False)
    for torchvision_parts in (False, True):
        model = pretrain.DSM("r3d18", K=64)
        if torchvision_parts:
            for encoder in (model.encoder_q, model.encoder_k):
                encoder.backbone = hara_r3d18_from_torchvision()
            model.encoder_k.load_state_dict(model.encoder_q.state_dict())
        optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=1e-3, momentum=0.9)
        steps.append(lambda m=model, o=optimizer: pretrain.train_step(m, views, torch.arange(len(views)), o, scaler,
                                                                      step_args, None))
    print(f"wall time, {torch.get_num_threads()} threads, medians of {2 * args.repeat + 1} alternating steps")
    print_ratios([("DSM step, r3d18, 4 triplets of 8x64x64", "the same from torchvision's parts",
                   *side_by_side(*steps, args.repeat), "<= 1.1")])


BENCHES["train"] = bench_train


# ---- retrieval -------------------------------------------------------------
def peak_memory_of(fn: Callable[[], object]) -> tuple[float, int]:
    """Seconds of fn() and its peak resident memory above the start, in bytes: Linux's high-water mark
    VmHWM, reset through /proc/self/clear_refs so that each call is measured on its own (torch's
    allocator bypasses tracemalloc, and ru_maxrss never goes down)."""
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = status("VmRSS")
    return _seconds(fn)[0], status("VmHWM") - start


def bench_retrieval(args: argparse.Namespace) -> None:
    """retrieve.recall_at_k on UCF101-sized random features against one plain `query @ gallery.T` of the
    same sizes, and never the N x M x D tensor. Each is timed once: at these sizes one call is ~4 TFLOP."""
    parser = argparse.ArgumentParser(prog="bench.py retrieval", description=bench_retrieval.__doc__)
    parser.add_argument("--gallery", type=int, default=10000, help="gallery items M (default: 10000)")
    parser.add_argument("--queries", type=int, default=4000, help="queries N (default: 4000)")
    parser.add_argument("--dim", type=int, default=50000, help="feature size D (default: 50000)")
    n = parser.parse_args(args.rest)
    generator = torch.Generator().manual_seed(0)
    gallery, query = torch.empty(n.gallery, n.dim), torch.empty(n.queries, n.dim)
    for features in (gallery, query):  # filled in place, block by block: no second copy
        for i in range(0, len(features), 1000):
            features[i:i + 1000].normal_(generator=generator)
    labels = [torch.randint(101, (size,), generator=generator) for size in (n.queries, n.gallery)]
    t_ours, mem_ours = peak_memory_of(lambda: retrieve.recall_at_k(query, labels[0], gallery, labels[1]))
    t_ref, mem_ref = peak_memory_of(lambda: query @ gallery.T)
    gib = lambda size: f"{size / 2 ** 30:.2f} GiB"
    print(f"{n.queries} queries x {n.gallery} gallery x {n.dim}-d float32 (features "
          f"{gib(4 * (n.queries + n.gallery) * n.dim)}), {torch.get_num_threads()} threads, one call each")
    print_ratios([("recall_at_k, K = 1..50", "query @ gallery.T", t_ours, t_ref, "<= 1.3")])
    print(f"peak memory: recall_at_k +{gib(mem_ours)}, the N x M matrix +{gib(mem_ref)}; the N x M x D tensor "
          f"that recall_at_k never allocates: {gib(4 * n.queries * n.gallery * n.dim)}")


BENCHES["retrieval"] = bench_retrieval
OWN_FLAGS.add("retrieval")


# ---- results ---------------------------------------------------------------
# row of the table: (folder, pretrain.py flags, or None for the rows that are not pretrained)
RESULT_ROWS = {"random init": ("random", None), "supervised": ("supervised", None),
               "MoCo baseline": ("moco", ["--positive=none", "--negative=none"]),
               "DSM (Triplet)": ("dsm_triplet", ["--loss=triplet"]), "DSM": ("dsm", ["--loss=contrastive"])}
# the miniature of the paper's Table 4: pretraining alone, judged by its kNN monitor (M-disturb is the DSM row)
ABLATION_ROWS = {"S-warp only": ("swarp", ["--negative=none"]), "S-warp + T-shift": ("tshift", ["--negative=shift"]),
                 "S-warp + Scaling-Of": ("scaling", ["--negative=flow"]), "DSM, both losses": ("both", ["--loss=both"])}
# the claim in numbers: (row, reference row, column) must lead by TARGET_LEAD points on every seed
TARGETS = [("DSM", "random init", "kNN motion"), ("DSM", "MoCo baseline", "kNN motion"),
           ("DSM (Triplet)", "MoCo baseline", "kNN motion"), ("DSM", "MoCo baseline", "fine-tune top-1"),
           ("DSM", "supervised", "fine-tune top-1")]
TARGET_LEAD = 10.0
RESULT_SHARED_FLAGS = ("num-train", "num-test", "size", "clip-len", "stride", "batch-size", "workers")  # every stage


def _results_stage(script: str, flags: list[str], out: str) -> None:
    """python SCRIPT FLAGS --out OUT, unless OUT/results.json shows it finished (a killed table
    resumes). pretrain.py writes no results.json: it runs with --resume, which skips finished epochs."""
    if os.path.exists(os.path.join(out, "results.json")):
        print(f"[results] have {out}/results.json")
        return
    command = [sys.executable, script, *flags, f"--out={out}"]
    print(f"[results] {' '.join(command[1:])}", flush=True)
    subprocess.run(command, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))


def _results_one_seed(opts: argparse.Namespace, seed: int, ablation: bool) -> dict[str, dict[str, float]]:
    """Every run of one seed into OUT/seedS/<row>/..., then the table's cells of every row (the Table 4
    rows only with `ablation`)."""
    flag = lambda name, value: [] if value is None else [f"--{name}={value}"]
    shared = [f"--seed={seed}", f"--data-seed={seed}"]  # a new draw of the synthetic videos and of the run
    for name in RESULT_SHARED_FLAGS:
        shared += flag(name, getattr(opts, name.replace("-", "_")))
    finetune = [*shared, "--eval-train", "--resume", *flag("epochs", opts.finetune_epochs)]
    pretraining = [*shared, "--resume", *flag("epochs", opts.pretrain_epochs), *flag("moco-k", opts.moco_k)]
    rows = RESULT_ROWS | ABLATION_ROWS
    folder = {row: os.path.join(opts.out, f"seed{seed}", name) for row, (name, _) in rows.items()}
    # supervised = fine-tuning every weight from random init; its backbone is then probed like the others
    _results_stage("finetune.py", [*finetune, "--protocol=full", "--pretrained=none"],
                   os.path.join(folder["supervised"], "full"))
    backbone = {"random init": "none", "supervised": os.path.join(folder["supervised"], "full", "checkpoint.pth")}
    for row, (_, flags) in RESULT_ROWS.items():
        if flags is not None:
            _results_stage("pretrain.py", [*pretraining, *flags], folder[row])
            backbone[row] = os.path.join(folder[row], "checkpoint.pth")
            _results_stage("finetune.py", [*finetune, "--protocol=full", f"--pretrained={backbone[row]}"],
                           os.path.join(folder[row], "full"))
    for row, path in backbone.items():
        _results_stage("finetune.py", [*finetune, "--protocol=linear", f"--pretrained={path}"],
                       os.path.join(folder[row], "linear"))
        _results_stage("retrieve.py", [*shared, f"--pretrained={path}"], os.path.join(folder[row], "retrieve"))
    for row, (_, flags) in ABLATION_ROWS.items() if ablation else ():
        _results_stage("pretrain.py", [*pretraining, *flags], folder[row])
    cells = {}
    for row in rows:
        # random init: the DSM run's kNN report on its randomly initialised twin, and the supervised run's
        # fine-tuning (fine-tuning from random init is what it is); supervised has no kNN monitor
        random_init = row == "random init"
        log = os.path.join(folder["DSM" if random_init else row], "log.jsonl")
        last, twin = _record(log) if os.path.exists(log) else {}, "_random_init" if random_init else ""
        cells[row] = {"kNN motion": last.get(f"knn_top1{twin}", np.nan),
                      "kNN scene": last.get(f"knn_scene_top1{twin}", np.nan)}
        if row in backbone:
            full_of = "supervised" if random_init else row
            linear, full, retrieval = (_record(os.path.join(folder[of], run, "results.json"))
                                       for of, run in ((row, "linear"), (full_of, "full"), (row, "retrieve")))
            cells[row] |= {"linear top-1": linear["video_top1"], "linear train top-1": linear["train_video_top1"],
                           "fine-tune top-1": full["video_top1"], "fine-tune train top-1": full["train_video_top1"],
                           "R@1": retrieval["recall@1"], "R@5": retrieval["recall@5"]}
    return cells


def _target_lines(per_seed: list[dict[str, dict[str, float]]], seeds: list[int]) -> list[str]:
    """One line per target: the lead on each seed and the seeds where it falls short."""
    lines = []
    for row, reference, column in TARGETS:
        leads = [cells[row][column] - cells[reference][column] for cells in per_seed]
        missed = [str(seed) for seed, lead in zip(seeds, leads) if not lead >= TARGET_LEAD]
        verdict = f"MISSED on seed {', '.join(missed)}" if missed else "met on every seed"
        lines.append(f"- {row} - {reference}, {column}: " + ", ".join(f"{lead:+.1f}" for lead in leads)
                     + f" (seeds {', '.join(map(str, seeds))}): {verdict}")
    return lines


def plot_decoupling(per_seed: list[dict[str, dict[str, float]]], path: str) -> list[str]:
    """kNN top-1 on the motion classes (x) against on the scene (y) for every row with a kNN monitor (not
    supervised), mean +- sd over the seeds: learning motion instead of scene moves a row right and down.
    Returns the rows drawn."""
    import matplotlib
    matplotlib.use("Agg")  # to a file, no display; before pyplot, which picks its backend on import
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    drawn = [row for row in per_seed[0] if not np.isnan(per_seed[0][row]["kNN motion"])]
    for row in drawn:
        xy = np.array([[cells[row]["kNN motion"], cells[row]["kNN scene"]] for cells in per_seed
                       if not np.isnan(cells[row]["kNN motion"])])  # (seeds, 2)
        sd = xy.std(axis=0, ddof=1) if len(xy) > 1 else np.zeros(2)
        ax.errorbar(*xy.mean(axis=0), xerr=sd[0], yerr=sd[1], fmt="o" if row in RESULT_ROWS else "s", capsize=3,
                    label=row)  # squares: the Table 4 ablation
    ax.set(xlabel="kNN top-1, motion classes (%)", ylabel="kNN top-1, scene (%)",
           title=f"Motion against scene, mean ± sd over {len(per_seed)} seed(s)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the axes: no point hidden
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return drawn


def _cell(values: list[float]) -> str:
    """mean +- sd over the seeds that have the value, and how many when some have not (Table 4 rows, a failed run)."""
    have = [v for v in values if not np.isnan(v)]
    if not have:
        return "—"
    spread = f" ± {np.std(have, ddof=1):.1f}" if len(have) > 1 else ""
    return f"{np.mean(have):.1f}{spread}" + (f" ({len(have)} seeds)" if len(have) < len(values) else "")


def bench_results(args: argparse.Namespace) -> None:
    """The README's synthetic results table: rows random init, supervised, MoCo baseline, DSM (Triplet),
    DSM, then the miniature of Table 4 (pretraining and its kNN only); columns the pretraining's kNN
    top-1 on the motion classes and on the scene, video top-1 (%) of the linear probe and of fine-tuning
    on the scene-independent test split and on the scene-biased train split, retrieval R@1 and R@5.
    Seed S draws both the synthetic videos and the runs, which land in OUT/seedS/<row>/...; a finished
    run is not run again, so a killed table resumes. Prints the markdown table and the targets (a lead
    of TARGET_LEAD points on every seed), writes both to OUT/table.md, and the figure to --figure.

        python bench.py results                  # the full table: 21 runs per seed (17 past --ablation-seeds)
        python bench.py results --seeds 0 1 2    # mean +- std over three seeds
        python bench.py results --pretrain-epochs 1 --finetune-epochs 1 --num-train 32 --num-test 16 --size 32 \\
            --clip-len 4 --batch-size 8 --moco-k 16 --out /tmp/results_smoke --figure /tmp/results_smoke.png  # smoke
    """
    parser = argparse.ArgumentParser(prog="bench.py results", description=bench_results.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="a table each, then mean +- std (default: 0)")
    parser.add_argument("--ablation-seeds", type=int, default=3,
                        help="the Table 4 rows on the first N of the seeds only (default: 3)")
    parser.add_argument("--pretrain-epochs", type=int,
                        help="every pretraining (default: pretrain.py's, 6 on synthetic)")
    parser.add_argument("--finetune-epochs", type=int, help="every probe and fine-tuning (default: finetune.py's, 12)")
    parser.add_argument("--out", default="runs/results", help="run folder (default: runs/results)")
    parser.add_argument("--figure", default="docs/decoupling.png", help="the figure (default: docs/decoupling.png)")
    parser.add_argument("--moco-k", type=int, help="queue length of every pretraining (default: pretrain.py's)")
    for name in RESULT_SHARED_FLAGS:
        parser.add_argument(f"--{name}", type=int, help="passed to every stage (default: the stage's own)")
    opts = parser.parse_args(args.rest)
    for seed in opts.seeds:  # the main rows of every seed before any Table 4 row: they are the claim
        _results_one_seed(opts, seed, ablation=False)
    per_seed = [_results_one_seed(opts, seed, i < opts.ablation_seeds) for i, seed in enumerate(opts.seeds)]
    columns = list(per_seed[0]["random init"])
    lines = [f"| | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for row in per_seed[0]:
        lines.append(f"| {row} | " + " | ".join(_cell([cells[row].get(c, np.nan) for cells in per_seed])
                                                for c in columns) + " |")
    config = {k: v for k, v in vars(opts).items() if v is not None and k not in ("out", "figure")}
    table = "\n".join([f"Synthetic scene/motion data, video top-1 and Recall@K in %, {config}.", "",
                       *lines, "", "Fine-tuning from random init is the supervised run: the two rows share it.", "",
                       f"Targets, a lead of at least {TARGET_LEAD:.0f} points on every seed:",
                       *_target_lines(per_seed, opts.seeds)])
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    plot_decoupling(per_seed, opts.figure)
    print(f"-> {os.path.join(opts.out, 'table.md')}, {opts.figure}")


BENCHES["results"] = bench_results
OWN_FLAGS.add("results")


# ---- gpu: the CUDA paths on this machine's GPU, in one command --------------------------
GPU_CLASSES = ("PanA", "PanB")  # two class folders of identical generated videos: speed, not accuracy
GPU_PAPER = ["--arch", "i3d", "--size", "224", "--clip-len", "16", "--stride", "4", "--batch-size", "8"]


def _gpu_videos(root: str, train_per_class: int, test_per_class: int, frames: int = 120,
                height: int = 240, width: int = 320) -> list[str]:
    """Generated H.264 videos in the UCF101 layout under ROOT (videos/, splits/); returns the
    --root/--split-dir flags. One file is encoded and copied: decoding costs the same."""
    import shutil

    os.makedirs(root, exist_ok=True)
    source = os.path.join(root, "source.mp4")  # MP4 under .avi names: PyAV stamps H.264 in AVI a frame late
    _moving_video(source, frames, height, width, codec="libx264", keyint=16)
    lines = {"train": [], "test": []}
    for label, name in enumerate(GPU_CLASSES, 1):
        os.makedirs(os.path.join(root, "videos", name), exist_ok=True)
        for group in range(1, train_per_class + test_per_class + 1):
            rel = f"{name}/v_{name}_g{group:02d}_c01.avi"
            shutil.copyfile(source, os.path.join(root, "videos", rel))
            split = "train" if group <= train_per_class else "test"
            lines[split].append(f"{rel} {label}" if split == "train" else rel)
    os.makedirs(os.path.join(root, "splits"), exist_ok=True)
    for name, rows in (("classInd.txt", [f"{k} {c}" for k, c in enumerate(GPU_CLASSES, 1)]),
                       ("trainlist01.txt", lines["train"]), ("testlist01.txt", lines["test"])):
        with open(os.path.join(root, "splits", name), "w") as f:
            f.write("\n".join(rows) + "\n")
    return ["--dataset", "ucf101", "--root", os.path.join(root, "videos"), "--split-dir", os.path.join(root, "splits")]


def _gpu_views(video: str, device: str, size: int = 224, clip_len: int = 16, samples: int = 4) -> dict[str, float]:
    """The same draws through the CPU path (OpenCV flow) and the device path (farneback_torch):
    the views' max and mean difference (normalised units), and the flows' end-point error (px)."""
    import numpy as np
    import torch

    import augment
    import data

    files = data.VideoFiles([data.VideoRecord(video, 0)], data.short_side_for(size))
    triplet, out = augment.DSMTriplet(size), {}
    clips = [files.read(0, lambda n, i=i: [(2 * i + 4 * t) % n for t in range(clip_len)]) for i in range(2 * samples)]
    pairs = [(clips[2 * i], clips[2 * i + 1]) for i in range(samples)]
    cpu = torch.stack([triplet(c, s, np.random.default_rng(i)) for i, (c, s) in enumerate(pairs)])
    batch = augment.collate_frames([{"views": augment.FramesAndDraws(triplet)(c, s, np.random.default_rng(i)),
                                     "index": i} for i, (c, s) in enumerate(pairs)])
    dev = triplet.apply_batch(batch["views"]["frames"], batch["views"]["draws"], device).cpu()
    for name, views in (("a_p", slice(0, 2)), ("n", slice(2, 3))):
        diff = (dev[:, views] - cpu[:, views]).abs()
        out[f"views_{name}_max"], out[f"views_{name}_mean"] = float(diff.max()), float(diff.mean())
    whole = augment.resize_crop(clips[0], (0, 0, *clips[0].shape[1:3]), size)  # (C, T, S, S) in [0, 1]
    opencv = augment.farneback_flow(whole)  # (T-1, 2, S, S)
    ours = augment.farneback_torch(augment.grey_levels(whole)[None].to(device), **augment.FARNEBACK)[0].cpu()
    epe = (ours - opencv).norm(dim=1)
    out.update(flow_px=float(opencv.norm(dim=1).mean()), epe_mean=float(epe.mean()), epe_max=float(epe.max()))
    return out


def _gpu_stage(command: list[str], out: str, log: str) -> dict:
    """Run one stage script; its last log line (or results.json), wall time, or the error it ended with."""
    t0 = time.perf_counter()
    proc = subprocess.run(command + ["--out", out], cwd=os.path.dirname(os.path.abspath(__file__)),
                          capture_output=True, text=True)
    row = {"wall_s": time.perf_counter() - t0}
    if proc.returncode != 0:
        return {**row, "error": (proc.stdout + proc.stderr).strip().splitlines()[-1:]}
    return {**row, **{k: v for k, v in _record(os.path.join(out, log)).items() if k != "args"}}


def _gpu_commands(layout: list[str], workers: int, out: str, paper: list[str] = GPU_PAPER,
                  queue: int = 32) -> dict[str, tuple]:
    """Every run of the GPU check: row name -> (command, run folder, the file its figures are read from).
    The queue must be shorter than the training set (96 videos: 12 steps an epoch)."""
    pretrain = [sys.executable, "pretrain.py", *layout, *paper, "--moco-k", str(queue), "--epochs", "2",
                "--knn-every", "0", "--workers", str(workers)]
    settings = {"fp32": [], "fp32 channels-last": ["--channels-last"], "amp": ["--amp"],
                "amp channels-last": ["--amp", "--channels-last"],
                "amp channels-last, b/s/t on CPU": ["--amp", "--channels-last", "--augment-device", "cpu"]}
    runs = {f"pretrain {name}": (pretrain + flags, os.path.join(out, f"pretrain{k}"), "log.jsonl")
            for k, (name, flags) in enumerate(settings.items())}
    runs["torchrun 1 process (NCCL), amp"] = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29533", *pretrain[1:],
         "--amp", "--epochs", "1"], os.path.join(out, "torchrun"), "log.jsonl")
    downstream = [*layout, *paper, "--amp", "--channels-last", "--workers", str(workers),
                  f"--pretrained={os.path.join(out, 'pretrain3', 'checkpoint.pth')}"]  # amp channels-last
    runs["finetune --amp, 1 epoch"] = ([sys.executable, "finetune.py", *downstream, "--epochs", "1"],
                                       os.path.join(out, "finetune"), "log.jsonl")
    runs["retrieve --amp"] = ([sys.executable, "retrieve.py", *downstream], os.path.join(out, "retrieve"),
                              "results.json")
    return runs


def bench_gpu(args: argparse.Namespace) -> None:
    """The CUDA paths on this machine's GPU, one command (about 5 minutes on an H200): device,
    the device path's views against the CPU path's, Farneback on the GPU against OpenCV,
    pretrain.py at the paper's setting (i3d, 224, 16 x 4, batch 8: one GPU's share of the paper's
    128 over 16) for fp32 / --amp, --channels-last off / on, b/s/t on the GPU / in the workers,
    torchrun with NCCL, one epoch of finetune.py --amp and retrieve.py --amp. Prints the table,
    writes OUT/gpu.json after every row. "GPU share" is the step time not spent waiting for data.

        python bench.py gpu [--out runs/gpu]
    """
    import tempfile

    parser = argparse.ArgumentParser(prog="bench.py gpu")
    parser.add_argument("--out", default="runs/gpu", help="folder of gpu.json and the runs (default: runs/gpu)")
    opts = parser.parse_args(args.rest)
    if not torch.cuda.is_available():
        raise SystemExit("bench.py gpu: no CUDA GPU on this machine (torch.cuda.is_available() is False)")
    os.makedirs(opts.out, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "native_bf16": torch.cuda.is_bf16_supported(including_emulation=False)}
    save = lambda: json.dump(report, open(os.path.join(opts.out, "gpu.json"), "w"), indent=2)
    print(" | ".join(f"{k} {v}" for k, v in report.items()), flush=True)
    workers = max(1, len(os.sched_getaffinity(0)) - 1)
    with tempfile.TemporaryDirectory() as root:
        layout = _gpu_videos(root, train_per_class=48, test_per_class=4)
        report["views"] = _gpu_views(os.path.join(root, "source.mp4"), "cuda")
        print(" | ".join(f"{k} {v:.2e}" for k, v in report["views"].items()), flush=True)
        save()
        print(f"{'run (' + str(workers) + ' workers)':<42} {'samples/s':>10} {'data wait':>9} {'GPU share':>9} "
              f"{'peak GiB':>8} {'wall s':>7}", flush=True)
        for name, (command, out, log) in _gpu_commands(layout, workers, opts.out).items():
            report[name] = _gpu_stage(command, out, log)
            _gpu_print(name, report[name])
            save()
    print(f"-> {os.path.join(opts.out, 'gpu.json')}")


def _gpu_print(name: str, row: dict) -> None:
    """One row: triplets/s (pretrain) or clips/s (finetune), data wait and GPU share, peak memory, wall time."""
    per_s = row.get("clips_per_s")
    if "error" in row:
        print(f"{name:<42} FAILED after {row['wall_s']:.0f} s: {row['error']}", flush=True)
        return
    wait = row.get("data_wait")
    cells = [f"{per_s:10.1f}" if per_s else f"{'':>10}", f"{wait:9.0%}" if wait is not None else f"{'':>9}",
             f"{1 - wait:9.0%}" if wait is not None else f"{'':>9}",
             f"{row['peak_gpu_gib']:8.2f}" if "peak_gpu_gib" in row else f"{'':>8}", f"{row['wall_s']:7.0f}"]
    print(f"{name:<42} {' '.join(cells)}", flush=True)


BENCHES["gpu"] = bench_gpu
OWN_FLAGS.add("gpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=sorted(BENCHES), help="which bench to run")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions, median reported (default: 5)")
    argv = sys.argv[1:]
    own = bool(argv) and argv[0] in OWN_FLAGS  # it parses what follows its name, --help included
    args = parser.parse_args(argv[:1] if own else argv)
    args.rest = argv[1:] if own else []
    BENCHES[args.which](args)


if __name__ == "__main__":
    main()
