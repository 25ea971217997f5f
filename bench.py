"""Speed and memory of the hot paths, as ratios against their references.

Every number is measured side by side in one run on this machine, so the ratios hold on
a noisy shared machine where absolute times do not.

    python bench.py augment     # TPS warp, flow-scaled negative, one triplet from a file
    python bench.py data        # the data path at the paper's settings, stage by stage, per core; raw vs prepared
    python bench.py flow        # torch Farneback against OpenCV's: end-point error and CPU time
    python bench.py model       # forward+backward per clip and GFLOP/s for every arch
    python bench.py train       # a DSM step against torchvision parts; the default run's speed
    python bench.py retrieval   # blocked top-k against one matmul, and its memory
    python bench.py crops       # how often the synthetic crop loses the moving object
    python bench.py results     # the README's synthetic results table (every stage, hours)
    python bench.py gpu         # the CUDA paths on this machine's GPU, one table (about 5 minutes)
"""
import argparse
import time
from collections.abc import Callable


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


BENCHES: dict[str, Callable[[argparse.Namespace], None]] = {}  # filled by each section below

# ---- augment ---------------------------------------------------------------
def _texture(shape: tuple[int, ...], sigma: float, seed: int = 0):
    """uint8 smooth random texture (blurred noise stretched to 0-255): content every flow can follow."""
    import cv2
    import numpy as np

    texture = cv2.GaussianBlur(np.random.default_rng(seed).random(shape).astype(np.float32), (0, 0), sigma)
    return ((texture - texture.min()) / (texture.max() - texture.min()) * 255).astype(np.uint8)


def _moving_video(path: str, frames: int = 100, height: int = 240, width: int = 320, codec: str = "mpeg4",
                  keyint: int | None = None) -> None:
    """Write a video of a smooth texture panning right with a bright square crossing it, with a
    keyframe every `keyint` frames (None: the encoder's default, 250 for x264), since where a seek
    can land decides what it saves."""
    import av
    import numpy as np

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


def _clip_reader(path: str, indices: list[int], short_side: int) -> tuple[Callable[[], object], str]:
    """A function decoding the frames `indices` of `path` once, with data.py's VideoFiles if present."""
    try:
        from data import VideoFiles, VideoRecord
    except ImportError:
        VideoFiles = None
    if VideoFiles is not None:
        files = VideoFiles([VideoRecord(path, 0)], short_side)
        return lambda: files.read(0, lambda num_frames: indices), "data.VideoFiles decode"
    import av
    import numpy as np

    def read():
        frames = {}
        with av.open(path) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in indices:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= max(indices):
                    break
        return np.stack([frames[i] for i in indices])

    return read, "PyAV decode (no data.py)"


def side_by_side(fn: Callable[[], object], reference: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Medians of fn and reference timed in alternation, so a burst of load hits both alike."""
    import numpy as np

    timeit(fn, 1, warmup=3), timeit(reference, 1, warmup=3)
    pairs = [(timeit(fn, 1, warmup=0), timeit(reference, 1, warmup=0)) for _ in range(2 * repeat + 1)]
    return float(np.median([a for a, _ in pairs])), float(np.median([b for _, b in pairs]))


def _video_rows(repeat: int, rng) -> list[tuple]:
    """The flow-scaled negative and one whole triplet from a real video file, against their references."""
    import os
    import tempfile

    import cv2
    import torch

    import augment

    with tempfile.TemporaryDirectory() as tmp:
        video = os.path.join(tmp, "moving.mp4")
        _moving_video(video)
        anchor = [4 * i for i in range(16)]  # 16 x 4 clip, tau = 10 (Eq. 4)
        decode, decoder = _clip_reader(video, anchor + [i + 10 for i in anchor], short_side=128)
        frames = decode()  # (2T, H, W, 3): anchor then shifted frames
        view = augment.BasicAugment(112, jitter=0.0)(frames[:16], rng)  # (C, T, 112, 112) real content
        grey = augment.grey_uint8(view)
        raw = lambda: [cv2.calcOpticalFlowFarneback(grey[t + 1], grey[t], None, **augment.FARNEBACK) for t in range(15)]
        phi = lambda: torch.from_numpy(rng.uniform(0, 5.0, size=15)).float()
        negative = lambda: augment.scale_motion(view, augment.farneback_flow(view), phi())
        triplet = augment.DSMTriplet(112)
        decode_and_flow = lambda: (decode(), raw())

        def sample():
            both = decode()
            return triplet(both[:16], both[16:], rng)

        t_triplet, t_decode = side_by_side(sample, decode, repeat)
        return [("flow-scaled negative 16x112x112", "raw Farneback calls", *side_by_side(negative, raw, repeat), 1.2),
                (f"triplet, 320x240 mpeg4 at {frames.shape[1]}x{frames.shape[2]}", decoder, t_triplet, t_decode, None),
                ("  same", "decode + raw Farneback", *side_by_side(sample, decode_and_flow, repeat), 2.0)]


def bench_augment(args: argparse.Namespace) -> None:
    """TPS warp, flow-scaled negative and one whole triplet, each against its reference and target ratio."""
    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F

    import augment

    # Augmentations run inside DataLoader workers, which torch gives one thread each; with two
    # threads on a busy small machine every torch op waits on a descheduled thread (~4-16 ms).
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    clip = torch.rand(3, 16, 112, 112)  # (C, T, H, W)
    warp = augment.TPSWarp(112, 112)
    ready = warp.grid(warp.sample_src(rng))[None]
    bare = lambda: F.grid_sample(clip.reshape(1, 48, 112, 112), ready, padding_mode="border", align_corners=False)
    rows = [("TPS warp 3x16x112x112", "bare grid_sample", *side_by_side(lambda: warp(clip, rng), bare, args.repeat), 2.0)]
    try:
        import kornia  # noqa: F401
        print("kornia is installed but not measured: compare by hand")
    except ImportError:
        print("kornia TPS: not installed, skipped")
    rows += _video_rows(args.repeat, rng)
    print(f"torch threads {torch.get_num_threads()}, cv2 threads {cv2.getNumThreads()}, "
          f"medians of {2 * args.repeat + 1} alternating calls")
    print(f"{'hot path':36s} {'reference':26s} {'ms':>7s} {'ref ms':>7s} {'ratio':>6s}  target")
    for what, reference, t, t_ref, target in rows:
        verdict = "" if target is None else f"<= {target:.1f} {'ok' if t / t_ref <= target else 'MISSED'}"
        print(f"{what:36s} {reference:26s} {t * 1e3:7.2f} {t_ref * 1e3:7.2f} {t / t_ref:6.2f}  {verdict}")


BENCHES["augment"] = bench_augment


# ---- data ------------------------------------------------------------------
def _paper_indices(num_frames: int, rng) -> list[int]:
    """A training sample's frames at the paper's settings, as ClipDataset draws them: 16 x 4 anchor
    frames, then the same frames tau ~ U[2, 20] later (Eq. 4)."""
    import data

    return data.train_indices(num_frames, 16, 4, (2, 20), rng)


def _cpu_seconds(fn: Callable[[], object]) -> tuple[float, object]:
    """CPU seconds of fn() over all the process's threads (FFmpeg decodes with several), and its result."""
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def _triplet_stages(path: str, size: int, seed: int) -> dict[str, float]:
    """CPU seconds of each stage of one DSM triplet at crop `size` (decode with data.py, which seeks),
    of the whole CPU path and of the device path's worker share (decode, draws, frames into shared
    memory)."""
    import numpy as np

    import augment
    import data

    rng = np.random.default_rng(seed)
    files = data.VideoFiles([data.VideoRecord(path, 0)], data.short_side_for(size))
    triplet = augment.DSMTriplet(size)
    t = {}
    t["decode"], frames = _cpu_seconds(lambda: files.read(0, lambda num_frames: _paper_indices(num_frames, rng)))
    clip, shifted = frames[:16], frames[16:]
    draws = triplet.draw(16, *clip.shape[1:3], rng)
    flip, boxes, jitter = bool(draws["flip"]), draws["box"].tolist(), draws["jitter"].numpy()
    t["b"], (a, p, n) = _cpu_seconds(lambda: [triplet.b.apply(f, tuple(box), j, flip)
                                               for f, box, j in zip((clip, clip, shifted), boxes, jitter)])
    t["s"], _ = _cpu_seconds(lambda: triplet.s.apply(p, draws["src"]))
    t["Farneback"], flow = _cpu_seconds(lambda: augment.farneback_flow(n))
    t["flow scaling"], _ = _cpu_seconds(lambda: augment.scale_motion(n, flow, draws["phi"]))
    t["total"] = t["decode"] + _cpu_seconds(lambda: triplet.apply(clip, shifted, draws))[0]
    to_device = augment.FramesAndDraws(triplet)
    t["worker"] = t["decode"] + _cpu_seconds(
        lambda: to_device(clip, shifted, np.random.default_rng(seed))["frames"].share_memory_())[0]
    return t


def _decode_seconds(path: str, wanted: list[int], short_side: int, seek: bool) -> float:
    """CPU seconds to decode the frames `wanted` (sorted) as data.py does (seeking to the keyframe before
    the first one when it is past SEEK_AFTER_SECONDS) or from the first frame on; the file is opened
    untimed either way, so only the decoding differs."""
    import av

    import data

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # as data.VideoFiles decodes
        if seek:
            return _cpu_seconds(lambda: data._decode(container, stream, wanted, stream.frames, short_side))[0]
        return _cpu_seconds(lambda: data._scan(container, stream, wanted, stream.frames, short_side, seeked=False))[0]


def _seek_against_sequential(path: str, num_frames: int, size: int, seed: int) -> dict[str, float]:
    """CPU seconds per needed frame of the sample `seed` of _triplet_stages (the same draws), decoded
    with data.py's seek and from the first frame on, and its first needed frame."""
    import numpy as np

    import data

    wanted = sorted(set(_paper_indices(num_frames, np.random.default_rng(seed))))
    short_side = data.short_side_for(size)
    return {"seek per frame": _decode_seconds(path, wanted, short_side, seek=True) / len(wanted),
            "sequential per frame": _decode_seconds(path, wanted, short_side, seek=False) / len(wanted),
            "first frame": wanted[0]}


def _keyframes(path: str) -> list[int]:
    """Indices of the keyframes of `path`, counted by decoding it, to check the encoder kept the interval."""
    import av

    with av.open(path) as container:
        return [i for i, frame in enumerate(container.decode(video=0)) if frame.key_frame]


def _device_batch_seconds(path: str, size: int, batch: int) -> float:
    """Wall seconds per triplet of DSMTriplet.apply_batch on the CPU for `batch` decoded samples."""
    import numpy as np

    import augment
    import data

    files = data.VideoFiles([data.VideoRecord(path, 0)], data.short_side_for(size))
    to_device = augment.FramesAndDraws(augment.DSMTriplet(size))
    samples = []
    for seed in range(batch):
        rng = np.random.default_rng(seed)
        frames = files.read(0, lambda num: _paper_indices(num, rng))
        samples.append({"views": to_device(frames[:16], frames[16:], rng), "index": seed})
    views = augment.collate_frames(samples)["views"]
    apply = lambda: to_device.triplet.apply_batch(views["frames"], views["draws"], "cpu")
    return timeit(apply, repeat=1, warmup=0) / batch


def _raw_against_prepared(repeat: int, frames: int = 250) -> dict[str, object]:
    """CPU seconds per training sample's decode at the paper's setting (data.VideoFiles + data.ClipDataset:
    16 x 4 frames, shift 2-20, short side 256 for crops of 224) on a generated 1280x720 H.264 video with
    x264's defaults (keyint 250: one keyframe in `frames` = 250) and on its `data.prepare_video` copy
    (short side 256, keyframe every 16), sample i drawing the same frames from both, timed in
    alternation; and the CPU seconds that preparing it took."""
    import os
    import tempfile

    import numpy as np

    import data

    with tempfile.TemporaryDirectory() as tmp:
        paths = {"raw": os.path.join(tmp, "raw.mp4"), "prepared": os.path.join(tmp, "prepared.mp4")}
        _moving_video(paths["raw"], frames=frames, height=720, width=1280, codec="libx264")
        prepare_cpu, _ = _cpu_seconds(lambda: data.prepare_video(paths["raw"], paths["prepared"], 256, 16))
        datasets = {name: data.ClipDataset(data.VideoFiles([data.VideoRecord(path, 0)], data.short_side_for(224)),
                                           clip_len=16, stride=4, shift=(2, 20)) for name, path in paths.items()}
        seconds = {name: [] for name in paths}
        for i in range(repeat):
            for name, dataset in datasets.items():
                seconds[name].append(_cpu_seconds(lambda: dataset[i])[0])
        out = {name: float(np.median(runs)) for name, runs in seconds.items()}
        out["keyframes"] = {name: _keyframes(path) for name, path in paths.items()}
        out["prepared size"] = tuple(datasets["prepared"][0]["views"].shape[2:4])  # (H, W) as decoded at 256
    return {**out, "prepare": prepare_cpu, "frames": frames}


def _print_raw_against_prepared(repeat: int) -> None:
    m = _raw_against_prepared(repeat)
    ratio = m["raw"] / m["prepared"]
    print(f"raw against prepared: one training sample's decode (16 x 4 frames + shift 2-20, short side 256 for "
          f"crops of 224, data.VideoFiles + ClipDataset), CPU ms per sample, median of {repeat} samples, the same "
          f"frames from both files")
    print(f"  raw 1280x720 H.264, {m['frames']} frames, keyframes at {m['keyframes']['raw']}: "
          f"{m['raw'] * 1e3:.1f} ms per sample")
    height, width = m["prepared size"]
    print(f"  prepared {width}x{height} (data.py prepare --short-side 256 --keyframe-every 16), keyframes at "
          f"{m['keyframes']['prepared'][:4]}...: {m['prepared'] * 1e3:.1f} ms per sample")
    print(f"  ratio raw/prepared: {ratio:.1f}x (target >= 3: {'ok' if ratio >= 3 else 'MISSED'}); preparing this "
          f"video once cost {m['prepare']:.2f} s CPU ({m['prepare'] / m['frames'] * 1e3:.1f} ms per frame)")


def bench_data(args: argparse.Namespace) -> None:
    """The data path at the paper's settings (16 x 4 frames, shift 2-20, crops of 224 from a short side
    of 256, and of 112 from 128), per triplet and per core: CPU seconds of each stage (medians over
    --repeat samples of a generated 640x272 H.264 video, 300 frames, x264's default keyframe interval),
    the device path's worker share against decoding alone, and decoding with data.py's seek against
    decoding the same frames from the first one on, with a keyframe every 250 frames (where most seeks
    land on frame 0) and every 25 (1 s, closer to many UCF101 and Kinetics encodes); last, a sample's decode
    from a raw 1280x720 video against its `data.py prepare` copy (_raw_against_prepared)."""
    import os
    import tempfile

    import cv2
    import numpy as np

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    frames, sizes, seeds = 300, (224, 112), range(args.repeat)
    with tempfile.TemporaryDirectory() as tmp:
        videos = {keyint: os.path.join(tmp, f"moving_{keyint}.mp4") for keyint in (250, 25)}
        for keyint, video in videos.items():
            _moving_video(video, frames=frames, height=272, width=640, codec="libx264", keyint=keyint)
        keyframes = {keyint: _keyframes(video) for keyint, video in videos.items()}
        rows = {size: [_triplet_stages(videos[250], size, seed) for seed in seeds] for size in sizes}
        batch_224 = _device_batch_seconds(videos[250], 224, batch=4)
        decodes = {(keyint, size): [_seek_against_sequential(video, frames, size, seed) for seed in seeds]
                   for keyint, video in videos.items() for size in sizes}
    medians = lambda runs: {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
    median = {size: medians(runs) for size, runs in rows.items()}
    stages = ("decode", "b", "s", "Farneback", "flow scaling", "total")
    print(f"one DSM triplet, 16 x 4 frames + shifted, 640x272 H.264, CPU ms per triplet (1 torch/OpenCV thread), "
          f"median of {args.repeat} samples")
    print(f"{'crop':>5} " + " ".join(f"{s:>12}" for s in stages) + f" {'triplets/s/core':>16}")
    for size, m in median.items():
        print(f"{size:>5} " + " ".join(f"{m[s] * 1e3:12.1f}" for s in stages) + f" {1 / m['total']:16.2f}")
    print("keyframes, counted by decoding: " + "; ".join(f"every {k}: {at}" for k, at in keyframes.items()))
    for (keyint, size), runs in decodes.items():
        m = medians(runs)
        print(f"decode per needed frame, keyframe every {keyint}, at {size}: "
              f"data.py (seeks past 2 s) {m['seek per frame'] * 1e3:.2f} ms, sequential from frame 0 "
              f"{m['sequential per frame'] * 1e3:.2f} ms: ratio {m['seek per frame'] / m['sequential per frame']:.2f} "
              f"(first needed frame, median {m['first frame']:.0f} of {frames})")
    m = median[224]
    ratio = m["worker"] / m["decode"]
    print(f"device path at 224, worker CPU per triplet (decode + draws + frames to shared memory): "
          f"{m['worker'] * 1e3:.1f} ms vs decode alone {m['decode'] * 1e3:.1f} ms: {ratio:.2f}x "
          f"(target <= 1.2: {'ok' if ratio <= 1.2 else 'MISSED'}); CPU path {m['total'] / m['decode']:.2f}x")
    print(f"device path's augmentation (apply_batch) on this CPU, batch of 4 at 224: {batch_224 * 1e3:.0f} ms per "
          f"triplet (informative: it is meant for the GPU)")
    _print_raw_against_prepared(args.repeat)


BENCHES["data"] = bench_data


# ---- flow ------------------------------------------------------------------
def _flow_clips(size: int, T: int = 16) -> dict[str, "np.ndarray"]:
    """Generated grey uint8 clips (T, size, size), not real footage: (a) a texture panning 2 px per
    frame; (b) a textured square (a third of the frame) moving 3 px right and 2 px down per frame
    over a still textured scene."""
    import numpy as np

    pan = _texture((size, size + 2 * T), 2.0, seed=0)
    scene, patch = _texture((size, size), 2.0, seed=1), _texture((size // 3, size // 3), 1.5, seed=2)
    obj = np.repeat(scene[None], T, axis=0)
    for t in range(T):
        y, x = size // 6 + 2 * t, size // 6 + 3 * t
        obj[t, y:y + len(patch), x:x + len(patch)] = patch
    return {"pan": np.stack([pan[:, 2 * (T - t): 2 * (T - t) + size] for t in range(T)]), "object": obj}


def bench_flow(args: argparse.Namespace) -> None:
    """augment.farneback_torch against cv2.calcOpticalFlowFarneback with the same parameters
    (augment.FARNEBACK) on generated 16-frame clips: mean end-point error (px) over every pixel
    of the 15 frame pairs, and CPU ms per clip on one thread (median of --repeat)."""
    import cv2
    import numpy as np

    import augment

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    print(f"Farneback {augment.FARNEBACK}, 16-frame generated clips, 1 thread, median of {args.repeat}")
    print(f"{'clip':>7} {'size':>5} {'|flow| px':>9} {'EPE px':>9} {'max EPE':>9} {'OpenCV ms':>10} {'torch ms':>9}")
    for size in (112, 224):
        for name, grey in _flow_clips(size).items():
            opencv = lambda: np.stack([cv2.calcOpticalFlowFarneback(grey[t + 1], grey[t], None, **augment.FARNEBACK)
                                       for t in range(len(grey) - 1)])
            ours = lambda: augment.farneback_torch(torch.from_numpy(grey)[None].float(), **augment.FARNEBACK)[0]
            theirs = torch.from_numpy(opencv()).permute(0, 3, 1, 2)
            epe = (ours() - theirs).norm(dim=1)
            t_cv = np.median([_cpu_seconds(opencv)[0] for _ in range(args.repeat)])
            t_torch = np.median([_cpu_seconds(ours)[0] for _ in range(args.repeat)])
            print(f"{name:>7} {size:>5} {theirs.norm(dim=1).mean():9.3f} {epe.mean():9.2e} {epe.max():9.2e} "
                  f"{t_cv * 1e3:10.1f} {t_torch * 1e3:9.1f}")


BENCHES["flow"] = bench_flow

# ---- model -----------------------------------------------------------------
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import models

PAPER_SIZE = {"c3d": "112", "i3d": "224", "r3d18": "112/224 (both common)", "r3d34": "224",
              "mini": "ours (CPU default)"}


def forward_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[float, tuple[int, ...]]:
    """Forward FLOPs (2 x MACs, as FlopCounterMode counts) and output shape, on the meta
    device so that even I3D at 224 costs no compute."""
    model = model.to("meta")
    with FlopCounterMode(display=False) as counter:
        out = model(torch.empty(shape, device="meta"))
    return counter.get_total_flops(), tuple(out.shape[1:])


def bench_model(args: argparse.Namespace) -> None:
    """Forward+backward per 16x112x112 clip on the CPU for every arch, as GFLOP/s next to
    torchvision's r3d_18: the same work per FLOP should cost the same.

    The nets take turns, one step each per round, and each keeps its fastest round: a load
    spike from a neighbour then slows one round of every net, not all rounds of one."""
    batch = 2
    shape = (batch, 3, 16, 112, 112)
    builders = {arch: lambda a=arch: models.Classifier(a, 400) for arch in models.ARCHS}
    builders["torchvision r3d_18"] = lambda: torchvision.models.video.r3d_18(weights=None)
    x = torch.randn(shape)
    nets = {name: build().train() for name, build in builders.items()}
    flops = {name: forward_flops(build(), shape)[0] for name, build in builders.items()}
    best = dict.fromkeys(nets, float("inf"))
    for round_ in range(args.repeat + 1):  # round 0 warms up
        for name, model in nets.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            model(x).sum().backward()
            if round_ > 0:
                best[name] = min(best[name], time.perf_counter() - t0)
    ref = 3 * flops["torchvision r3d_18"] / best["torchvision r3d_18"]  # backward ~ 2 x forward
    print(f"forward+backward, batch {batch}, 16x112x112, {torch.get_num_threads()} threads, "
          f"fastest of {args.repeat} rounds")
    print(f"{'network':<20} {'s/clip':>8} {'GFLOPs/clip':>12} {'GFLOP/s':>8} {'vs tv':>6}")
    for name in nets:
        rate = 3 * flops[name] / best[name]
        print(f"{name:<20} {best[name] / batch:>8.3f} {flops[name] / batch / 1e9:>12.2f} "
              f"{rate / 1e9:>8.1f} {rate / ref:>6.2f}")


BENCHES["model"] = bench_model


def bench_model_table(args: argparse.Namespace) -> None:
    """The README's table of backbones: parameters, GFLOPs and last feature map per clip."""
    print("| arch | params | GFLOPs 16x112 | GFLOPs 16x224 | map at 16x112 | map at 16x224 | paper input |")
    print("|---|---|---|---|---|---|---|")
    for arch in models.ARCHS:
        with torch.device("meta"):
            backbone = models.build_backbone(arch)
        params = sum(p.numel() for p in backbone.parameters())
        cells = [forward_flops(backbone, (1, 3, 16, s, s)) for s in (112, 224)]
        gflops = [f"{flops / 1e9:.2f}" for flops, _ in cells]
        maps = ["x".join(map(str, out)) for _, out in cells]
        print(f"| {arch} | {params / 1e6:.2f} M | {' | '.join(gflops)} | {' | '.join(maps)} "
              f"| {PAPER_SIZE[arch]} |")


BENCHES["model-table"] = bench_model_table


# ---- train -----------------------------------------------------------------
def hara_r3d18_from_torchvision() -> torch.nn.Module:
    """models.build_backbone("r3d18") assembled from torchvision's video-ResNet parts: Hara's
    7x7x7 stem, BasicBlocks [2, 2, 2, 2], shortcut B, no pooling head."""
    from torchvision.models.video.resnet import BasicBlock, Conv3DSimple, VideoResNet

    stem = torch.nn.Sequential(torch.nn.Conv3d(3, 64, 7, (1, 2, 2), 3, bias=False), torch.nn.BatchNorm3d(64),
                               torch.nn.ReLU(inplace=True), torch.nn.MaxPool3d(3, 2, 1))
    net = VideoResNet(BasicBlock, [Conv3DSimple] * 4, [2, 2, 2, 2], lambda: stem)
    net.avgpool, net.fc = torch.nn.Identity(), torch.nn.Identity()
    backbone = torch.nn.Sequential(*list(net.children())[:5])  # stem, layer1..layer4
    backbone.out_channels = 512
    return backbone


def time_dsm_steps(model: torch.nn.Module, views: torch.Tensor, steps: int) -> float:
    """Seconds per DSM step (f_q forward+backward on a and n, f_k forward on p, SGD) on a fixed batch."""
    import pretrain

    args = pretrain.parse_args(["--loss", "both", "--moco-k", "64", "--batch-size", str(len(views))])
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    video = torch.arange(len(views))
    return timeit(lambda: pretrain.train_step(model, views, video, optimizer, scaler, args, None), repeat=steps)


def bench_train(args: argparse.Namespace) -> None:
    """A DSM training step: our r3d18 against the same network from torchvision parts
    (target: at most 1.1x its time), and the default `mini` run's clips/s and data wait."""
    import pretrain

    torch.manual_seed(0)
    views = torch.randn(4, 3, 3, 8, 64, 64)  # (B, a/p/n, C, T, H, W)
    ours = pretrain.DSM("r3d18", K=64)
    theirs = pretrain.DSM("r3d18", K=64)
    for encoder in (theirs.encoder_q, theirs.encoder_k):
        encoder.backbone = hara_r3d18_from_torchvision()
    theirs.encoder_k.load_state_dict(theirs.encoder_q.state_dict())
    t_ours, t_theirs = (time_dsm_steps(m, views, args.repeat) for m in (ours, theirs))
    print(f"DSM step, r3d18, batch 4 triplets of 8x64x64, {torch.get_num_threads()} threads, median of {args.repeat}")
    print(f"  ours {t_ours:.3f} s | torchvision parts {t_theirs:.3f} s | ratio {t_ours / t_theirs:.2f} (target <= 1.1)")
    print("default run (python pretrain.py: mini, synthetic 8x64x64, batch 16), 20 steps:")
    for workers in (0, 2):
        run = pretrain.parse_args(["--num-train", "320", "--workers", str(workers)])
        loader = pretrain.pretrain_loader(run, rank=0, world=1)
        model = pretrain.DSM(run.arch, K=run.moco_k, bn_splits=4)  # what a single-process run builds
        optimizer = pretrain.make_optimizer(model.encoder_q.parameters(), run)
        stats = pretrain.train_one_epoch(model, loader, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                                         run, 0, torch.device("cpu"))
        print(f"  workers {workers}: {stats['clips_per_s']:.1f} triplets/s, data wait {stats['data_wait']:.0%}")


BENCHES["train"] = bench_train


# ---- crops -----------------------------------------------------------------
def object_in_crop(scale: tuple[float, float], views: int = 4000, size: int = 64) -> tuple[float, float]:
    """Share of random resized crops of synthetic training frames that keep under half of the moving
    object, and the mean share of the object they keep (boxes clipped to the frame)."""
    import numpy as np

    import augment
    import data

    side = data.short_side_for(size)
    source = data.SyntheticVideos("train", 200, short_side=side)
    b, rng = augment.BasicAugment(size, scale), np.random.default_rng(0)
    kept = []
    for _ in range(views):
        i, t = int(rng.integers(len(source))), int(rng.integers(source.num_frames))
        top, left, h, w = b.crop_box(side, side, rng)
        x0, y0, x1, y1 = np.clip(source.box(i, t), 0, side)
        inside = max(0, min(x1, left + w) - max(x0, left)) * max(0, min(y1, top + h) - max(y0, top))
        kept.append(inside / max((x1 - x0) * (y1 - y0), 1e-9))
    kept = np.array(kept)
    return float((kept < 0.5).mean()), float(kept.mean())


def bench_crops(args: argparse.Namespace) -> None:
    """How often the synthetic default crop loses the moving object, for several crop scales: the
    number behind `--crop-scale 0.6 1` on the synthetic data (the object is ~16 of 73 pixels)."""
    print("crop area scale | views keeping < half the object | mean share of the object kept")
    for scale in ((0.3, 1.0), (0.5, 1.0), (0.6, 1.0), (0.8, 1.0), (1.0, 1.0)):
        lost, mean = object_in_crop(scale)
        print(f"  {scale[0]:.1f}-{scale[1]:.1f}        | {lost:6.1%}                          | {mean:.1%}")


BENCHES["crops"] = bench_crops


# ---- retrieval -------------------------------------------------------------
import json
import math
import os
import subprocess
import sys

import torch

OWN_FLAGS: set[str] = set()  # benches that parse the flags main() does not know, from args.rest


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def peak_memory_of(fn: Callable[[], object]) -> tuple[float, int]:
    """Seconds of fn() and its peak resident memory above the start, in bytes. Linux's high-water
    mark VmHWM is reset through /proc/self/clear_refs, so each call is measured on its own
    (torch's allocator bypasses tracemalloc, and ru_maxrss never goes down)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = _proc_status_bytes("VmRSS")
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0, _proc_status_bytes("VmHWM") - start


def bench_retrieval(args: argparse.Namespace) -> None:
    """retrieve.recall_at_k on UCF101-sized random features against one plain `query @ gallery.T`
    of the same sizes (target: at most 1.3x its time, and never the N x M x D tensor). Each is timed once:
    at these sizes one call is ~4 TFLOP. Flags: --gallery 10000 --queries 4000 --dim 50000."""
    import retrieve

    parser = argparse.ArgumentParser(prog="bench.py retrieval")
    parser.add_argument("--gallery", type=int, default=10000, help="gallery items M (default: 10000)")
    parser.add_argument("--queries", type=int, default=4000, help="queries N (default: 4000)")
    parser.add_argument("--dim", type=int, default=50000, help="feature size D (default: 50000)")
    sizes = parser.parse_args(args.rest)
    generator = torch.Generator().manual_seed(0)
    gallery, query = torch.empty(sizes.gallery, sizes.dim), torch.empty(sizes.queries, sizes.dim)
    for features in (gallery, query):  # filled in place, block by block: no second copy
        for i in range(0, len(features), 1000):
            features[i:i + 1000].normal_(generator=generator)
    gallery_labels, query_labels = (torch.randint(101, (n,), generator=generator)
                                    for n in (sizes.gallery, sizes.queries))
    t_ours, mem_ours = peak_memory_of(lambda: retrieve.recall_at_k(query, query_labels, gallery, gallery_labels))
    t_ref, mem_ref = peak_memory_of(lambda: query @ gallery.T)
    gib = lambda b: f"{b / 2 ** 30:.2f} GiB"
    print(f"{sizes.queries} queries x {sizes.gallery} gallery x {sizes.dim}-d float32 (features "
          f"{gib(4 * (sizes.queries + sizes.gallery) * sizes.dim)}), {torch.get_num_threads()} threads, one call each")
    print(f"  recall_at_k (K = 1..50)    {t_ours:7.1f} s  peak +{gib(mem_ours)}")
    print(f"  query @ gallery.T          {t_ref:7.1f} s  peak +{gib(mem_ref)}  (the full N x M matrix)")
    print(f"  ratio {t_ours / t_ref:.2f} (target <= 1.3: {'ok' if t_ours / t_ref <= 1.3 else 'MISSED'}); "
          f"the N x M x D tensor recall_at_k never allocates: {gib(4 * sizes.queries * sizes.gallery * sizes.dim)}")


BENCHES["retrieval"] = bench_retrieval
OWN_FLAGS.add("retrieval")


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


def _results_one_seed(opts: argparse.Namespace, seed: int) -> dict[str, dict[str, float]]:
    """Every run of one seed, then the table's cells of every row."""
    out = os.path.join(opts.out, f"seed{seed}")
    flag = lambda name, value: [] if value is None else [f"--{name}={value}"]
    shared = [f"--seed={seed}", f"--data-seed={seed}"]  # a new draw of the synthetic videos and of the run
    for name in RESULT_SHARED_FLAGS:
        shared += flag(name, getattr(opts, name.replace("-", "_")))
    finetune = [*shared, "--eval-train", "--resume", *flag("epochs", opts.finetune_epochs)]
    pretrain = [*shared, "--resume", *flag("epochs", opts.pretrain_epochs), *flag("moco-k", opts.moco_k)]
    folder = {row: os.path.join(out, name) for row, (name, _) in RESULT_ROWS.items()}
    # supervised = fine-tuning every weight from random init; its backbone is then probed like the others
    _results_stage("finetune.py", [*finetune, "--protocol=full", "--pretrained=none"],
                   os.path.join(folder["supervised"], "full"))
    backbone = {"random init": "none", "supervised": os.path.join(folder["supervised"], "full", "checkpoint.pth")}
    for row, (_, flags) in RESULT_ROWS.items():
        if flags is not None:
            _results_stage("pretrain.py", [*pretrain, *flags], folder[row])
            backbone[row] = os.path.join(folder[row], "checkpoint.pth")
            _results_stage("finetune.py", [*finetune, "--protocol=full", f"--pretrained={backbone[row]}"],
                           os.path.join(folder[row], "full"))
    for row, path in backbone.items():
        _results_stage("finetune.py", [*finetune, "--protocol=linear", f"--pretrained={path}"],
                       os.path.join(folder[row], "linear"))
        _results_stage("retrieve.py", [*shared, f"--pretrained={path}"], os.path.join(folder[row], "retrieve"))
    rows = {}
    for row in RESULT_ROWS:  # random init's kNN: the DSM run's report on its randomly initialised twin
        random_init = row == "random init"
        knn = _knn_cells(folder["DSM"] if random_init else folder[row], random_init)
        rows[row] = {**knn, **_results_row(folder[row], folder["supervised"])}
    for row, (name, flags) in ABLATION_ROWS.items():
        _results_stage("pretrain.py", [*pretrain, *flags], os.path.join(out, name))
        rows[row] = _knn_cells(os.path.join(out, name))
    return rows


def _knn_cells(folder: str, random_init: bool = False) -> dict[str, float]:
    """The kNN monitor's final motion and scene top-1 from a pretraining's log (or its random-init twin);
    NaN where the row has no pretraining (supervised)."""
    if not os.path.exists(os.path.join(folder, "log.jsonl")):
        return {"kNN motion": math.nan, "kNN scene": math.nan}
    with open(os.path.join(folder, "log.jsonl")) as f:
        last = json.loads(f.read().splitlines()[-1])
    suffix = "_random_init" if random_init else ""
    return {"kNN motion": last["knn_top1" + suffix], "kNN scene": last["knn_scene_top1" + suffix]}


def _results_row(folder: str, supervised: str) -> dict[str, float]:
    """The cells of one row, from its runs' results.json; fine-tuning a random init is the supervised run."""
    def read(*path: str) -> dict:
        with open(os.path.join(*path, "results.json")) as f:
            return json.load(f)

    linear, retrieval = read(folder, "linear"), read(folder, "retrieve")
    full = read(folder if os.path.isdir(os.path.join(folder, "full")) else supervised, "full")
    return {"linear top-1": linear["video_top1"], "linear train top-1": linear["train_video_top1"],
            "fine-tune top-1": full["video_top1"], "fine-tune train top-1": full["train_video_top1"],
            "R@1": retrieval["recall@1"], "R@5": retrieval["recall@5"]}


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


def bench_results(args: argparse.Namespace) -> None:
    """The README's synthetic results table: rows random init, supervised, MoCo baseline,
    DSM (Triplet), DSM, then the miniature of Table 4 (pretraining and its kNN only); columns the
    pretraining's kNN top-1 on the motion classes and on the scene, video top-1 (%) of the linear
    probe and of fine-tuning on the scene-independent test split and on the scene-biased train
    split, retrieval R@1 and R@5. Seed S draws both the synthetic videos and the runs.
    Every run lands in OUT/seedS/<row>/...; a finished run is not run again, so a killed table
    resumes. Prints the markdown table and the targets (a lead of TARGET_LEAD points on every seed),
    and writes both to OUT/table.md.

        python bench.py results                                   # the full table: 21 runs per seed, each 4-8 min on 2 cores
        python bench.py results --seeds 0 1 2                     # mean +- std over three seeds
        python bench.py results --pretrain-epochs 1 --finetune-epochs 1 --num-train 32 --num-test 16 \\
            --size 32 --clip-len 4 --batch-size 8 --moco-k 16 --out runs/results_smoke   # smoke test
        python bench.py results -- --help                         # these flags
    """
    import numpy as np

    parser = argparse.ArgumentParser(prog="bench.py results")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="one table per seed, then mean +- std (default: 0)")
    parser.add_argument("--pretrain-epochs", type=int, default=None,
                        help="every pretraining (default: pretrain.py's, 6 on synthetic)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="every probe and fine-tuning (default: finetune.py's, 12)")
    parser.add_argument("--out", default="runs/results", help="run folder (default: runs/results)")
    parser.add_argument("--moco-k", type=int, default=None,
                        help="queue length of every pretraining (default: pretrain.py's)")
    for name in RESULT_SHARED_FLAGS:
        parser.add_argument(f"--{name}", type=int, default=None, help="passed to every stage (default: the stage's own)")
    opts = parser.parse_args(args.rest)
    per_seed = [_results_one_seed(opts, seed) for seed in opts.seeds]
    columns = list(next(iter(per_seed[0].values())))
    cell = lambda values: "—" if np.isnan(values).any() else \
        f"{np.mean(values):.1f}" + (f" ± {np.std(values, ddof=1):.1f}" if len(values) > 1 else "")
    lines = [f"| | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for row in per_seed[0]:
        lines.append(f"| {row} | " + " | ".join(cell([seed[row].get(c, math.nan) for seed in per_seed])
                                                for c in columns) + " |")
    config = {k: v for k, v in vars(opts).items() if v is not None and k != "out"}
    table = "\n".join([f"Synthetic scene/motion data, video top-1 and Recall@K in %, {config}.", "",
                       *lines, "", "Fine-tuning from random init is the supervised run: the two rows share it.", "",
                       f"Targets, a lead of at least {TARGET_LEAD:.0f} points on every seed:",
                       *_target_lines(per_seed, opts.seeds)])
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


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
    with open(os.path.join(out, log)) as f:
        record = json.loads(f.read().strip().splitlines()[-1]) if log.endswith(".jsonl") else json.load(f)
    return {**row, **{k: v for k, v in record.items() if k != "args"}}


def _gpu_commands(layout: list[str], workers: int, out: str, paper: list[str] = GPU_PAPER,
                  queue: int = 32) -> dict[str, tuple]:
    """Every run of the GPU check: row name -> (command, run folder, the file its figures are read from).
    The queue must be shorter than the training set (96 videos: 12 steps an epoch)."""
    pretrain = [sys.executable, "pretrain.py", *layout, *paper, "--moco-k", str(queue), "--epochs", "2",
                "--bn-splits", "1", "--knn-every", "0", "--workers", str(workers)]
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
    parser.add_argument("which", choices=sorted(BENCHES), help="which hot path to measure")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions, median reported (default: 5)")
    args, args.rest = parser.parse_known_args()  # the rest: flags of the benches in OWN_FLAGS
    if args.rest and args.which not in OWN_FLAGS:
        parser.error(f"unrecognized arguments: {' '.join(args.rest)}")
    BENCHES[args.which](args)


if __name__ == "__main__":
    main()
