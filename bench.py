"""Speed and memory of the hot paths as ratios against their references (timed side by side in one run, so they
hold on a noisy machine where absolute times do not), the synthetic results table, and the GPU check.
`python bench.py WHICH --help` shows the flags of WHICH; the benches are listed below."""
import argparse
import copy
import json
import os
import shutil
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
from torchvision.models.video.resnet import BasicBlock, Conv3DSimple, VideoResNet

import augment
import data
import pretrain
import retrieve

CPU = time.process_time  # every thread of the process (FFmpeg decodes with several), no neighbour's load
HERE = os.path.dirname(os.path.abspath(__file__))  # where the stage scripts run
PAPER_CLIPS = dict(clip_len=16, stride=4, shift=(2, 20))  # 16 x 4 frames, and the same tau ~ U[2, 20] later


def _seconds(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> tuple[float, object]:
    t0 = clock()
    out = fn()
    return clock() - t0, out


def side_by_side(fn: Callable[[], object], reference: Callable[[], object], repeat: int,
                 clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """Medians of 2 x repeat + 1 alternating timings after an untimed call of each: load bursts hit both alike."""
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
    """One torch and one OpenCV thread, as in a DataLoader worker: two on a busy small machine wait on each other."""
    torch.set_num_threads(1), cv2.setNumThreads(1)


def _moving_video(path: str, frames: int = 100, height: int = 240, width: int = 320, codec: str = "mpeg4",
                  keyint: int | None = None) -> None:
    """A smooth random texture panning under a bright square; `keyint` matters to seeking (None: the encoder's)."""
    noise = cv2.GaussianBlur(np.random.default_rng(0).random((height, width + 2 * frames, 3)).astype(np.float32),
                             (0, 0), 4.0)
    texture = ((noise - noise.min()) / (noise.max() - noise.min()) * 255).astype(np.uint8)
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
    """CPU seconds of one DSM triplet from `path`: per stage, whole, the device path's worker; medians of `samples`."""
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
        runs.append(t)
    return {k: float(np.median([t[k] for t in runs])) for k in runs[0]}


# ---- augment, data: the CPU data path ---------------------------------
def bench_augment(args: argparse.Namespace) -> None:
    """TPS warp, flow-scaled negative, a triplet from a file, each against its reference, on one thread."""
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
                  ("triplet, short side 128, crops 112", "its decode + Farneback", m["total"],
                   m["decode"] + m["Farneback"], "<= 2")])


def bench_data(args: argparse.Namespace) -> None:
    """The paper's data path per core, stage by stage; a sample's decode from raw against prepared H.264."""
    _one_thread()
    with tempfile.TemporaryDirectory() as tmp:
        video, raw, prepared = (os.path.join(tmp, name) for name in ("v.mp4", "raw.mp4", "prepared.mp4"))
        _moving_video(video, 300, 272, 640, codec="libx264")  # x264's keyframe every 250
        stages = {size: triplet_stages(video, size, args.repeat) for size in (224, 112)}
        _moving_video(raw, frames=250, height=720, width=1280, codec="libx264")  # one keyframe
        prepare, _ = _seconds(lambda: data.prepare_video(raw, prepared, 256, 16), CPU)  # short side 256
        datasets = [data.ClipDataset(data.VideoFiles([data.VideoRecord(path, 0)], data.short_side_for(224)),
                                     **PAPER_CLIPS) for path in (raw, prepared)]
        seconds = [[_seconds(lambda: d[i], CPU)[0] for d in datasets] for i in range(args.repeat)]  # alternating
    columns = ("decode", "b", "s", "Farneback", "flow scaling", "total")
    print(f"one DSM triplet from 640x272 H.264, CPU ms, 1 torch/OpenCV thread, median of {args.repeat} samples")
    print(f"{'crop':>5} " + " ".join(f"{c:>12}" for c in columns) + f" {'triplets/s/core':>16}")
    for size, m in stages.items():
        print(f"{size:>5} " + " ".join(f"{m[c] * 1e3:12.1f}" for c in columns) + f" {1 / m['total']:16.2f}")
    raw, prepared = np.median(seconds, axis=0)
    m = stages[224]
    print_ratios([("224: device path's worker (decode, draws)", "the decode alone", m["worker"], m["decode"], "<= 1.2"),
                  ("224: CPU path (decode, b, s, t)", "the decode alone", m["total"], m["decode"], None),
                  ("a sample from raw 1280x720 H.264", "from its prepared copy", raw, prepared, ">= 3")])
    print(f"preparing the 250 frames once cost {prepare:.2f} s CPU ({prepare / 250 * 1e3:.1f} ms per frame)")


def bench_train(args: argparse.Namespace) -> None:
    """A DSM step (f_q on a and n, f_k on p, SGD) of our r3d18 against the same net from torchvision's parts."""
    torch.manual_seed(0)
    views = torch.randn(4, 3, 3, 8, 64, 64)  # (B, a/p/n, C, T, H, W)
    step_args = pretrain.parse_args(["--loss", "both", "--moco-k", "64", "--batch-size", str(len(views))])
    steps, scaler = [], torch.amp.GradScaler("cpu", enabled=False)
    for torchvision_parts in (False, True):
        model = pretrain.DSM("r3d18", K=64)
        if torchvision_parts:  # Hara's 7x7x7 stem, BasicBlocks [2, 2, 2, 2]
            stem = torch.nn.Sequential(torch.nn.Conv3d(3, 64, 7, (1, 2, 2), 3, bias=False), torch.nn.BatchNorm3d(64),
                                       torch.nn.ReLU(inplace=True), torch.nn.MaxPool3d(3, 2, 1))
            net = VideoResNet(BasicBlock, [Conv3DSimple] * 4, [2, 2, 2, 2], lambda: stem)
            model.encoder_q.backbone = torch.nn.Sequential(*list(net.children())[:5])  # stem, layer1..4: no head
            model.encoder_q.backbone.out_channels = 512
            model.encoder_k = copy.deepcopy(model.encoder_q).requires_grad_(False)  # f_k as DSM builds it
        optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=1e-3, momentum=0.9)
        steps.append(lambda m=model, o=optimizer: pretrain.train_step(m, views, torch.arange(len(views)), o, scaler,
                                                                      step_args, None))
    print(f"wall time, {torch.get_num_threads()} threads, medians of {2 * args.repeat + 1} alternating steps")
    print_ratios([("DSM step, r3d18, 4 triplets of 8x64x64", "the same from torchvision's parts",
                   *side_by_side(*steps, args.repeat), "<= 1.1")])


def peak_memory_of(fn: Callable[[], object]) -> tuple[float, int]:
    """Seconds of fn() and its peak RSS above the start (VmHWM reset: torch bypasses tracemalloc, ru_maxrss stays)."""
    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    start = status("VmRSS")
    return _seconds(fn)[0], status("VmHWM") - start


def bench_retrieval(args: argparse.Namespace) -> None:
    """Blocked top-k against one matmul, and its memory; one call each (~4 TFLOP at the defaults)."""
    generator = torch.Generator().manual_seed(0)
    gallery, query = torch.empty(args.gallery, args.dim), torch.empty(args.queries, args.dim)
    for features in (gallery, query):  # filled in place, block by block: no second copy
        for i in range(0, len(features), 1000):
            features[i:i + 1000].normal_(generator=generator)
    labels = [torch.randint(101, (size,), generator=generator) for size in (args.queries, args.gallery)]
    t_ours, mem_ours = peak_memory_of(lambda: retrieve.recall_at_k(query, labels[0], gallery, labels[1]))
    t_ref, mem_ref = peak_memory_of(lambda: query @ gallery.T)
    gib = lambda size: f"{size / 2 ** 30:.2f} GiB"
    print(f"{args.queries} queries x {args.gallery} gallery x {args.dim}-d float32 (features "
          f"{gib(4 * (args.queries + args.gallery) * args.dim)}), {torch.get_num_threads()} threads, one call each")
    print_ratios([("recall_at_k, K = 1..50", "query @ gallery.T", t_ours, t_ref, "<= 1.3")])
    print(f"peak memory: recall_at_k +{gib(mem_ours)}, the N x M matrix +{gib(mem_ref)}; the N x M x D tensor "
          f"that recall_at_k never allocates: {gib(4 * args.queries * args.gallery * args.dim)}")


# ---- results: the README's synthetic table ---------------------------------
# row of the table: (folder, pretrain.py flags, or None for the rows that are not pretrained)
RESULT_ROWS = {"random init": ("random", None), "supervised": ("supervised", None),
               "MoCo baseline": ("moco", ["--positive=none", "--negative=none"]),
               "DSM (Triplet)": ("dsm_triplet", ["--loss=triplet"]), "DSM": ("dsm", ["--loss=contrastive"])}
# the miniature of the paper's Table 4: pretraining alone, judged by its kNN monitor (M-disturb is the DSM row)
ABLATION_ROWS = {"S-warp only": ("swarp", ["--negative=none"]), "S-warp + T-shift": ("tshift", ["--negative=shift"]),
                 "S-warp + Scaling-Of": ("scaling", ["--negative=flow"]), "DSM, both losses": ("both", ["--loss=both"])}
# the claim in numbers: (row, reference row, column, least mean lead, least lead on every seed); kNN top-1 moves
# in steps of 0.25 (400 test videos), so a least lead of 0.25 reads "more than 0"
TARGETS = [("DSM", "random init", "kNN motion", 10, 10), ("DSM", "MoCo baseline", "kNN motion", 10, 0.25),
           ("MoCo baseline", "DSM", "kNN scene", 0, 0.25), ("DSM (Triplet)", "MoCo baseline", "kNN motion", 10, 10),
           ("DSM", "supervised", "fine-tune top-1", 10, 10), ("DSM", "MoCo baseline", "fine-tune top-1", 0.25, None)]
RUN_CELLS = {"full": [("fine-tune top-1", "video_top1"), ("fine-tune train top-1", "train_video_top1")],
             "linear": [("linear top-1", "video_top1"), ("linear train top-1", "train_video_top1")],
             "retrieve": [("R@1", "recall@1"), ("R@5", "recall@5")]}  # the table's columns from each run's results.json
RESULT_SHARED_FLAGS = ("num-train", "num-test", "size", "clip-len", "stride", "batch-size", "workers")  # every stage


def _results_stage(script: str, flags: list[str], out: str) -> None:
    """python SCRIPT FLAGS --out OUT unless OUT/results.json exists (pretrain.py's --resume skips finished epochs)."""
    done, command = os.path.exists(os.path.join(out, "results.json")), [sys.executable, script, *flags, f"--out={out}"]
    print(f"[results] have {out}/results.json" if done else f"[results] {' '.join(command[1:])}", flush=True)
    if not done:
        subprocess.run(command, check=True, cwd=HERE)


def _results_one_seed(opts: argparse.Namespace, seed: int, ablation: bool,
                      probes: bool = True) -> dict[str, dict[str, float]]:
    """Every run of one seed into OUT/seedS/<row>/... (Table 4 rows only with `ablation`), then every row's cells."""
    flag = lambda name, value: [] if value is None else [f"--{name}={value}"]
    shared = [f"--seed={seed}", f"--data-seed={seed}"] + [  # a new draw of the synthetic videos and of the run
        f for name in RESULT_SHARED_FLAGS for f in flag(name, getattr(opts, name.replace("-", "_")))]
    finetune = [*shared, "--eval-train", "--resume", *flag("epochs", opts.finetune_epochs)]
    pretraining = [*shared, "--resume", *flag("epochs", opts.pretrain_epochs), *flag("moco-k", opts.moco_k)]
    folder = {row: os.path.join(opts.out, f"seed{seed}", f) for row, (f, _) in (RESULT_ROWS | ABLATION_ROWS).items()}
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
    for row, path in backbone.items() if probes else ():
        _results_stage("finetune.py", [*finetune, "--protocol=linear", f"--pretrained={path}"],
                       os.path.join(folder[row], "linear"))
        _results_stage("retrieve.py", [*shared, f"--pretrained={path}"], os.path.join(folder[row], "retrieve"))
    for row, (_, flags) in ABLATION_ROWS.items() if ablation else ():
        _results_stage("pretrain.py", [*pretraining, *flags], folder[row])
    cells = {}
    for row in folder:  # random init: the DSM run's kNN on its random twin, and the supervised run's fine-tuning
        random_init = row == "random init"
        log = os.path.join(folder["DSM" if random_init else row], "log.jsonl")
        last, twin = _record(log) if os.path.exists(log) else {}, "_random_init" if random_init else ""
        cells[row] = {"kNN motion": last.get(f"knn_top1{twin}", np.nan),
                      "kNN scene": last.get(f"knn_scene_top1{twin}", np.nan)}
        where = lambda run: folder["supervised" if random_init and run == "full" else row]
        runs = {run: _record(os.path.join(where(run), run, "results.json")) for run in RUN_CELLS
                if row in backbone and (probes or run == "full")}
        cells[row] |= {column: runs[run][key] for run, columns in RUN_CELLS.items() if run in runs
                       for column, key in columns}
    return cells


def _target_lines(per_seed: list[dict[str, dict[str, float]]], seeds: list[int]) -> list[str]:
    """One line per target: the lead on each seed, its mean, and whether both are enough (a missing run is no lead)."""
    lines = []
    for row, reference, column, least_mean, least_each in TARGETS:
        leads = np.array([cells[row][column] - cells[reference][column] for cells in per_seed])
        short = [str(s) for s, lead in zip(seeds, leads) if least_each is not None and not lead >= least_each]
        verdict = "met" if leads.mean() >= least_mean and not short else \
            "MISSED" + (f" on seed {', '.join(short)}" if short else " on the mean")
        need = f"mean >= {least_mean:g}" + (f", every seed >= {least_each:g}" if least_each is not None else "")
        lines.append(f"- {row} - {reference}, {column}: " + ", ".join(f"{lead:+.1f}" for lead in leads)
                     + f" (seeds {', '.join(map(str, seeds))}; mean {leads.mean():+.1f}); {need}: {verdict}")
    return lines


def plot_decoupling(per_seed: list[dict[str, dict[str, float]]], path: str) -> list[str]:
    """kNN top-1 on motion (x) against scene (y) per row with a kNN, mean +- sd over seeds; returns the rows drawn."""
    from matplotlib.figure import Figure  # not pyplot: a file, no display, no figure kept alive

    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
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
    return drawn


def _cell(values: list[float]) -> str:
    """mean +- sd over the seeds that have the value, and how many when some have not (Table 4 rows, a failed run)."""
    have = [v for v in values if not np.isnan(v)]
    if not have:
        return "—"
    spread = f" ± {np.std(have, ddof=1):.1f}" if len(have) > 1 else ""
    return f"{np.mean(have):.1f}{spread}" + (f" ({len(have)} seeds)" if len(have) < len(values) else "")


def bench_results(args: argparse.Namespace) -> None:
    """The README's synthetic results table and its figure (every stage, hours).
    Rows: random init, supervised, MoCo baseline, DSM (Triplet), DSM, then a miniature Table 4 (kNN only). Runs land
    in OUT/seedS/<row>/... and a killed table resumes; the table and targets go to OUT/table.md, the plot to --figure.
        python bench.py results --seeds 0 1 2    # mean +- std; 21 runs a seed (17 past --ablation-seeds)
        python bench.py results --pretrain-epochs 1 --finetune-epochs 1 --num-train 32 --num-test 16 --size 32 \\
            --clip-len 4 --batch-size 8 --moco-k 16 --out /tmp/results_smoke --figure /tmp/results_smoke.png  # smoke
    """
    for i, seed in enumerate(args.seeds):  # the main rows of every seed before any Table 4 row: they are the claim
        _results_one_seed(args, seed, False, i < args.probe_seeds)
    per_seed = [_results_one_seed(args, seed, i < args.ablation_seeds, i < args.probe_seeds)
                for i, seed in enumerate(args.seeds)]
    columns = list(per_seed[0]["random init"])
    lines = [f"| | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for row in per_seed[0]:
        lines.append(f"| {row} | " + " | ".join(_cell([cells[row].get(c, np.nan) for cells in per_seed])
                                                for c in columns) + " |")
    config = {k: v for k, v in vars(args).items() if v is not None and k not in ("repeat", "which", "out", "figure")}
    table = "\n".join([f"Synthetic scene/motion data, video top-1 and Recall@K in %, {config}.", "",
                       *lines, "", "Fine-tuning from random init is the supervised run: the two rows share it.", "",
                       "Targets, the lead of the first row over the second:",
                       *_target_lines(per_seed, args.seeds)])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    plot_decoupling(per_seed, args.figure)
    print(f"-> {os.path.join(args.out, 'table.md')}, {args.figure}")


# ---- gpu: the CUDA paths on this machine's GPU, in one command ---------------
GPU_CLASSES = ("PanA", "PanB")  # two class folders of identical generated videos: speed, not accuracy
GPU_PAPER = ["--arch", "i3d", "--size", "224", "--clip-len", "16", "--stride", "4", "--batch-size", "8"]


def _gpu_videos(root: str, train_per_class: int, test_per_class: int, frames: int = 120,
                height: int = 240, width: int = 320) -> list[str]:
    """UCF101-layout copies of one generated H.264 video (decoding costs the same) under ROOT; returns their flags."""
    os.makedirs(os.path.join(root, "splits"), exist_ok=True)
    source = os.path.join(root, "source.mp4")  # MP4 under .avi names: PyAV stamps H.264 in AVI a frame late
    _moving_video(source, frames, height, width, codec="libx264", keyint=16)
    lines = {"train": [], "test": []}
    for label, name in enumerate(GPU_CLASSES, 1):
        os.makedirs(os.path.join(root, "videos", name), exist_ok=True)
        for group in range(1, train_per_class + test_per_class + 1):
            rel = f"{name}/v_{name}_g{group:02d}_c01.avi"
            shutil.copyfile(source, os.path.join(root, "videos", rel))
            lines["train" if group <= train_per_class else "test"].append(f"{rel} {label}")  # testlist: optional
    for name, rows in (("classInd.txt", [f"{k} {c}" for k, c in enumerate(GPU_CLASSES, 1)]),
                       ("trainlist01.txt", lines["train"]), ("testlist01.txt", lines["test"])):
        with open(os.path.join(root, "splits", name), "w") as f:
            f.write("\n".join(rows) + "\n")
    return ["--dataset", "ucf101", "--root", os.path.join(root, "videos"), "--split-dir", os.path.join(root, "splits")]


def _gpu_views(video: str, device: str, size: int = 224, clip_len: int = 16, samples: int = 4) -> dict[str, float]:
    """The CPU path's views and OpenCV flow against the device path's: max and mean difference, end-point error."""
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
    proc = subprocess.run(command + ["--out", out], cwd=HERE, capture_output=True, text=True)
    row = {"wall_s": time.perf_counter() - t0}
    if proc.returncode != 0:
        return {**row, "error": (proc.stdout + proc.stderr).strip().splitlines()[-1:]}
    return {**row, **{k: v for k, v in _record(os.path.join(out, log)).items() if k != "args"}}


def _gpu_commands(layout: list[str], workers: int, out: str, paper: list[str] = GPU_PAPER,
                  queue: int = 32) -> dict[str, tuple]:
    """Row name -> (command, run folder, its figures' file); the queue must be shorter than the training set."""
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
    """The CUDA paths on this machine's GPU, one table (about 5 minutes): device path vs CPU path (views, flow);
    pretrain.py at the paper's setting (i3d, 224, 16 x 4, batch 8) in fp32, --amp, --channels-last, b/s/t on GPU or
    CPU, torchrun; finetune.py and retrieve.py --amp. "GPU share" is the step time not spent waiting for data."""
    if not torch.cuda.is_available():
        raise SystemExit("bench.py gpu: no CUDA GPU on this machine (torch.cuda.is_available() is False)")
    os.makedirs(args.out, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
              "native_bf16": torch.cuda.is_bf16_supported(including_emulation=False)}
    save = lambda: json.dump(report, open(os.path.join(args.out, "gpu.json"), "w"), indent=2)
    print(" | ".join(f"{k} {v}" for k, v in report.items()), flush=True)
    workers = max(1, len(os.sched_getaffinity(0)) - 1)
    with tempfile.TemporaryDirectory() as root:
        layout = _gpu_videos(root, train_per_class=48, test_per_class=4)
        report["views"] = _gpu_views(os.path.join(root, "source.mp4"), "cuda")
        print(" | ".join(f"{k} {v:.2e}" for k, v in report["views"].items()), flush=True)
        save()
        print(f"{'run (' + str(workers) + ' workers)':<42} {'samples/s':>10} {'data wait':>9} {'GPU share':>9} "
              f"{'peak GiB':>8} {'wall s':>7}", flush=True)
        for name, (command, out, log) in _gpu_commands(layout, workers, args.out).items():
            row = report[name] = _gpu_stage(command, out, log)
            per_s, wait, peak = row.get("clips_per_s"), row.get("data_wait"), row.get("peak_gpu_gib")
            cells = [f"{per_s:10.1f}" if per_s else " " * 10, f"{wait:9.0%}" if wait is not None else " " * 9,
                     f"{1 - wait:9.0%}" if wait is not None else " " * 9, f"{peak:8.2f}" if peak else " " * 8]
            print(f"{name:<42} " + (f"FAILED after {row['wall_s']:.0f} s: {row['error']}" if "error" in row
                                    else f"{' '.join(cells)} {row['wall_s']:7.0f}"), flush=True)
            save()
    print(f"-> {os.path.join(args.out, 'gpu.json')}")


BENCHES: dict[str, Callable[[argparse.Namespace], None]] = {
    "augment": bench_augment, "data": bench_data, "train": bench_train, "retrieval": bench_retrieval,
    "results": bench_results, "gpu": bench_gpu}
REPEAT = ("--repeat", int, argparse.SUPPRESS, "timed repetitions, median reported (default: 5)")
FLAGS = {  # (flag, type, default, help) of each bench; a list default takes one or more values
    "retrieval": [("--gallery", int, 10000, "gallery items M (default: 10000)"),
                  ("--queries", int, 4000, "queries N (default: 4000)"),
                  ("--dim", int, 50000, "feature size D (default: 50000)")],
    "results": [("--seeds", int, [0], "a table each, then mean +- std (default: 0)"),
                ("--ablation-seeds", int, 3, "the Table 4 rows on the first N of the seeds only (default: 3)"),
                ("--probe-seeds", int, 99, "linear probes and retrievals on the first N seeds only (default: all)"),
                ("--pretrain-epochs", int, None, "every pretraining (default: pretrain.py's, 6 on synthetic)"),
                ("--finetune-epochs", int, None, "every probe and fine-tuning (default: finetune.py's, 24)"),
                ("--out", str, "runs/results", "run folder (default: runs/results)"),
                ("--figure", str, "docs/decoupling.png", "the figure (default: docs/decoupling.png)"),
                ("--moco-k", int, None, "queue length of every pretraining (default: pretrain.py's)"),
                *((f"--{name}", int, None, "passed to every stage (default: the stage's own)")
                  for name in RESULT_SHARED_FLAGS)],
    "gpu": [("--out", str, "runs/gpu", "folder of gpu.json and the runs (default: runs/gpu)")]}


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    listing = [f"    python bench.py {name:<10} # {fn.__doc__.splitlines()[0]}" for name, fn in BENCHES.items()]
    parser = argparse.ArgumentParser(description=__doc__, epilog="\n".join(listing), formatter_class=raw)
    parser.add_argument("--repeat", type=int, default=5, help=REPEAT[3])  # before WHICH too, as it always was
    benches = parser.add_subparsers(dest="which", required=True, help="which bench to run")
    for name, fn in BENCHES.items():
        sub = benches.add_parser(name, description=fn.__doc__, formatter_class=raw)
        for flag, kind, default, help_ in FLAGS.get(name, [REPEAT]):  # SUPPRESS: --repeat before WHICH holds
            sub.add_argument(flag, type=kind, default=default, help=help_,
                             nargs="+" if isinstance(default, list) else None)
    args = parser.parse_args()
    BENCHES[args.which](args)


if __name__ == "__main__":
    main()
