"""Speed and memory of the hot paths, as ratios against their references (DESIGN section 7).

Every number is measured side by side in one run on this machine, so the ratios hold on
a noisy shared machine where absolute times do not.

    python bench.py augment     # TPS warp, flow-scaled negative, one triplet from a file
    python bench.py model       # forward+backward per clip and GFLOP/s for every arch
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
def _moving_video(path: str, frames: int = 100, height: int = 240, width: int = 320) -> None:
    """Write an mpeg4 video of a smooth texture panning right with a bright square crossing it."""
    import av
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    texture = cv2.GaussianBlur(rng.random((height, width + 2 * frames, 3)).astype(np.float32), (0, 0), 4.0)
    texture = ((texture - texture.min()) / (texture.max() - texture.min()) * 255).astype(np.uint8)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
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


def bench_augment(args: argparse.Namespace) -> None:
    """TPS warp, flow-scaled negative and one whole triplet, each against its reference (DESIGN section 7)."""
    import os
    import tempfile

    import cv2
    import numpy as np
    import torch
    import torch.nn.functional as F

    import augment

    # Augmentations run inside DataLoader workers, which torch gives one thread each; with two
    # threads on a busy small machine every torch op waits on a descheduled thread (~4-16 ms).
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    def side_by_side(fn: Callable[[], object], reference: Callable[[], object]) -> tuple[float, float]:
        """Medians of fn and reference timed in alternation, so a burst of load hits both alike."""
        timeit(fn, 1, warmup=3), timeit(reference, 1, warmup=3)
        pairs = [(timeit(fn, 1, warmup=0), timeit(reference, 1, warmup=0)) for _ in range(2 * args.repeat + 1)]
        return float(np.median([a for a, _ in pairs])), float(np.median([b for _, b in pairs]))

    rng = np.random.default_rng(0)
    rows = []  # (what, reference, ms, reference ms, target or None)

    clip = torch.rand(3, 16, 112, 112)  # (C, T, H, W)
    warp = augment.TPSWarp(112, 112)
    ready = warp.grid(warp.sample_src(rng))[None]
    bare = lambda: F.grid_sample(clip.reshape(1, 48, 112, 112), ready, padding_mode="border", align_corners=False)
    rows.append(("TPS warp 3x16x112x112", "bare grid_sample", *side_by_side(lambda: warp(clip, rng), bare), 2.0))
    try:
        import kornia  # noqa: F401
        print("kornia is installed but not measured: compare by hand")
    except ImportError:
        print("kornia TPS: not installed, skipped")

    with tempfile.TemporaryDirectory() as tmp:
        video = os.path.join(tmp, "moving.mp4")
        _moving_video(video)
        anchor = [4 * i for i in range(16)]  # 16 x 4 clip, tau = 10 (Eq. 4)
        decode, decoder = _clip_reader(video, anchor + [i + 10 for i in anchor], short_side=128)
        frames = decode()  # (2T, H, W, 3): anchor then shifted frames
        view = augment.BasicAugment(112, jitter=0.0)(frames[:16], rng)  # (C, T, 112, 112) real content
        grey = augment.grey_uint8(view)
        raw = lambda: [cv2.calcOpticalFlowFarneback(grey[t + 1], grey[t], None, **augment.FARNEBACK) for t in range(15)]

        def negative():
            phi = torch.from_numpy(rng.uniform(0, 5.0, size=15)).float()
            return augment.scale_motion(view, augment.farneback_flow(view), phi)

        rows.append(("flow-scaled negative 16x112x112", "raw Farneback calls", *side_by_side(negative, raw), 1.2))

        triplet = augment.DSMTriplet(112)

        def sample():
            both = decode()
            return triplet(both[:16], both[16:], rng)

        def decode_and_flow():
            decode()
            raw()

        t_triplet, t_decode = side_by_side(sample, decode)
        rows.append((f"triplet, 320x240 mpeg4 at {frames.shape[1]}x{frames.shape[2]}", decoder, t_triplet, t_decode, None))
        rows.append(("  same", "decode + raw Farneback", *side_by_side(sample, decode_and_flow), 2.0))

    print(f"torch threads {torch.get_num_threads()}, cv2 threads {cv2.getNumThreads()}, "
          f"medians of {2 * args.repeat + 1} alternating calls")
    print(f"{'hot path':36s} {'reference':26s} {'ms':>7s} {'ref ms':>7s} {'ratio':>6s}  target")
    for what, reference, t, t_ref, target in rows:
        verdict = "" if target is None else f"<= {target:.1f} {'ok' if t / t_ref <= target else 'MISSED'}"
        print(f"{what:36s} {reference:26s} {t * 1e3:7.2f} {t_ref * 1e3:7.2f} {t / t_ref:6.2f}  {verdict}")


BENCHES["augment"] = bench_augment

# (bench_augment goes here)

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
    torchvision's r3d_18: the same work per FLOP should cost the same (DESIGN section 7).

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
# (bench_model goes here)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=sorted(BENCHES), help="which hot path to measure")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions, median reported (default: 5)")
    args = parser.parse_args()
    BENCHES[args.which](args)


if __name__ == "__main__":
    main()
