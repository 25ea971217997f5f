"""Tests for the DSM reference implementation: `pytest test_dsm.py` (CPU, fast).

Sections follow the stages: data, augmentation, models, pretraining, fine-tuning and retrieval,
visualisation.
Every video file a test needs is written by the test itself with PyAV.
"""
import argparse
import copy
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.interpolate import RBFInterpolator
from torch.utils.flop_counter import FlopCounterMode

import augment
import data
import models
import pretrain


# Subprocesses run on the CPU: gloo tests on a GPU machine would otherwise pick NCCL and one device per
# rank, and the bit-identity tests would meet cuDNN's non-determinism.
CPU_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _cpu_unless_cuda(request, monkeypatch):
    """Every test sees a CPU-only machine, but those that ask for the `cuda` fixture."""
    if "cuda" not in request.fixturenames:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def cuda() -> torch.device:
    """The GPU for the tests that need one; they skip on a machine without."""
    if not HAS_CUDA:
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def free_port() -> int:
    """A TCP port no process listens on now, so parallel or repeated runs never clash on a fixed one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- data.py ---------------------------------------------------------------


def test_data_temporal_indices_loop():
    assert data.temporal_indices(10, 7, 4, 2) == [7, 9, 1, 3]
    assert data.temporal_indices(5, 3, 6, 1) == [3, 4, 0, 1, 2, 3]


def test_data_sample_shift_bounds():
    rng = np.random.default_rng(0)
    taus = [data.sample_shift(rng, 2, 20) for _ in range(3000)]
    assert all(isinstance(tau, int) for tau in taus)
    assert set(taus) == set(range(2, 21))  # inside [alpha1, alpha2], both ends reached
    with pytest.raises(ValueError):
        data.sample_shift(rng, 5, 2)


def test_data_test_starts_uniform():
    span = (16 - 1) * 4 + 1
    starts = data.test_starts(300, 16, 4, 10)
    gaps = np.diff(starts)
    assert len(starts) == 10 and starts[0] >= 0 and starts[-1] + span <= 300
    assert gaps.min() > 0 and gaps.max() - gaps.min() <= 1
    assert abs(starts[0] - (300 - span - starts[-1])) <= 1  # as much room before as after
    assert data.test_starts(100, 16, 4, 1) == [(100 - span) // 2]
    assert data.test_starts(40, 16, 4, 10) == [0] * 10  # shorter than a clip: loop from frame 0


def _data_files(root, names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_data_read_ucf101(tmp_path):
    root, splits = tmp_path / "videos", tmp_path / "splits"
    splits.mkdir()
    (splits / "classInd.txt").write_bytes(b"1 ApplyEyeMakeup\r\n2 HandstandPushups\r\n")
    train = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "HandstandPushups/v_HandStandPushups_g08_c01.avi"]
    test = ["HandstandPushups/v_HandStandPushups_g01_c01.avi"]
    (splits / "trainlist01.txt").write_bytes(f"{train[0]} 1\r\n{train[1]} 2\r\n".encode())
    (splits / "testlist01.txt").write_bytes(f"{test[0]}\r\n".encode())
    _data_files(root, train + test)
    records, classes = data.build_records("ucf101", str(root), str(splits), 1, True)
    assert classes == ["ApplyEyeMakeup", "HandstandPushups"]
    assert records == [data.VideoRecord(str(root / train[0]), 0), data.VideoRecord(str(root / train[1]), 1)]
    records, _ = data.build_records("ucf101", str(root), str(splits), 1, False)
    assert records == [data.VideoRecord(str(root / test[0]), 1)]
    (root / train[1]).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 .*v_HandStandPushups_g08_c01\.avi"):
        data.build_records("ucf101", str(root), str(splits), 1, True)
    (splits / "trainlist01.txt").write_text(f"{train[0]} 2\n")
    with pytest.raises(ValueError, match="disagrees"):
        data.read_ucf101(str(root), str(splits), 1, True)


def test_data_read_hmdb51(tmp_path):
    root, splits = tmp_path / "videos", tmp_path / "splits"
    splits.mkdir()
    (splits / "ride_bike_test_split1.txt").write_text("d.avi 2 \ne.avi 1 \n")
    (splits / "brush_hair_test_split1.txt").write_text("a.avi 1 \nb.avi 2 \nc.avi 0 \n")
    (splits / "brush_hair_test_split2.txt").write_text("a.avi 2 \nb.avi 1 \nc.avi 1 \n")
    _data_files(root, ["brush_hair/a.avi", "brush_hair/b.avi", "ride_bike/d.avi", "ride_bike/e.avi"])
    records, classes = data.build_records("hmdb51", str(root), str(splits), 1, True)
    assert classes == ["brush_hair", "ride_bike"]
    assert [(r.path, r.label) for r in records] == [(str(root / "brush_hair/a.avi"), 0), (str(root / "ride_bike/e.avi"), 1)]
    records, _ = data.build_records("hmdb51", str(root), str(splits), 1, False)
    assert [(r.path, r.label) for r in records] == [(str(root / "brush_hair/b.avi"), 0), (str(root / "ride_bike/d.avi"), 1)]
    with pytest.raises(FileNotFoundError, match="1 of the 2 .*c.avi"):  # split 2 trains on b.avi and c.avi
        data.build_records("hmdb51", str(root), str(splits), 2, True)


def test_data_read_kinetics(tmp_path):
    root, splits = tmp_path / "videos", tmp_path / "splits"
    splits.mkdir()
    header = "label,youtube_id,time_start,time_end,split\n"
    (splits / "train.csv").write_text(header + '"air drumming",abc,0,10,train\nabseiling,xyz,12,22,train\n')
    (splits / "validate.csv").write_text(header + "abseiling,v01,5,15,val\n")
    _data_files(root, ["train/air_drumming/abc_000000_000010.mp4", "train/abseiling/xyz.mp4",
                       "val/abseiling/v01_000005_000015.mp4"])
    records, classes = data.build_records("kinetics", str(root), str(splits), 1, True)
    assert classes == ["abseiling", "air drumming"]
    assert [(r.path, r.label) for r in records] == [
        (str(root / "train/air_drumming/abc_000000_000010.mp4"), 1), (str(root / "train/abseiling/xyz.mp4"), 0)]
    records, classes = data.build_records("kinetics", str(root), str(splits), 1, False)
    assert classes == ["abseiling", "air drumming"]
    assert [(r.path, r.label) for r in records] == [(str(root / "val/abseiling/v01_000005_000015.mp4"), 0)]
    (root / "train/abseiling/xyz.mp4").unlink()
    with pytest.raises(FileNotFoundError, match="1 of the 2 .*xyz_000012_000022.mp4"):
        data.build_records("kinetics", str(root), str(splits), 1, True)


def test_data_read_list(tmp_path):
    root, splits = tmp_path / "videos", tmp_path / "splits"
    splits.mkdir()
    (splits / "trainlist.txt").write_text("a/x.mp4 0\nb/with space.mp4 2\n")
    (splits / "testlist.txt").write_text("".join(f"c/{k}.mp4 1\n" for k in range(7)))
    _data_files(root, ["a/x.mp4", "b/with space.mp4", "c/0.mp4"])
    records, classes = data.build_records("list", str(root), str(splits), 1, True)
    assert classes == ["0", "1", "2"]
    assert [(r.path, r.label) for r in records] == [(str(root / "a/x.mp4"), 0), (str(root / "b/with space.mp4"), 2)]
    with pytest.raises(FileNotFoundError, match="6 of the 7") as error:
        data.build_records("list", str(root), str(splits), 1, False)
    assert "c/1.mp4" in str(error.value) and "c/5.mp4" in str(error.value) and "c/6.mp4" not in str(error.value)
    (splits / "trainlist.txt").write_text("a/x.mp4 0\na/y.mp4\n")
    with pytest.raises(ValueError, match=r"trainlist.txt:2: expected two fields"):
        data.build_records("list", str(root), str(splits), 1, True)


def _data_write_video(path, num_frames=40, width=64, height=48, fps=5, gop=8):
    """Frame t shows the bits of t as black/white vertical bands, so decoded frames can be told apart."""
    with av.open(str(path), "w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps, options={"sc_threshold": "1000000000"})  # keyframes every gop
        stream.width, stream.height, stream.pix_fmt, stream.gop_size = width, height, "yuv420p", gop
        for t in range(num_frames):
            bits = (t >> np.arange(8)) & 1  # (8,) one band of width / 8 pixels per bit
            image = np.repeat(255 * bits.astype(np.uint8), width // 8)[None, :, None].repeat(height, 0).repeat(3, 2)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def _data_frame_ids(frames):
    bands = frames[..., 0].reshape(len(frames), frames.shape[1], 8, -1).mean(axis=(1, 3)) > 128  # (N, 8)
    return [int(sum(int(bit) << k for k, bit in enumerate(row))) for row in bands]


def test_data_decode_frames(tmp_path):
    path = tmp_path / "v.avi"
    _data_write_video(path)
    source = data.VideoFiles([data.VideoRecord(str(path), 3)], short_side=24)
    seen = []
    asked = [30, 37, 31, 30, 39]  # far in (> 2 s at 5 fps: a seek), repeated, out of order
    frames = source.read(0, lambda n: seen.append(n) or asked)
    assert seen == [40] and frames.dtype == np.uint8 and frames.shape == (5, 24, 32, 3)
    assert _data_frame_ids(frames) == asked
    for asked in ([2, 0, 1], data.temporal_indices(40, 35, 5, 4), list(range(40))):
        assert _data_frame_ids(source.read(0, lambda n: asked)) == asked
    assert source.label(0) == 3 and source.name(0) == str(path)
    _data_write_video(tmp_path / "portrait.avi", width=48, height=64)
    portrait = data.VideoFiles([data.VideoRecord(str(tmp_path / "portrait.avi"), 0)], short_side=24)
    frames = portrait.read(0, lambda n: [17, 4])
    assert frames.shape == (2, 32, 24, 3) and _data_frame_ids(frames) == [17, 4]


def test_data_decode_seeks_and_stops_early(tmp_path, monkeypatch):
    path = tmp_path / "v.avi"
    _data_write_video(path)  # keyframes every 8 frames, 5 fps
    decoded, real_open = [], av.open

    class CountingContainer:
        def __init__(self, *args, **kwargs):
            self.container = real_open(*args, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.container.close()

        def __getattr__(self, name):
            return getattr(self.container, name)

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                decoded.append(frame.pts)
                yield frame

    monkeypatch.setattr(av, "open", CountingContainer)
    source = data.VideoFiles([data.VideoRecord(str(path), 0)], 24)
    assert _data_frame_ids(source.read(0, lambda n: [33, 30])) == [33, 30]
    assert decoded == list(range(24, 34))  # from the keyframe before frame 30, up to frame 33
    decoded.clear()
    assert _data_frame_ids(source.read(0, lambda n: [3, 1])) == [3, 1]
    assert decoded == [0, 1, 2, 3]


def test_data_bad_videos_skipped(tmp_path):
    good = tmp_path / "good.avi"
    _data_write_video(good)
    zero, text, cut, short = (tmp_path / name for name in ("zero.avi", "text.avi", "cut.avi", "short.avi"))
    zero.write_bytes(b"")
    text.write_text("not a video\n" * 100)
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    _data_write_video(short, num_frames=5)
    with av.open(str(good)) as container:
        packet_starts = [packet.pos for packet in container.demux(video=0) if packet.size]
    ends_early = tmp_path / "ends_early.avi"  # cut between packets: the stream just stops after frame 19
    ends_early.write_bytes(good.read_bytes()[: packet_starts[20]])
    source = data.VideoFiles([data.VideoRecord(str(ends_early), 0)], 24)
    assert _data_frame_ids(source.read(0, lambda n: [0, 19])) == [0, 19]
    with pytest.raises(data.BadVideo, match="truncated, frame 21 of the 40"):
        source.read(0, lambda n: [0, 21])
    cases = [(tmp_path / "missing.avi", "missing"), (zero, "zero bytes"), (text, "not a video"),
             (cut, "not a video or damaged|truncated"), (ends_early, "truncated"),
             (short, "5 frames, fewer than the 10")]
    for bad, reason in cases:
        source = data.VideoFiles([data.VideoRecord(str(bad), 0), data.VideoRecord(str(good), 1)], 24, min_frames=10)
        with pytest.raises(data.BadVideo, match=f"{bad.name}.*({reason})"):
            source.read(0, lambda n: data.temporal_indices(n, 0, 16, 4))  # touches every 4th frame
        dataset = data.ClipDataset(source, clip_len=16, stride=4)
        with pytest.warns(data.BadVideoWarning, match=bad.name):
            item = dataset[0]
        assert (item["skipped"], item["label"], item["index"]) == (1, 1, 1)
        assert item["views"].shape == (16, 24, 32, 3)
        with warnings.catch_warnings():
            warnings.simplefilter("error", data.BadVideoWarning)  # once per file
            assert dataset[0]["skipped"] == 1
        assert dataset[1]["skipped"] == 0
    only_bad = data.VideoFiles([data.VideoRecord(str(bad), 0) for bad, _ in cases], 24, min_frames=10)
    with pytest.raises(RuntimeError, match="6 bad videos in a row"):  # only when none of the source decodes
        data.ClipDataset(only_bad)[2]
    gone = [data.VideoRecord(str(tmp_path / f"gone{k}.avi"), 0) for k in range(25)]
    with pytest.warns(data.BadVideoWarning):  # bad videos never stop an epoch, however many come in a row
        item = data.ClipDataset(data.VideoFiles(gone + [data.VideoRecord(str(good), 1)], 24))[0]
    assert (item["index"], item["skipped"], item["label"]) == (25, 25, 1)


class _DataIndexSource:
    """Fake source: every pixel of frame k holds k, so a sample shows which frames it used."""

    def __init__(self, num_frames):
        self.num_frames, self.reads = num_frames, 0

    def __len__(self):
        return 3

    def label(self, i):
        return i

    def name(self, i):
        return f"fake{i}"

    def read(self, i, choose):
        self.reads += 1
        indices = choose(self.num_frames)
        assert all(0 <= k < self.num_frames for k in indices), indices
        return np.broadcast_to(np.array(indices, np.uint8)[:, None, None, None], (len(indices), 2, 2, 3)).copy()


def test_data_clip_dataset_train_shift():
    source = _DataIndexSource(50)
    dataset = data.ClipDataset(source, clip_len=16, stride=4, shift=(2, 20), seed=1)
    taus = set()
    for epoch in range(30):
        dataset.set_epoch(epoch)
        views = dataset[epoch % 3]["views"]  # (2, T, H, W, 3): anchor and shifted
        anchor, shifted = views[0, :, 0, 0, 0].long(), views[1, :, 0, 0, 0].long()
        assert views.shape == (2, 16, 2, 2, 3)
        assert torch.all((anchor[1:] - anchor[:-1]) % 50 == 4)  # stride 4, looping
        tau = (shifted - anchor) % 50
        assert torch.all(tau == tau[0]) and 2 <= tau[0] <= 20  # Eq. 4
        taus.add(int(tau[0]))
    assert len(taus) > 5 and source.reads == 30  # one read per sample
    assert torch.equal(dataset[1]["views"], dataset[1]["views"])
    other = data.ClipDataset(source, clip_len=16, stride=4, shift=(2, 20), seed=2)
    assert any(not torch.equal(dataset[i]["views"], other[i]["views"]) for i in range(3))

    calls = []
    transformed = data.ClipDataset(source, clip_len=4, shift=(2, 20), transform=lambda *a: calls.append(a) or 7)
    assert transformed[0]["views"] == 7
    clip, shifted, rng = calls[0]
    assert clip.shape == shifted.shape == (4, 2, 2, 3) and isinstance(rng, np.random.Generator)
    static = data.ClipDataset(source, clip_len=8, static=True)[0]["views"]
    assert static.shape == (8, 2, 2, 3) and torch.all(static == static[0])


def test_data_clip_dataset_test_clips():
    source = _DataIndexSource(100)
    views = data.ClipDataset(source, clip_len=4, stride=2, mode="test", test_clips=5)[1]["views"]
    assert views.shape == (5, 4, 2, 2, 3) and source.reads == 1
    assert views[:, 0, 0, 0, 0].tolist() == data.test_starts(100, 4, 2, 5)
    assert torch.all(views[:, 1:, 0, 0, 0] - views[:, :-1, 0, 0, 0] == 2)
    means = data.ClipDataset(source, clip_len=4, mode="test", test_clips=3,
                             transform=lambda clip, shifted, rng: torch.tensor(float(clip.mean())))[0]["views"]
    assert means.shape == (3,)
    with pytest.raises(ValueError):
        data.ClipDataset(source, mode="test", shift=(2, 20))


def test_data_synthetic_deterministic():
    make = lambda seed: data.SyntheticVideos("train", 8, seed=seed, short_side=32, num_frames=16)
    a, b, c = make(0), make(0), make(1)
    frames = a.render(3, [0, 5, 5, 15])
    assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames, b.render(3, [0, 5, 5, 15])) and np.array_equal(frames[1], frames[2])
    assert not np.array_equal(frames, c.render(3, [0, 5, 5, 15]))
    assert not np.array_equal(frames[0], frames[3])  # it moves
    seen = []
    assert np.array_equal(a.read(3, lambda n: seen.append(n) or [15, 0]), frames[[3, 0]]) and seen == [16]


def test_data_synthetic_labels_and_scenes():
    train = data.SyntheticVideos("train", 800, seed=0, scene_bias=0.8, short_side=32)
    test = data.SyntheticVideos("test", 800, seed=0, scene_bias=0.8, short_side=32)
    for source, agree in ((train, 0.8), (test, 1 / 8)):
        labels = np.array([source.label(i) for i in range(len(source))])
        scenes = np.array([source.scene(i) for i in range(len(source))])
        assert np.array_equal(np.bincount(labels), [100] * 8) and source.num_classes == len(source.classes) == 8
        assert abs(np.mean(labels == scenes) - agree) < 0.05
        assert set(scenes[labels != scenes]) == set(range(8))


def test_data_synthetic_motion_and_box():
    side = 64
    source = data.SyntheticVideos("test", 8, seed=0, short_side=side, num_frames=128)
    for i, cls in enumerate(source.classes):  # video i has class i
        boxes = np.array([source.box(i, t) for t in range(128)])
        x, y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        step_x, step_y = (np.diff(x) + side / 2) % side - side / 2, (np.diff(y) + side / 2) % side - side / 2
        turn = (np.diff(np.arctan2(y - side / 2, x - side / 2)) + np.pi) % (2 * np.pi) - np.pi
        growth = np.diff(boxes[:, 2] - boxes[:, 0])
        moves = {"Left": step_x < 0, "Right": step_x > 0, "Up": step_y < 0, "Down": step_y > 0,
                 "Clockwise": turn > 0, "Anticlockwise": turn < 0}
        if cls in moves:
            assert np.all(moves[cls]) and np.all(np.hypot(step_x, step_y) < 0.036 * side), cls
        else:
            assert np.all(growth > 0 if cls == "Grow" else growth < 0), cls  # one ramp: the size never jumps back
        if cls in ("Grow", "Shrink"):
            continue
        centres = np.arange(side) + 0.5
        in_box = [((centres - box[1]) % side <= box[3] - box[1])[:, None]  # (H, W), wrapping like the object
                  & ((centres - box[0]) % side <= box[2] - box[0])[None, :] for box in boxes]
        t = next(t for t in range(128) if not np.any(in_box[0] & in_box[t]))  # moved off its first place
        frames = source.render(i, [0, t]).astype(int)
        changed = np.any(frames[0] != frames[1], axis=-1)
        assert not np.any(changed & ~in_box[0] & ~in_box[t]), cls  # the scene is static outside the boxes
        assert changed[in_box[0]].mean() > 0.7, cls  # the object fills its box (a disk: pi/4)


def test_data_make_synthetic(tmp_path):
    out = tmp_path / "synthetic"
    data.make_synthetic(str(out), num_train=2, num_test=1, seed=0, scene_bias=0.8, short_side=32)
    records, classes = data.build_records("ucf101", str(out / "videos"), str(out / "splits"), 1, True)
    assert classes == list(data.CLASSES) and [r.label for r in records] == [0, 1]
    test_records, _ = data.build_records("ucf101", str(out / "videos"), str(out / "splits"), 1, False)
    assert [r.label for r in test_records] == [0] and test_records[0].path not in {r.path for r in records}
    assert not [p for p in out.rglob("*") if p.suffix == ".partial"]
    seen = []
    frames = data.VideoFiles(records, short_side=32).read(1, lambda n: seen.append(n) or [0, 33, 63])
    reference = data.SyntheticVideos("train", 2, seed=0, short_side=32).render(1, [0, 33, 63])
    assert seen == [64] and frames.shape == reference.shape
    assert np.abs(frames.astype(int) - reference).mean() < 10
    data.main(["make-synthetic", str(tmp_path / "cli"), "--num-train", "1", "--num-test", "1", "--short-side", "16"])
    assert (tmp_path / "cli/splits/trainlist01.txt").read_text() == "Left/v_Left_g01_c01.avi 1\n"

def test_data_train_clips_start_where_they_fit():
    span = 15 * 4 + 1
    for num_frames in (61, 62, 100):
        dataset = data.ClipDataset(_DataIndexSource(num_frames), clip_len=16, stride=4, shift=(2, 20))
        starts = set()
        for epoch in range(40):
            dataset.set_epoch(epoch)
            anchor = dataset[epoch % 3]["views"][0, :, 0, 0, 0].long()
            assert torch.all(anchor[1:] - anchor[:-1] == 4)  # no jump: the anchor never wraps
            starts.add(int(anchor[0]))
        assert max(starts) <= num_frames - span  # the last start at which the clip still fits
        assert starts == set(range(num_frames - span + 1)) if num_frames < 70 else len(starts) > 10
    short = data.ClipDataset(_DataIndexSource(30), clip_len=16, stride=4)[0]["views"][:, 0, 0, 0].long()
    assert short[0] == 0 and short.tolist() == [(4 * k) % 30 for k in range(16)]  # too short: it loops


@pytest.mark.parametrize("dataset, flip, crop, shift", [("synthetic", False, [0.6, 1.0], (2, 20)),
                                                        ("ucf101", True, [0.3, 1.0], (2, 20)),
                                                        ("hmdb51", True, [0.3, 1.0], (2, 20)),
                                                        ("kinetics", True, [0.3, 1.0], (4, 30))])
def test_data_dataset_defaults(tmp_path, dataset, flip, crop, shift):
    folders = [] if dataset == "synthetic" else ["--root", str(tmp_path), "--split-dir", str(tmp_path)]
    args = pretrain.parse_args(["--dataset", dataset, *folders])
    assert (args.flip, args.crop_scale, args.shift) == (flip, crop, shift)
    assert pretrain.parse_args(["--dataset", dataset, *folders, "--flip", "on"]).flip
    if dataset != "synthetic":  # the paper's settings
        assert (args.size, args.clip_len, args.stride, args.epochs, args.moco_k, args.moco_t, args.lr, args.arch) == \
            (224, 16, 4, 200, 6536, 0.07, 0.003, "i3d")
        assert args.moco_m == 0.99  # the paper's m for every method
        assert args.batch_size == 128 and args.optimizer == "sgd"
        assert [pretrain.learning_rate(args, e) for e in (79, 80, 120, 160)] == pytest.approx([3e-3, 3e-4, 3e-5, 3e-6])
    else:  # the CPU demo: AdamW at a constant rate, 6 epochs, tau 0.04
        assert (args.optimizer, args.lr, args.epochs, args.moco_k, args.moco_t) == ("adam", 1e-3, 6, 512, 0.04)
        momentum = lambda *flags: pretrain.parse_args(list(flags)).moco_m  # 0.95 where Eq. 7 meets f_q(n)
        assert (args.moco_m, momentum("--loss", "both"), momentum("--negative", "shift")) == (0.95, 0.95, 0.95)
        assert momentum("--positive", "none", "--negative", "none") == momentum("--loss", "triplet") == 0.99
        assert momentum("--moco-m", "0.9") == 0.9
        assert pretrain.learning_rate(args, 5) == 1e-3
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--crop-scale", "0.9", "0.5"])


# ---- augment.py ------------------------------------------------------------


def _augment_base_grid(height, width):
    """Pixel centres from torch's own affine_grid (align_corners=False), independent of augment.py."""
    return F.affine_grid(torch.eye(2, 3)[None], [1, 1, height, width], align_corners=False)[0].double()


def _augment_moving_frames(T, H, W, dx, seed=0):
    """(T, H, W) float32 smooth texture in [0, 1] moving dx pixels right per frame."""
    import cv2

    rng = np.random.default_rng(seed)
    margin = abs(dx) * T + 4
    big = cv2.GaussianBlur(rng.random((H, W + 2 * margin)).astype(np.float32), (0, 0), 2.0)
    big = (big - big.min()) / (big.max() - big.min())
    return np.stack([big[:, margin - dx * t: margin - dx * t + W] for t in range(T)])


def _augment_moving_rgb(T, H, W, dx, seed=0):
    """uint8 (T, H, W, 3) frames of moving texture, the colours differing per channel."""
    grey = _augment_moving_frames(T, H, W, dx, seed)
    return (np.stack([grey, 1 - grey, grey ** 2], axis=-1) * 255).round().astype(np.uint8)


def _tps_grid(dst: torch.Tensor, src: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The (H, W, 2) grid of the TPS f with f(dst_i) = src_i, from augment.tps_matrix (the solver)."""
    A = augment.tps_matrix(dst.double().numpy(), height, width)
    return torch.from_numpy(A @ src.double().numpy()).float().reshape(height, width, 2)


def test_augment_tps_grid_interpolates_control_points():
    rng = np.random.default_rng(0)
    H, W = 20, 24
    flat = rng.choice(H * W, size=9, replace=False)  # control points on distinct pixel centres
    rows, cols = flat // W, flat % W
    dst = _augment_base_grid(H, W)[rows, cols].float()
    src = dst + torch.from_numpy(rng.uniform(-0.2, 0.2, size=(9, 2))).float()
    grid = _tps_grid(dst, src, H, W)
    assert grid.shape == (H, W, 2) and grid.dtype == torch.float32
    assert torch.allclose(grid[rows, cols], src, atol=1e-4)  # f(dst_i) = src_i
    assert not torch.allclose(grid, _augment_base_grid(H, W).float(), atol=1e-2)


def test_augment_tps_grid_identity_when_src_is_dst():
    dst = augment.TPSWarp(10, 14, points=4).dst
    grid = _tps_grid(dst, dst.clone(), 10, 14)
    assert torch.allclose(grid, _augment_base_grid(10, 14).float(), atol=1e-5)


def test_augment_tps_grid_matches_scipy_rbf_interpolator():
    rng = np.random.default_rng(1)
    H, W = 18, 26
    dst = torch.from_numpy(rng.uniform(-1, 1, size=(12, 2)))
    src = dst + torch.from_numpy(rng.uniform(-0.2, 0.2, size=(12, 2)))
    spline = RBFInterpolator(dst.numpy(), src.numpy(), kernel="thin_plate_spline", degree=1)
    expected = spline(_augment_base_grid(H, W).reshape(-1, 2).numpy()).reshape(H, W, 2)
    grid = _tps_grid(dst.float(), src.float(), H, W)
    assert np.abs(grid.double().numpy() - expected).max() < 1e-4


def test_augment_tpswarp_grid_and_warp():
    warp = augment.TPSWarp(16, 20, points=5, offset=0.1)
    assert warp.dst.shape == (25, 2) and warp.dst.min() == -1 and warp.dst.max() == 1
    src = warp.sample_src(np.random.default_rng(2))
    delta = (src - warp.dst).abs()
    assert delta.max() <= 0.2 + 1e-6 and delta.max() > 0.1  # C = 0.1 x frame = 0.2 grid units
    assert torch.allclose(warp.grid(src), _tps_grid(warp.dst, src, 16, 20), atol=1e-5)
    frame = torch.from_numpy(_augment_moving_frames(1, 16, 20, 0)[0])
    clip = frame.expand(3, 4, 16, 20).contiguous()  # (C, T, H, W), every frame alike
    out = warp(clip, np.random.default_rng(3))
    assert out.shape == clip.shape
    assert torch.allclose(out, out[:, :1].expand_as(out))  # one warp for all frames
    assert (out - clip).abs().mean() > 0.01
    assert torch.equal(out, warp(clip, np.random.default_rng(3)))


def test_augment_scale_motion_phi_zero_repeats_previous_frame():
    rng = torch.Generator().manual_seed(0)
    clip = torch.rand(3, 5, 12, 16, generator=rng)
    flow = torch.randn(4, 2, 12, 16, generator=rng) * 3
    out = augment.scale_motion(clip, flow, torch.zeros(4))
    assert out.shape == clip.shape
    assert torch.equal(out[:, 0], clip[:, 0])
    assert torch.allclose(out[:, 1:], clip[:, :-1], atol=1e-6)
    right = torch.zeros(4, 2, 12, 16)
    right[:, 0] = 3.0  # sample 3 px to the right: the last 3 columns fall outside the frame
    out = augment.scale_motion(clip, right, torch.ones(4))
    assert torch.allclose(out[:, 1:, :, :-3], clip[:, :-1, :, 3:], atol=1e-6)
    assert torch.allclose(out[:, 1:, :, -3:], clip[:, :-1, :, -1:].expand(-1, -1, -1, 3), atol=1e-6)  # the border


def test_augment_farneback_recovers_shift_and_phi_one_predicts_next_frame():
    T, H, W = 4, 48, 48
    clip = torch.from_numpy(_augment_moving_frames(T, H, W, dx=2)).expand(3, T, H, W)
    flow = augment.farneback_flow(clip)
    assert flow.shape == (T - 1, 2, H, W) and flow.dtype == torch.float32
    inner = (slice(None), slice(None), slice(12, 36), slice(12, 36))
    # content moves right: frame t+1 at p shows frame t at p - (2, 0)
    assert torch.allclose(flow[inner].mean(dim=(0, 2, 3)), torch.tensor([-2.0, 0.0]), atol=0.1)
    one = augment.scale_motion(clip, flow, torch.ones(T - 1))
    zero = augment.scale_motion(clip, flow, torch.zeros(T - 1))
    frames = (slice(None), slice(1, None), slice(8, 40), slice(8, 40))
    mse_one = ((one - clip)[frames] ** 2).mean()
    mse_zero = ((zero - clip)[frames] ** 2).mean()
    assert mse_one < mse_zero / 5
    phi = torch.tensor([0.5, 3.0, 5.0])
    assert torch.equal(augment.scale_motion(clip, flow, phi)[:, 0], clip[:, 0])


def test_augment_farneback_rejects_bad_input():
    with pytest.raises(ValueError, match="2 frames"):
        augment.farneback_flow(torch.rand(3, 1, 16, 16))


@pytest.mark.parametrize("positive", augment.POSITIVES)
@pytest.mark.parametrize("negative", augment.NEGATIVES)
def test_augment_triplet_shapes(positive, negative):
    frames = _augment_moving_rgb(4, 30, 40, dx=1)
    out = augment.DSMTriplet(24, positive, negative)(frames, frames[::-1].copy(), np.random.default_rng(0))
    assert out.shape == ((2 if negative == "none" else 3), 3, 4, 24, 24) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_augment_triplet_deterministic_and_wiring():
    frames = _augment_moving_rgb(4, 30, 40, dx=2)
    other = _augment_moving_rgb(4, 30, 40, dx=2, seed=1)

    def run(positive="tps", negative="disturb", shifted=frames, seed=0):
        return augment.DSMTriplet(24, positive, negative)(frames, shifted, np.random.default_rng(seed))

    base = run()
    assert torch.equal(base, run())
    assert not torch.allclose(base, run(seed=1))
    assert not torch.allclose(base[0], base[2])  # anchor and negative differ
    # the same draws reach b for every option, so each option changes only its own view
    assert torch.equal(run(positive="none")[0], base[0]) and not torch.allclose(run(positive="none")[1], base[1])
    assert torch.equal(run(negative="flow")[2], base[2])  # disturb == flow when the shift is 0
    shift_only = run(negative="shift")[2]
    assert torch.equal(shift_only[:, 0], base[2][:, 0]) and not torch.allclose(shift_only, base[2])  # Eq. 3: frame 0 kept
    assert not torch.allclose(run(negative="shift", shifted=other)[2], shift_only)
    assert torch.equal(run(negative="none"), base[:2])


def test_augment_triplet_flips_all_views_or_none():
    still = np.zeros((4, 32, 32, 3), np.uint8)
    still[:, :, 16:] = 200  # dark left half, bright right half: a flip shows as a bright left half
    for flip in (True, False):
        triplet = augment.DSMTriplet(24, crop_scale=(1.0, 1.0), flip=flip)
        mirrored = []
        for seed in range(12):
            views = triplet(still, still, np.random.default_rng(seed))  # (3, C, T, S, S): a, p, n
            left, right = views[..., :12].mean(dim=(1, 2, 3, 4)), views[..., 12:].mean(dim=(1, 2, 3, 4))
            assert len(set((left > right).tolist())) == 1, seed  # a, p and n share one direction
            mirrored.append(bool(left[0] > right[0]))
        assert (any(mirrored) and not all(mirrored)) if flip else not any(mirrored)
    unflipped = [augment.ClipTransform(24, flip=False, crop_scale=(1.0, 1.0))(still, None, np.random.default_rng(s))
                 for s in range(8)]
    assert all(v[..., :12].mean() < v[..., 12:].mean() for v in unflipped)


def test_augment_triplet_rejects_bad_input():
    frames = _augment_moving_rgb(4, 30, 40, dx=1)
    with pytest.raises(ValueError, match="positive"):
        augment.DSMTriplet(24, positive="warp")
    with pytest.raises(ValueError, match="negative"):
        augment.DSMTriplet(24, negative="flip")
    with pytest.raises(ValueError, match="shifted"):
        augment.DSMTriplet(24)(frames, None, np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        augment.DSMTriplet(24)(frames.astype(np.float32), frames, np.random.default_rng(0))


def test_augment_colour_jitter_matches_stepwise_jitter():
    clip = 0.4 + 0.2 * torch.rand(3, 2, 6, 6, generator=torch.Generator().manual_seed(0))  # no clamping
    b, c, s = np.random.default_rng(5).uniform(0.8, 1.2, size=3)
    luma = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1, 1)
    x = clip * b  # brightness
    m = (x * luma).sum(0).mean()
    x = (x - m) * c + m  # contrast about the clip's mean grey
    grey = (x * luma).sum(0, keepdim=True)
    x = (x - grey) * s + grey  # saturation
    out = augment.colour_jitter(clip, augment.draw_jitter(0.2, np.random.default_rng(5)))
    assert torch.allclose(out, x, atol=1e-5) and not torch.allclose(out, clip, atol=1e-2)


def test_augment_basic_and_clip_transform_are_temporally_consistent():
    still = np.repeat(_augment_moving_rgb(1, 30, 40, dx=0), 4, axis=0)  # 4 identical frames
    for seed in range(4):
        view = augment.BasicAugment(16)(still, np.random.default_rng(seed))
        assert view.shape == (3, 4, 16, 16) and 0 <= view.min() and view.max() <= 1
        assert torch.equal(view, view[:, :1].expand_as(view))
    b = augment.BasicAugment(16, crop_scale=(1.0, 1.0))
    assert b.crop_box(10, 40, np.random.default_rng(0)) == (0, 13, 10, 13)  # no crop fits: centred 4:3
    assert b.crop_box(40, 10, np.random.default_rng(0)) == (13, 0, 13, 10)
    for seed in range(20):
        top, left, h, w = augment.BasicAugment(16).crop_box(30, 40, np.random.default_rng(seed))
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40 and 0.3 * 1200 - 40 <= h * w
    square = _augment_moving_rgb(2, 32, 32, dx=1)
    whole = augment.BasicAugment(16, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter=0.0)
    resized = augment.resize_crop(square, (0, 0, 32, 32), 16)
    assert torch.equal(whole(square, np.random.default_rng(0), flip=True), resized.flip(-1))
    assert torch.equal(whole(square, np.random.default_rng(0)), resized)
    train = augment.ClipTransform(16, train=True)(still, None, np.random.default_rng(0))
    test = augment.ClipTransform(16, train=False)(still)
    assert train.shape == test.shape == (3, 4, 16, 16)
    assert torch.equal(test, augment.ClipTransform(16, train=False)(still))
    centre = augment.normalise_(augment.resize_crop(still[:, 2:28, 7:33], (0, 0, 26, 26), 16))  # 26 = 7/8 x 30
    assert torch.equal(test, centre)
    small = _augment_moving_rgb(2, 16, 20, dx=1)  # short side 16 = 8/7 x 14: a plain 14 x 14 centre crop
    mean, std = torch.tensor(augment.MEAN).view(3, 1, 1, 1), torch.tensor(augment.STD).view(3, 1, 1, 1)
    plain = (torch.from_numpy(small[:, 1:15, 3:17]).permute(3, 0, 1, 2) / 255 - mean) / std
    assert torch.allclose(augment.ClipTransform(14, train=False)(small), plain, atol=1e-5)
    with pytest.raises(ValueError, match="rng"):
        augment.ClipTransform(16, train=True)(still)


def test_augment_show_writes_png(tmp_path, monkeypatch):
    import sys

    import av
    from PIL import Image

    video = tmp_path / "moving.mp4"
    frames = _augment_moving_rgb(12, 48, 64, dx=2)
    with av.open(str(video), "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    png = tmp_path / "triplet.png"
    monkeypatch.setattr(sys, "argv", ["augment.py", "--show", str(video), str(png), "--size", "32",
                                      "--frames", "3", "--stride", "2", "--tau", "3"])
    augment.main()
    assert Image.open(png).size == (16 + 3 * 32, 3 * 32)


def _augment_object_over_scene(T, H, W, step=2):
    """uint8 (T, H, W) grey: a textured square moving right and down over a still textured scene."""
    scene = (_augment_moving_frames(1, H, W, 0, seed=4)[0] * 255).round().astype(np.uint8)
    patch = (_augment_moving_frames(1, H // 3, H // 3, 0, seed=5)[0] * 255).round().astype(np.uint8)
    frames = np.repeat(scene[None], T, axis=0)
    for t in range(T):
        y, x = H // 4 + step * t, W // 4 + step * t
        frames[t, y:y + len(patch), x:x + len(patch)] = patch
    return frames


@pytest.mark.parametrize("clip", ["pan", "object"])
def test_augment_farneback_torch_matches_opencv(clip):
    import cv2

    T, H, W = 4, 64, 80
    grey = (_augment_moving_frames(T, H, W, dx=2) * 255).round().astype(np.uint8) if clip == "pan" \
        else _augment_object_over_scene(T, H, W)
    ours = augment.farneback_torch(torch.from_numpy(grey)[None].float())[0]  # (T-1, 2, H, W)
    theirs = torch.from_numpy(np.stack([cv2.calcOpticalFlowFarneback(grey[t + 1], grey[t], None, **augment.FARNEBACK)
                                        for t in range(T - 1)])).permute(0, 3, 1, 2)
    assert ours.shape == theirs.shape == (T - 1, 2, H, W)
    assert theirs.norm(dim=1).amax() > 1.5  # there is motion to get right
    assert (ours - theirs).norm(dim=1).mean() < 1e-3  # mean EPE in px; measured ~1e-6 (docs/RESULTS.md)
    assert augment.farneback_scales(224, 224, 0.5, 3) == [1.0, 0.5, 0.25]  # OpenCV skips sides below 32
    with pytest.raises(ValueError, match="flags"):
        augment.farneback_torch(torch.zeros(1, 2, 32, 32), flags=256)


@pytest.mark.parametrize("negative", ["disturb", "flow", "none"])
def test_augment_device_path_gives_the_cpu_views(negative):
    """The same draws through apply_batch (device path, run on the CPU) and through the CPU path."""
    triplet = augment.DSMTriplet(24, negative=negative, flow_max=3.0)
    to_device = augment.FramesAndDraws(triplet)
    samples = [(_augment_moving_rgb(4, 30, 40, dx=2, seed=i), _augment_moving_rgb(4, 30, 40, dx=1, seed=i + 5))
               for i in range(3)]
    samples[2] = tuple(s[:, :, :36].copy() for s in samples[2])  # another video size in the same batch
    cpu = [triplet(clip, shifted, np.random.default_rng(i)) for i, (clip, shifted) in enumerate(samples)]
    batch = augment.collate_frames([{"views": to_device(clip, shifted, np.random.default_rng(i)), "index": i}
                                    for i, (clip, shifted) in enumerate(samples)])
    device = triplet.apply_batch(batch["views"]["frames"], batch["views"]["draws"], "cpu")
    assert device.shape == (3, 2 if negative == "none" else 3, 3, 4, 24, 24)
    # a, p: the same ops; n: farneback_torch instead of OpenCV (measured max 6e-6 in normalised units)
    assert torch.allclose(device, torch.stack(cpu), atol=1e-4)
    assert not torch.allclose(device[0], device[1])


def test_augment_device_path_in_training_loader(tmp_path):
    """pretrain's loader with the device path yields frames + draws; one step of training runs on them
    and its first batch equals the CPU path's."""
    flags = ["--num-train", "16", "--num-test", "8", "--batch-size", "8", "--size", "32", "--clip-len", "4",
             "--workers", "0", "--moco-k", "8", "--out", str(tmp_path)]
    args = pretrain.parse_args(flags)
    assert args.augment_device == ("cuda" if torch.cuda.is_available() else "cpu")
    cpu_batch = next(iter(pretrain.pretrain_loader(args, rank=0, world=1)))
    args.augment_device = "cuda"  # the device path, applied here on the CPU
    loader = pretrain.pretrain_loader(args, rank=0, world=1)
    batch = next(iter(loader))
    assert set(batch["views"]) == {"frames", "draws"} and batch["views"]["frames"][0].dtype == torch.uint8
    views = loader.dataset.transform.triplet.apply_batch(batch["views"]["frames"], batch["views"]["draws"], "cpu")
    assert torch.allclose(views[:, :2], cpu_batch["views"][:, :2], atol=1e-4)  # a, p
    # n: flat synthetic regions leave Farneback's 2x2 systems near singular, so float rounding moves a
    # few pixels of the flow (measured: max 0.11, mean 5e-5 in normalised units)
    assert (views[:, 2] - cpu_batch["views"][:, 2]).abs().mean() < 1e-3
    model = pretrain.DSM(args.arch, K=args.moco_k, bn_splits=2)
    stats = pretrain.train_one_epoch(model, loader, pretrain.make_optimizer(model.encoder_q.parameters(), args),
                                     torch.amp.GradScaler("cpu", enabled=False), args, 0, torch.device("cpu"))
    assert math.isfinite(stats["loss"])


# ---- models.py -------------------------------------------------------------


# Parameter counts without fc of the reference implementations (VCP's C3D with BN,
# piergiaj/pytorch-i3d to Mixed_5c, Hara's R3D with shortcut B) and of our `mini`.
MODELS_PARAMS = {"c3d": 27_661_440, "i3d": 12_287_264, "r3d18": 33_203_904, "r3d34": 63_513_536, "mini": 898_224}
# Last feature map (C, T', H', W') for 16x112x112 and 16x224x224 clips.
MODELS_MAPS = {"c3d": ((512, 2, 7, 7), (512, 2, 14, 14)),
               "i3d": ((1024, 2, 4, 4), (1024, 2, 7, 7)),
               "r3d18": ((512, 1, 4, 4), (512, 1, 7, 7)),
               "r3d34": ((512, 1, 4, 4), (512, 1, 7, 7)),
               "mini": ((128, 1, 4, 4), (128, 1, 7, 7))}


def _models_meta(arch: str) -> torch.nn.Module:
    with torch.device("meta"):  # no memory, no compute: shapes and counts only
        return models.build_backbone(arch)


def _models_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", sorted(MODELS_PARAMS))
def test_models_param_counts(arch):
    assert _models_count(_models_meta(arch)) == MODELS_PARAMS[arch]


class _ModelsShortcutA(torch.nn.Module):
    """Hara's shortcut A: the identity subsampled in space-time and zero-padded in channels, no weights."""

    def __init__(self, c_out: int, stride: int):
        super().__init__()
        self.c_out, self.stride = c_out, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.c_out - x.shape[1]))


def test_models_r3d34_count_tells_shortcut_b_from_a():
    # Shortcut A has 173,824 fewer parameters (0.27%): inside a 0.5% tolerance, so only the exact
    # count above shows that the 1x1x1 projection shortcuts (type B) are there.
    backbone = _models_meta("r3d34")
    blocks = [m for m in backbone.modules() if isinstance(m, models.BasicBlock) and m.downsample is not None]
    assert [tuple(b.downsample[0].weight.shape) for b in blocks] == \
        [(128, 64, 1, 1, 1), (256, 128, 1, 1, 1), (512, 256, 1, 1, 1)]  # the first block of stages 2-4
    for block in blocks:
        block.downsample = _ModelsShortcutA(block.conv1.out_channels, block.conv1.stride[0])
    out = backbone(torch.empty(1, 3, 16, 112, 112, device="meta"))
    assert tuple(out.shape) == (1, *MODELS_MAPS["r3d34"][0])  # a working shortcut-A R3D-34
    projections = (64 * 128 + 2 * 128) + (128 * 256 + 2 * 256) + (256 * 512 + 2 * 512)  # 1x1x1 conv + BN each
    assert _models_count(backbone) == MODELS_PARAMS["r3d34"] - projections == 63_339_712


def test_models_mini_flops_fit_a_cpu():
    backbone = _models_meta("mini")
    with FlopCounterMode(display=False) as counter:
        backbone(torch.empty(1, 3, 16, 112, 112, device="meta"))
    assert 0.05e9 < counter.get_total_flops() <= 0.6e9


@pytest.mark.parametrize("arch", models.ARCHS)
def test_models_feature_map_shapes(arch):
    backbone = _models_meta(arch)
    for size, expected in zip((112, 224), MODELS_MAPS[arch]):
        out = backbone(torch.empty(1, 3, 16, size, size, device="meta"))
        assert tuple(out.shape) == (1, *expected), (size, out.shape)
        assert backbone.out_channels == expected[0]


@pytest.mark.parametrize("t, h", [(16, 224), (9, 50), (10, 47), (7, 113)])
def test_models_i3d_same_padding_gives_ceil_sizes(t, h):
    # TF "same": every strided layer outputs ceil(size / stride); I3D halves time 3 times
    # (Conv3d_1a, MaxPool3d_4a, MaxPool3d_5a) and space 5 times.
    halve = lambda n, k: n if k == 0 else halve(math.ceil(n / 2), k - 1)
    out = _models_meta("i3d")(torch.empty(1, 3, t, h, h + 1, device="meta"))
    assert tuple(out.shape) == (1, 1024, halve(t, 3), halve(h, 5), halve(h + 1, 5))


def test_models_tf_same_pad_puts_the_extra_pixel_last():
    x = torch.ones(1, 1, 4, 6, 8)
    kernel, stride = (3, 3, 7), (2, 2, 2)
    # TF "SAME": total = max((ceil(n / s) - 1) * s + k - n, 0), before = total // 2, the rest after.
    # T: (2 - 1) * 2 + 3 - 4 = 1 -> (0, 1); H: (3 - 1) * 2 + 3 - 6 = 1 -> (0, 1); W: (4 - 1) * 2 + 7 - 8 = 5 -> (2, 3)
    expected = torch.zeros(1, 1, 5, 7, 13)
    expected[:, :, 0:4, 0:6, 2:10] = 1
    padded = models.tf_same_pad(x, kernel, stride)
    assert torch.equal(padded, expected)
    assert tuple(F.conv3d(padded, torch.ones(1, 1, *kernel), stride=stride).shape[2:]) == (2, 3, 4)  # ceil(n / 2)
    assert models.tf_same_pad(x, (1, 2, 2), (1, 2, 2)) is x  # nothing to pad: no copy


def test_models_unknown_arch_names_choices():
    with pytest.raises(ValueError, match="r3d34"):
        models.build_backbone("resnet")


def test_models_encoder_unit_norm_and_classifier():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 32, 32)
    encoder = models.Encoder("mini")
    z = encoder(x)
    assert z.shape == (3, 128)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(3))
    assert not torch.allclose(z[0], z[1])
    classifier = models.Classifier(encoder.backbone, num_classes=5)
    assert classifier.backbone is encoder.backbone
    assert classifier(x).shape == (3, 5)


def test_models_retrieval_features():
    torch.manual_seed(0)
    exact = torch.randn(2, 8, 2, 7, 7)  # already the target grid: pooling is the identity
    for pool in ("max", "avg"):
        torch.testing.assert_close(models.retrieval_features(exact, pool=pool), exact.flatten(1))
    big = torch.randn(2, 8, 4, 14, 14)
    torch.testing.assert_close(models.retrieval_features(big), F.max_pool3d(big, 2).flatten(1))
    torch.testing.assert_close(models.retrieval_features(big, pool="avg"),
                               F.avg_pool3d(big, 2).flatten(1))
    assert models.retrieval_features(torch.randn(2, 8, 1, 4, 4)).shape == (2, 8 * 2 * 7 * 7)
    with pytest.raises(ValueError, match="pool"):
        models.retrieval_features(big, pool="sum")
    with pytest.raises(ValueError, match="shape"):
        models.retrieval_features(big[:, :, 0])


def _models_assert_same_weights(a: torch.nn.Module, b: dict) -> None:
    sa = a.state_dict()
    assert set(sa) == set(b)
    for key, value in sa.items():
        assert torch.equal(value, b[key]), key


def test_models_load_backbone_from_pretraining_checkpoint(tmp_path, capsys):
    torch.manual_seed(0)
    query, key_encoder = models.Encoder("mini"), models.Encoder("mini")
    query.backbone.bn1.running_mean.normal_()  # buffers must travel too
    state = {f"module.encoder_q.{k}": v for k, v in query.state_dict().items()}
    state |= {f"module.encoder_k.{k}": v for k, v in key_encoder.state_dict().items()}
    state["module.queue"] = torch.randn(128, 16)
    path = str(tmp_path / "checkpoint.pth")
    models.save_checkpoint({"arch": "mini", "state_dict": state, "epoch": 3}, path)
    loaded = models.load_backbone(path, "mini")
    _models_assert_same_weights(loaded, query.backbone.state_dict())
    assert not torch.equal(loaded.conv1.weight, key_encoder.backbone.conv1.weight)
    assert "missing" not in capsys.readouterr().out


@pytest.mark.parametrize("prefix", ["", "module.", "backbone.", "module.backbone."])
def test_models_load_backbone_from_plain_checkpoint(tmp_path, prefix):
    torch.manual_seed(0)
    backbone = models.build_backbone("mini")
    backbone.layer4[0].bn2.running_var.uniform_(0.5, 2.0)
    state = {prefix + k: v for k, v in backbone.state_dict().items()}
    if prefix:  # a fine-tuned Classifier also holds its head
        state[prefix.replace("backbone.", "") + "fc.weight"] = torch.zeros(5, 128)
    path = str(tmp_path / "backbone.pth")
    models.save_checkpoint({"arch": "mini", "state_dict": state}, path)
    _models_assert_same_weights(models.load_backbone(path, "mini"), backbone.state_dict())


def test_models_load_backbone_refuses_other_arch(tmp_path):
    path = str(tmp_path / "c.pth")
    models.save_checkpoint({"arch": "mini", "state_dict": models.build_backbone("mini").state_dict()}, path)
    with pytest.raises(ValueError, match=r"'mini'.*'r3d18'"):
        models.load_backbone(path, "r3d18")
    models.save_checkpoint({"arch": "mini", "state_dict": {"head.weight": torch.zeros(2)}}, path)
    with pytest.raises(ValueError, match="no weights"):
        models.load_backbone(path, "mini")


def test_models_save_checkpoint_refuses_objects(tmp_path):
    path = tmp_path / "c.pth"
    with pytest.raises(TypeError, match=r"rng\.numpy\[1\]"):
        models.save_checkpoint({"epoch": 1, "rng": {"numpy": np.random.get_state()}}, str(path))
    with pytest.raises(TypeError, match="model"):
        models.save_checkpoint({"model": torch.nn.Linear(2, 2)}, str(path))
    assert os.listdir(tmp_path) == []


def test_models_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pth")
    models.save_checkpoint({"epoch": 1, "w": torch.arange(3)}, path)

    def crash(obj, f):  # dies half-way through writing
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        models.save_checkpoint({"epoch": 2, "w": torch.arange(4)}, path)
    assert os.listdir(tmp_path) == ["c.pth"]
    assert models.load_checkpoint(path)["epoch"] == 1


def _models_moving_squares(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A square moving left (0) or right (1) over noise, wrapping around: no single frame
    tells the class, only the motion does."""
    y = torch.randint(0, 2, (n,), generator=generator)
    x = torch.rand(n, 3, 8, 32, 32, generator=generator) * 0.5
    start = torch.randint(0, 32, (n,), generator=generator)
    row = torch.randint(0, 27, (n,), generator=generator)
    for i in range(n):
        for t in range(8):
            cols = (int(start[i]) + (3 if y[i] else -3) * t + torch.arange(5)) % 32
            x[i, :, t, row[i]:row[i] + 5, cols] = 1.0
    return x, y


def test_models_mini_learns_motion_direction():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = models.Classifier("mini", 2, dropout=0.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(40):
        x, y = _models_moving_squares(16, generator)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, y = _models_moving_squares(64, generator)
    with torch.no_grad():
        accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
    assert accuracy >= 0.8, accuracy


# ---- pretrain.py -----------------------------------------------------------


TINY = ["--dataset", "synthetic", "--num-train", "32", "--num-test", "16", "--arch", "mini", "--size", "32",
        "--clip-len", "4", "--stride", "2", "--batch-size", "8", "--moco-k", "16", "--workers", "0",
        "--knn-every", "0"]


def test_pretrain_eq7_matches_hand_computation():
    torch.manual_seed(0)
    z_a, z_p, z_n = (F.normalize(torch.randn(2, 4), dim=1) for _ in range(3))
    queue = F.normalize(torch.randn(4, 3), dim=0)  # (D, K)
    tau = 0.5
    logits = pretrain.contrastive_logits(z_a, z_p, z_n, queue, tau)
    loss = pretrain.dsm_losses({"logits": logits}, "contrastive", 0.5)["loss"]
    expected = 0.0
    for i in range(2):
        dot = lambda u, v: sum(float(x) * float(y) for x, y in zip(u, v))
        pos = math.exp(dot(z_a[i], z_p[i]) / tau)
        neg_n = math.exp(dot(z_a[i], z_n[i]) / tau)  # the intra-video negative in the denominator
        neg_q = sum(math.exp(dot(z_a[i], queue[:, j]) / tau) for j in range(3))
        expected += -math.log(pos / (pos + neg_n + neg_q)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_pretrain_eq5_matches_hand_computation():
    z_a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z_p = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    z_n = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = {"z_a": z_a, "z_p": z_p, "z_n": z_n}
    loss = pretrain.dsm_losses(out, "triplet", 0.5)["loss"]
    d_ap0, d_an0 = math.sqrt(0.4 ** 2 + 0.8 ** 2), 0.0
    d_ap1, d_an1 = 0.0, math.sqrt(2.0)
    expected = (max(d_ap0 - d_an0 + 0.5, 0) + max(d_ap1 - d_an1 + 0.5, 0)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    both = pretrain.dsm_losses({**out, "logits": torch.zeros(2, 5)}, "both", 0.5)
    assert float(both["loss"]) == pytest.approx(math.log(5) + expected, rel=1e-6)


def test_pretrain_queue_fifo_and_wraparound():
    model = pretrain.DSM("mini", dim=4, K=10)
    keys = [torch.full((4, 4), float(i)) for i in range(3)]
    model.enqueue(keys[0], torch.full((4,), 10))
    assert int(model.queue_ptr) == 4 and torch.all(model.queue[:, :4] == 0)
    model.enqueue(keys[1], torch.full((4,), 11))
    assert int(model.queue_ptr) == 8 and torch.all(model.queue[:, 4:8] == 1)
    model.enqueue(keys[2], torch.full((4,), 12))  # wraps: the last two slots, then the oldest keys (batch 0) first
    assert int(model.queue_ptr) == 2
    assert torch.all(model.queue[:, 8:] == 2) and torch.all(model.queue[:, :2] == 2)
    assert torch.all(model.queue[:, 2:4] == 0) and torch.all(model.queue[:, 4:8] == 1)
    assert model.queue_video.tolist() == [12, 12, 10, 10, 11, 11, 11, 11, 12, 12]  # each key's video beside it
    with pytest.raises(AssertionError):
        model.enqueue(torch.zeros(11, 4), torch.zeros(11, dtype=torch.long))  # more keys than the queue holds


def test_pretrain_forward_masks_own_video_and_uses_queue_before_enqueue():
    torch.manual_seed(0)
    model = pretrain.DSM("mini", dim=4, K=8, tau=0.5, bn_splits=2)
    model.queue_video.copy_(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    queue_before = model.queue.clone()
    a, p, n = (torch.randn(4, 3, 4, 16, 16) for _ in range(3))
    video = torch.tensor([0, 5, 2, 6])
    out = model(a, p, n, video)
    masked = torch.isinf(out["logits"][:, 2:])
    assert masked.tolist() == [[v == u for v in [0, 1, 2, 3, 0, 1, 2, 3]] for u in [0, 5, 2, 6]]
    assert float(out["own_in_queue"]) == 0.5  # videos 0 and 2 of the four have a key in the queue
    expected = torch.cat([(out["z_a"] * out["z_p"]).sum(1, keepdim=True), (out["z_a"] * out["z_n"]).sum(1, keepdim=True),
                          out["z_a"] @ queue_before], dim=1) / 0.5
    assert torch.allclose(out["logits"][~torch.isinf(out["logits"])], expected[~torch.isinf(out["logits"])], atol=1e-6)
    assert torch.equal(model.queue[:, :4], out["z_p"].T) and model.queue_video[:4].tolist() == [0, 5, 2, 6]
    loss = pretrain.dsm_losses(out, "contrastive", 0.5)
    assert math.isfinite(float(loss["loss"].detach())) and 0 < float(loss["p_n"]) < 1
    unmasked = pretrain.contrastive_logits(out["z_a"], out["z_p"], out["z_n"], queue_before, 0.5)
    assert not torch.isinf(unmasked).any()


def test_pretrain_which_encoder_embeds_n_and_p():
    """n goes through f_q with gradient, in a forward of its own; p is MoCo's key k+ = f_k(p)."""
    torch.manual_seed(0)
    model = pretrain.DSM("mini", dim=4, K=8)
    a, p, n = (torch.randn(2, 3, 4, 16, 16) for _ in range(3))
    out = model(a, p, n, torch.tensor([0, 1]))
    assert out["z_a"].requires_grad and out["z_n"].requires_grad and not out["z_p"].requires_grad
    model.eval()  # same BN statistics for every call: z_n must be exactly f_q's output on n alone
    assert torch.allclose(model(a, p, n, torch.tensor([0, 1]))["z_n"], model.encoder_q(n), atol=1e-6)


def test_pretrain_prints_setting_and_warns_on_the_literal_8_gpu_command(capsys):
    args = pretrain.parse_args(["--arch", "i3d"])  # what `torchrun --nproc_per_node=8 pretrain.py --arch i3d` parses
    with pytest.warns(UserWarning) as caught:
        pretrain.print_config("pretrain", args, 8, args.batch_size // 8, queue="K 512")
    messages = " ".join(str(w.message) for w in caught)
    assert "synthetic" in messages and "--dataset kinetics" in messages  # names the paper's flags
    assert "BatchNorm sees 2 clips" in messages
    line = capsys.readouterr().out
    assert "dataset synthetic" in line and "arch i3d" in line and "16 global = 2 per rank x 8" in line
    assert "K 512" in line and "out runs/pretrain" in line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default single-process run warns about nothing
        pretrain.print_config("pretrain", pretrain.parse_args([]), 1, 4)


def test_pretrain_single_process_shuffle_bn():
    torch.manual_seed(0)
    model = pretrain.DSM("mini", dim=4, K=8, bn_splits=2)
    plain = models.Encoder("mini", 4)
    plain.load_state_dict(model.encoder_q.state_dict())  # same weights, ordinary BatchNorm
    x = torch.randn(4, 3, 4, 16, 16)
    x[1::2] += 3  # group 1 (samples 1 and 3) has other statistics than group 0
    alone = [copy.deepcopy(plain), copy.deepcopy(plain)]
    groups = torch.stack([alone[0](x[0::2]), alone[1](x[1::2])], dim=1).flatten(0, 1)  # back in sample order
    assert torch.allclose(model.encoder_q(x), groups, atol=1e-5)
    assert not torch.allclose(plain(x), groups, atol=1e-3)  # one BatchNorm batch would differ
    stats = lambda net: [m.running_var for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d)]
    for s, g0, g1 in zip(stats(model.encoder_q), stats(alone[0]), stats(alone[1])):
        assert torch.allclose(s, (g0 + g1) / 2, atol=1e-5)  # running statistics: the mean of the two groups'
    plain.load_state_dict(model.encoder_k.state_dict())
    torch.manual_seed(1)
    perm = torch.randperm(4)
    shuffled = x[perm]
    expected = torch.stack([plain(shuffled[0::2]), plain(shuffled[1::2])], dim=1).flatten(0, 1)[torch.argsort(perm)]
    torch.manual_seed(1)
    keys = model.encode_keys(x)
    assert set(perm[0::2].tolist()) not in ({0, 2}, {1, 3})  # the seed really regroups the samples
    assert torch.allclose(keys, expected, atol=1e-5)
    with pytest.raises(AssertionError):
        model.encoder_q(x[:3])


def test_pretrain_leaves_the_workers_their_cores(monkeypatch):
    """On the CPU the training process takes the cores its DataLoader workers leave, unless
    OMP_NUM_THREADS is set; it always keeps one."""
    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        for workers in (0, 1, cores + 3):
            pretrain.setup_distributed(workers)
            assert torch.get_num_threads() == max(1, cores - workers), workers
        torch.set_num_threads(3)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        pretrain.setup_distributed(1)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_pretrain_momentum_update():
    model = pretrain.DSM("mini", dim=4, K=8, m=0.9)
    for q, k in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        q.data.fill_(1.0)
        k.data.fill_(3.0)
    model.momentum_update()
    for k in model.encoder_k.parameters():
        assert torch.allclose(k, torch.full_like(k, 0.9 * 3.0 + 0.1 * 1.0))
    assert all(not k.requires_grad for k in model.encoder_k.parameters())


def test_pretrain_shuffle_unshuffle_identity():
    torch.manual_seed(0)
    x = torch.arange(12.0).view(6, 2)
    shuffled, idx_unshuffle = pretrain.batch_shuffle(x)
    assert not torch.equal(shuffled, x) and torch.equal(shuffled.sort(0).values, x)
    assert torch.equal(pretrain.batch_unshuffle(shuffled, idx_unshuffle), x)


def test_pretrain_steps_lower_loss_on_fixed_batch():
    torch.manual_seed(0)
    args = pretrain.parse_args(TINY + ["--loss", "triplet", "--lr", "0.05"])
    model = pretrain.DSM("mini", dim=16, K=0)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=args.lr, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    views = torch.randn(8, 3, 3, 4, 32, 32)
    video = torch.arange(8)
    losses = [float(pretrain.train_step(model, views, video, optimizer, scaler, args, None)["loss"]) for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_pretrain_bad_flags_are_argparse_errors(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--negative", "none", "--loss", "triplet"])
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--moco-k", "8", "--batch-size", "16"])
    assert "--moco-k 8 must hold at least one global batch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        pretrain.parse_args(["--arch", "resnet50"])
    assert "invalid choice" in capsys.readouterr().err


def test_pretrain_queue_longer_than_dataset_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="try --moco-k"):
        pretrain.main(TINY + ["--moco-k", "64", "--out", str(tmp_path)])


def test_pretrain_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    args = TINY + ["--out", str(tmp_path), "--knn-every", "0"]
    pretrain.main(args + ["--epochs", "1"])
    before = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    real_losses = pretrain.dsm_losses

    def nan_losses(*a, **k):
        terms = real_losses(*a, **k)
        return {**terms, "loss": terms["loss"] * float("nan")}

    monkeypatch.setattr(pretrain, "dsm_losses", nan_losses)
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 2"):
        pretrain.main(args + ["--epochs", "2", "--resume"])
    after = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert after["epoch"] == 1
    assert all(torch.equal(before["state_dict"][k], after["state_dict"][k]) for k in before["state_dict"])


def run_pretrain(args, **kwargs):
    return subprocess.Popen([sys.executable, "pretrain.py", *args], env=CPU_ENV, cwd=os.path.dirname(__file__),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_pretrain_kill_and_resume_matches_uninterrupted_run(tmp_path):
    args = TINY + ["--epochs", "3", "--knn-every", "0"]
    whole = run_pretrain(args + ["--out", str(tmp_path / "whole")])
    killed = run_pretrain(args + ["--out", str(tmp_path / "killed")])
    log, checkpoint = tmp_path / "killed" / "log.jsonl", tmp_path / "killed" / "checkpoint.pth"
    deadline = time.time() + 120
    while not checkpoint.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)  # during epoch 2 (or, at worst, between its log line and checkpoint)
    killed.wait()
    if not checkpoint.exists():
        whole.kill()
        pytest.fail(f"no checkpoint within 120 s (return code {killed.returncode}): {killed.stdout.read()}")
    assert killed.returncode == -signal.SIGKILL, killed.stdout.read()  # not a run that had ended on its own
    left = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= left < 3, left  # the resumed run has epochs left to do
    assert whole.wait(timeout=300) == 0, whole.stdout.read()
    resumed = run_pretrain(args + ["--out", str(tmp_path / "killed"), "--resume"])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    a = torch.load(tmp_path / "whole" / "checkpoint.pth", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    logs = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in logs] == [1, 2, 3]


def test_pretrain_two_process_torchrun_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "pretrain.py", *TINY, "--epochs", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=300,
                          env=CPU_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 1 and math.isfinite(records[0]["loss"])  # rank 0 alone writes
    assert (out / "checkpoint.pth").exists() and (out / "backbone.pth").exists()
    assert {"knn_top1", "knn_scene_top1", "p_p", "p_n"} <= set(records[0])


def test_pretrain_knn_top1_weights_votes_by_similarity():
    unit = lambda c, sign=1: [c, sign * math.sqrt(1 - c * c)]  # a unit vector at cosine c to (1, 0)
    train_f = torch.tensor([unit(0.9), unit(0.5), unit(0.5, -1)])
    train_y = torch.tensor([1, 0, 0])
    test_f, test_y = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), torch.tensor([1, 0])
    # Query 0 (label 1), k = 3: class 1 votes exp(0.9 / t), class 0 2 exp(0.5 / t). t = 0.1: 8103 against 297,
    # class 1 (right); t = 10: 1.09 against 2.10, class 0 (wrong), as a plain majority vote would say.
    # Query 1 (label 0): class 0 at cosine -0.5 twice beats class 1 at -0.9 at every t and k: always right.
    knn = lambda k, t: pretrain.knn_top1(train_f, train_y, test_f, test_y, k=k, t=t, chunk=1)
    assert knn(3, 0.1) == 100.0
    assert knn(3, 10.0) == 50.0
    assert knn(1, 10.0) == 100.0  # k = 1: the nearest alone votes


def test_pretrain_knn_monitor_leaves_the_run_unchanged(tmp_path):
    """Watching the kNN must not move the global generator that shuffle-BN draws from."""
    args = pretrain.parse_args(["--num-train", "8", "--num-test", "8", "--batch-size", "4", "--size", "32",
                                "--clip-len", "4", "--workers", "0", "--out", str(tmp_path)])
    loaders = pretrain.knn_loaders(args, rank=0, world=1)
    backbone = models.build_backbone(args.arch)
    torch.manual_seed(3)
    expected = torch.randperm(1000)
    torch.manual_seed(3)
    assert "knn_top1" in pretrain.knn_monitor(backbone, loaders, args, torch.device("cpu"))
    assert torch.equal(torch.randperm(1000), expected)


def test_pretrain_embed_puts_each_video_in_its_row():
    generator = torch.Generator().manual_seed(0)
    clip_means = torch.rand(5, 2, 3, generator=generator)  # (videos, clips, channels)
    texture = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])  # zero mean: the global average pool removes it
    samples = [{"views": clip_means[i, :, :, None, None, None] + texture, "label": i % 2, "scene": 10 + i, "index": i}
               for i in range(5)]
    samples[3] = samples[4]  # video 3 is bad: its dataset slot gives video 4, so 3 is never read
    # Two ranks' DistributedSampler shards, one after the other: [0, 2, 4] and [1, 3, 0], the last a padding repeat.
    order = [i for rank in range(2) for i in torch.utils.data.DistributedSampler(samples, 2, rank, shuffle=False)]
    assert order == [0, 2, 4, 1, 3, 0]
    loader = torch.utils.data.DataLoader(samples, batch_size=2, sampler=order)
    feats, labels, scenes = pretrain.embed(torch.nn.Identity(), loader, torch.device("cpu"))
    read = [0, 1, 2, 4]
    torch.testing.assert_close(feats, F.normalize(clip_means[read].mean(1), dim=1))  # mean over a video's clips
    assert labels.tolist() == [0, 1, 0, 0] and scenes.tolist() == [10, 11, 12, 14]


def _pretrain_two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of two gloo ranks: batch_shuffle, batch_unshuffle and one enqueue; what it saw goes to OUT/rankR.pt."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # one queue init on every rank, as DDP's broadcast of the buffers would give
        model = pretrain.DSM("mini", dim=4, K=12)
        torch.manual_seed(10 + rank)  # each rank draws its own permutation: rank 0's must be the one used
        x = torch.arange(4.0)[:, None] + 100 * rank  # (B, 1): sample i of rank r holds 100 r + i
        shuffled, idx_unshuffle = pretrain.batch_shuffle(x)
        back = pretrain.batch_unshuffle(2 * shuffled + 1, idx_unshuffle)  # outputs computed on the rank it was dealt to
        model.enqueue(torch.full((4, 4), float(rank + 1)), torch.arange(4) + 10 * rank)
        torch.manual_seed(20 + rank)
        torch.save({"x": x, "shuffled": shuffled, "back": back, "queue": model.queue, "queue_video": model.queue_video,
                    "queue_ptr": model.queue_ptr, "rng": torch.get_rng_state(),
                    "rng_saved": pretrain.rng_states()["rng_cpu"]}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_pretrain_shuffle_bn_and_queue_over_two_gloo_ranks(tmp_path):
    torch.multiprocessing.spawn(_pretrain_two_rank_worker, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    dealt = [r["shuffled"].flatten().tolist() for r in ranks]
    assert sorted(dealt[0] + dealt[1]) == [0, 1, 2, 3, 100, 101, 102, 103]  # one permutation for both ranks
    assert any(v >= 100 for v in dealt[0]) and any(v < 100 for v in dealt[1])  # samples crossed to the other rank
    for r in ranks:
        assert torch.equal(r["back"], 2 * r["x"] + 1)  # every rank gets its own samples' outputs, in order
    for key in ("queue", "queue_video", "queue_ptr"):
        assert torch.equal(ranks[0][key], ranks[1][key]), key
    expected = torch.cat([torch.ones(4, 4), torch.full((4, 4), 2.0)], dim=1)  # rank 0's keys, then rank 1's
    assert torch.equal(ranks[0]["queue"][:, :8], expected) and int(ranks[0]["queue_ptr"]) == 8
    assert ranks[0]["queue_video"].tolist() == [0, 1, 2, 3, 10, 11, 12, 13, -1, -1, -1, -1]
    assert all(torch.equal(ranks[0]["rng_saved"][r], ranks[r]["rng"]) for r in range(2))  # each rank's own RNG state


# ---- finetune.py / retrieve.py ---------------------------------------------
import finetune
import retrieve

TINY_DOWNSTREAM = ["--num-train", "16", "--num-test", "8", "--size", "32", "--clip-len", "4", "--stride", "2",
                   "--batch-size", "8", "--workers", "0"]


def test_retrieve_recall_at_k_matches_brute_force():
    generator = torch.Generator().manual_seed(0)
    query, gallery = torch.randn(37, 6, generator=generator), torch.randn(53, 6, generator=generator)
    gallery *= torch.rand(53, 1, generator=generator) * 5 + 0.1  # cosine, not dot product: norms must not matter
    query_labels, gallery_labels = torch.randint(4, (37,), generator=generator), torch.randint(4, (53,), generator=generator)
    ks = (1, 2, 5, 10, 60)
    # chunks of 8 queries against blocks of 7 gallery rows exercise the running top-k merge
    got = retrieve.recall_at_k(query, query_labels, gallery, gallery_labels, ks, chunk=8, gallery_block=7)
    q, g = query.double().numpy(), gallery.double().numpy()
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    order = np.argsort(-sims, axis=1)
    for k in ks:
        hits = sum(query_labels[i].item() in gallery_labels[order[i, :k]].tolist() for i in range(37))
        assert got[f"recall@{k}"] == pytest.approx(100 * hits / 37), k
    assert retrieve.recall_at_k(query, query_labels, gallery, gallery_labels, ks) == got  # one block
    assert got["recall@60"] == 100 * sum(query_labels[i].item() in gallery_labels.tolist() for i in range(37)) / 37
    half = retrieve.recall_at_k(query, query_labels, gallery.half(), gallery_labels, ks, chunk=8)
    assert half["recall@5"] == pytest.approx(got["recall@5"], abs=100 / 37)  # float16 storage: ties may flip


def test_retrieve_recall_at_k_hand_made():
    gallery = torch.tensor([[1.0, 0.0], [0.0, 0.1], [0.7, 0.7]])  # labels 1, 0, 0; short g1 still ranks by angle
    query = torch.tensor([[1.0, 0.1], [0.1, 1.0]])  # labels 0, 1
    got = retrieve.recall_at_k(query, torch.tensor([0, 1]), gallery, torch.tensor([1, 0, 0]), (1, 2, 3))
    # query 0: g0 (wrong), g2 (right) -> first hit at rank 2; query 1: g1, g2 (wrong), g0 (right) -> rank 3
    assert got == {"recall@1": 0.0, "recall@2": 50.0, "recall@3": 100.0}


def test_retrieve_recall_at_k_absent_class_misses_at_every_k():
    gallery = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]])  # 3 items, fewer than K = 5 ... 50; labels 0, 0, 1
    query = torch.tensor([[1.0, 0.0], [1.0, 0.1]])  # class 2 (in no gallery item), class 1 (ranked 3rd of 3)
    got = retrieve.recall_at_k(query, torch.tensor([2, 1]), gallery, torch.tensor([0, 0, 1]), (1, 2, 3, 5, 10, 20, 50))
    assert got == {"recall@1": 0.0, "recall@2": 0.0, "recall@3": 50.0, "recall@5": 50.0, "recall@10": 50.0,
                   "recall@20": 50.0, "recall@50": 50.0}


def _retrieve_args(clip_level: bool) -> argparse.Namespace:
    return argparse.Namespace(amp=False, channels_last=False, clip_level=clip_level, clips_per_video=2, pool="max",
                              pool_size=[1, 1, 1], feature_dtype="float32")


def test_retrieve_extract_averages_raw_clip_features_per_video():
    clips = torch.tensor([[[3.0, 0.0], [0.0, 1.0]],   # video 0: its 2 clips' 2-d features
                          [[0.0, 2.0], [4.0, 0.0]],   # video 1
                          [[9.0, 9.0], [9.0, 9.0]],   # video 2: bad, never read
                          [[1.0, 0.0], [1.0, 0.0]]])  # video 3
    samples = [{"views": clips[i, :, :, None, None, None], "label": 10 + i, "index": i} for i in range(4)]
    order = [0, 1, 3, 0]  # 0 again: the sampler's padding repeat
    loader = torch.utils.data.DataLoader(samples, batch_size=2, sampler=order)
    feats, labels, skipped = retrieve.extract(torch.nn.Identity(), loader, _retrieve_args(False), torch.device("cpu"))
    # The mean of the raw features, then L2: (1.5, 0.5) -> (3, 1) / sqrt(10). Normalising each clip before the
    # mean would give (1, 1) / sqrt(2) for videos 0 and 1.
    expected = torch.tensor([[3 / math.sqrt(10), 1 / math.sqrt(10)], [2 / math.sqrt(5), 1 / math.sqrt(5)], [1.0, 0.0]])
    torch.testing.assert_close(feats, expected)
    assert labels.tolist() == [10, 11, 13] and skipped == 1
    feats, labels, skipped = retrieve.extract(torch.nn.Identity(), loader, _retrieve_args(True), torch.device("cpu"))
    torch.testing.assert_close(feats, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0],
                                                    [1.0, 0.0]]))  # --clip-level: every clip, L2-normalised
    assert labels.tolist() == [10, 10, 11, 11, 13, 13] and skipped == 1


def test_finetune_balanced_subset_sizes_and_seed():
    labels = [0] * 100 + [1] * 50 + [2] * 3
    ten = finetune.balanced_subset(labels, 0.1, seed=0)  # round(0.1 * 153 / 3) = 5 per class, class 2 has 3
    assert np.bincount(np.array(labels)[ten]).tolist() == [5, 5, 3]
    assert ten == sorted(set(ten)) and ten == finetune.balanced_subset(labels, 0.1, seed=0)
    assert ten != finetune.balanced_subset(labels, 0.1, seed=1)
    assert np.bincount(np.array(labels)[finetune.balanced_subset(labels, 0.01, seed=0)]).tolist() == [1, 1, 1]
    with pytest.raises(ValueError):
        finetune.balanced_subset(labels, 0.0, seed=0)


class _FinetuneIndexSource:
    """Frame k of every video is a uniform grey of value k, so a clip's pixels name its frames."""

    def __len__(self):
        return 2

    def label(self, i):
        return i

    def name(self, i):
        return f"video{i}"

    def read(self, i, choose):
        return np.stack([np.full((40, 40, 3), k, np.uint8) for k in choose(100)])


def test_finetune_test_clips_are_uniformly_spaced():
    args = finetune.parse_args(TINY_DOWNSTREAM + ["--pretrained", "none", "--test-clips", "5", "--stride", "3"])
    views = finetune.test_set(args, _FinetuneIndexSource())[1]["views"]  # (num_clips, C, T, H, W), normalised
    assert views.shape == (5, 3, 4, 32, 32)
    frames = ((views[:, 0, :, 0, 0] * augment.STD[0] + augment.MEAN[0]) * 255).round().int()  # (num_clips, T)
    starts = data.test_starts(100, 4, 3, 5)
    assert frames.tolist() == [data.temporal_indices(100, s, 4, 3) for s in starts]
    assert np.ptp(np.diff(starts)) <= 1 and starts[0] > 0 and starts[-1] < 100 - 10  # even gaps inside the video


def test_finetune_linear_protocol_leaves_backbone_unchanged():
    args = finetune.parse_args(TINY_DOWNSTREAM + ["--protocol", "linear", "--pretrained", "none"])
    torch.manual_seed(0)
    model = finetune.build_model(args, num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 2  # fc weight and bias only
    optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9)
    model.train()
    assert model.training and not model.backbone.training  # BN stays in eval mode
    for _ in range(3):
        clips, labels = torch.randn(4, 3, 4, 32, 32) * 3 + 1, torch.randint(3, (4,))  # BN in train mode would move
        finetune.train_step(model, clips, labels, optimizer, torch.amp.GradScaler("cpu", enabled=False), None)
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]) != k.startswith("fc."), k  # running_mean/var/num_batches_tracked included


def _finetune_results(out):
    return json.loads((out / "results.json").read_text())


def test_finetune_end_to_end_results_and_fig1_compare(tmp_path, capsys):
    ckpt = tmp_path / "pretrain.pth"
    torch.manual_seed(1)
    models.save_checkpoint({"arch": "mini", "state_dict": pretrain.DSM("mini", K=16).state_dict()}, str(ckpt))
    finetune.main(TINY_DOWNSTREAM + ["--pretrained", str(ckpt), "--protocol", "linear", "--epochs", "1",
                                     "--eval-train", "--label-fraction", "0.5", "--out", str(tmp_path / "normal")])
    results = _finetune_results(tmp_path / "normal")
    assert {"clip_top1", "clip_top5", "video_top1", "video_top5", "train_video_top1"} <= set(results)
    assert set(results["per_class_top1"]) == set(data.CLASSES)  # 8 test videos, one per class
    assert results["video_top1"] == pytest.approx(np.mean(list(results["per_class_top1"].values())))
    assert results["num_videos"] == 8 and results["train_num_videos"] == 16 and results["num_train_videos"] == 8
    assert results["args"]["protocol"] == "linear"
    assert len((tmp_path / "normal" / "log.jsonl").read_text().splitlines()) == 1
    pretrained = models.load_backbone(str(ckpt), "mini").state_dict()  # linear: still the pretrained backbone
    tuned = models.load_backbone(str(tmp_path / "normal" / "checkpoint.pth"), "mini").state_dict()
    assert all(torch.equal(pretrained[k], tuned[k]) for k in pretrained)
    finetune.main(TINY_DOWNSTREAM + ["--pretrained", "none", "--static", "--epochs", "1", "--test-clips", "2",
                                     "--out", str(tmp_path / "static")])
    capsys.readouterr()
    gains = finetune.compare(str(tmp_path / "normal"), str(tmp_path / "static"))
    assert set(gains) == set(data.CLASSES) and "gain less than 5% from motion" in capsys.readouterr().out


def test_finetune_relative_improvement_and_zero_static():
    normal = {"a": 60.0, "b": 50.0, "c": 10.0, "d": 0.0, "only_normal": 5.0}
    static = {"a": 50.0, "b": 49.0, "c": 0.0, "d": 0.0}
    gains = finetune.relative_improvement(normal, static)
    assert gains == {"a": pytest.approx(0.2), "b": pytest.approx(1 / 49), "c": math.inf, "d": 0.0}
    assert sum(g < 0.05 for g in gains.values()) == 2  # b and d: "less than 5% or no improvement"


def test_finetune_bad_flags_are_argparse_errors(tmp_path, capsys):
    assert finetune.parse_args(["--pretrained", "none", "--split", "1"]).split == "1"  # the good case passes
    for bad, says in ((["--split", "all"], "one split"), (["--label-fraction", "0"], "--label-fraction"),
                      (["--protocol", "probe"], "invalid choice"), (["--split", "4"], "invalid choice"),
                      (["--pretrained", str(tmp_path / "missing.pth")], "no such file")):
        with pytest.raises(SystemExit):
            finetune.parse_args(["--pretrained", "none", *bad])
        assert says in capsys.readouterr().err, bad


def test_retrieve_end_to_end_cache_and_features(tmp_path, monkeypatch):
    args = TINY_DOWNSTREAM + ["--pretrained", "none", "--clips-per-video", "3", "--out", str(tmp_path)]
    first = retrieve.main(args + ["--save-features"])
    assert first["cached"] == {"train": False, "test": False} and first["num_queries"] == 8
    saved = np.load(tmp_path / "features.npz")
    assert saved["train"].shape == (16, 128 * 2 * 7 * 7) and saved["test"].shape == (8, 128 * 2 * 7 * 7)
    assert np.allclose(np.linalg.norm(saved["test"], axis=1), 1, atol=1e-5)
    assert saved["test_labels"].tolist() == [i % 8 for i in range(8)]
    monkeypatch.setattr(retrieve, "extract", lambda *a, **k: pytest.fail("the cache was not used"))
    second = retrieve.main(args)
    assert second["cached"] == {"train": True, "test": True}
    assert all(second[f"recall@{k}"] == first[f"recall@{k}"] for k in retrieve.KS)
    assert json.loads((tmp_path / "results.json").read_text())["recall@1"] == first["recall@1"]
    monkeypatch.undo()
    clips = retrieve.main(args + ["--clip-level"])  # another cache key: extracted again, per clip
    assert clips["cached"] == {"train": False, "test": False} and (clips["num_queries"], clips["num_gallery"]) == (24, 48)


def test_finetune_and_retrieve_two_process_torchrun_match_one_process(tmp_path):
    """7 test videos over 2 ranks: the sampler pads a shard with a repeat, which must be dropped."""
    tiny = [*TINY_DOWNSTREAM, "--num-test", "7", "--pretrained", "none"]
    finetune_args = [*tiny, "--protocol", "linear", "--epochs", "0", "--test-clips", "2"]  # evaluation only
    retrieve_args = [*tiny, "--clips-per-video", "2"]
    finetune.main(finetune_args + ["--out", str(tmp_path / "ft1")])
    one = {"ft": _finetune_results(tmp_path / "ft1"), "rt": retrieve.main(retrieve_args + ["--out", str(tmp_path / "rt1")])}
    for name, script, script_args in (("ft", "finetune.py", finetune_args), ("rt", "retrieve.py", retrieve_args)):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               script, *script_args, "--out", str(tmp_path / f"{name}2")]
        proc = subprocess.run(cmd, cwd=os.path.dirname(__file__), capture_output=True, text=True, timeout=300,
                              env=CPU_ENV)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        two = _finetune_results(tmp_path / f"{name}2")
        keys = ("video_top1", "clip_top1", "per_class_top1", "num_videos") if name == "ft" else ("recall@1", "recall@5")
        assert all(two[k] == pytest.approx(one[name][k]) for k in keys), (name, two, one[name])
    assert _finetune_results(tmp_path / "ft2")["num_videos"] == 7


def test_finetune_video_prediction_is_the_mean_of_clip_softmaxes():
    # 6 classes, 3 clips per video; views hold each clip's logits and the model passes them through.
    logits = torch.tensor([[[10.0, 0, 0, 0, 0, 0], [-20, 0.5, 0, 0, 0, 0], [-20, 0.5, 0, 0, 0, 0]],  # label 0
                           [[0.0, 3, 1, 0, 0, 0]] * 3,  # label 2: second everywhere
                           [[5.0, 4, 3, 2, 1, 0]] * 3])  # label 5: last everywhere
    # Video 0: the mean softmax is 0.333 for class 0 (clip 1 is sure) against 0.195 for class 1, so it is right;
    # the mean logit (-10 against 0.33) and the majority of clips (2 of 3) would both say class 1.
    samples = [{"views": logits[i], "label": label, "index": i} for i, label in enumerate([0, 2, 5])]
    loader = torch.utils.data.DataLoader(samples, batch_size=2, sampler=[2, 0, 1, 2])  # 2 again: padding
    args = argparse.Namespace(amp=False, channels_last=False)
    pred = finetune.predict(torch.nn.Flatten(), loader, args, torch.device("cpu"))
    torch.testing.assert_close(pred["probs"], logits.softmax(2).mean(1))
    got = finetune.accuracies(pred, [f"c{k}" for k in range(6)], clips_per_video=3)
    assert got["video_top1"] == pytest.approx(100 / 3) and got["video_top5"] == pytest.approx(200 / 3)  # videos 0, 1
    # clip top-1: clip 1 of video 0 alone; top-5 adds video 1's three (video 0's clips 2-3 rank class 0 last)
    assert got["clip_top1"] == pytest.approx(100 / 9) and got["clip_top5"] == pytest.approx(400 / 9)
    assert got["per_class_top1"] == {"c0": 100.0, "c2": 0.0, "c5": 0.0}
    assert (got["num_videos"], got["skipped_videos"]) == (3, 0)


def test_finetune_paper_defaults(tmp_path):
    folders = ["--root", str(tmp_path), "--split-dir", str(tmp_path)]
    args = finetune.parse_args(["--dataset", "ucf101", *folders, "--pretrained", "none"])
    assert (args.epochs, args.lr, args.lr_every) == (45, 0.1, 10)
    assert (args.size, args.clip_len, args.stride, args.test_clips, args.arch) == (224, 16, 4, 10, "i3d")
    assert [finetune.learning_rate(args, e) for e in (0, 9, 10, 19, 20, 44)] == \
        pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 1e-5])  # x0.1 every 10 epochs
    assert args.backbone_lr == 1.0  # the paper fine-tunes every weight at one lr


def test_finetune_backbone_learns_at_its_multiple_of_the_fc_lr(tmp_path):
    """Synthetic default: the backbone at 0.1x the fc's lr; linear: the fc is the only group."""
    for protocol, groups in (("full", [0.01, 0.1]), ("linear", [0.1])):
        args = finetune.parse_args(["--pretrained", "none", "--protocol", protocol, "--out", str(tmp_path)])
        model = finetune.build_model(args, 3)
        optimizer = finetune.make_optimizer(model, args)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx(groups)
        trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
        assert trained == {id(p) for p in model.parameters() if p.requires_grad}


# ---- the CUDA paths, checked from the CPU (and on a GPU where there is one) ------------
import pickle


def test_cuda_amp_picks_bf16_only_where_the_gpu_computes_it(monkeypatch):
    """V100, T4, RTX 20xx emulate bf16 (slowly): they get fp16 with loss scaling."""
    args, gpu = argparse.Namespace(amp=True), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert pretrain.amp_dtype_for(args, gpu) == torch.float16  # emulated only
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert pretrain.amp_dtype_for(args, gpu) == torch.bfloat16  # native (Ampere and newer)
    assert pretrain.amp_dtype_for(args, torch.device("cpu")) is None
    assert pretrain.amp_dtype_for(argparse.Namespace(amp=False), gpu) is None


def test_cuda_tests_hide_the_gpus_and_ranks_beyond_the_gpus_stop_clearly(monkeypatch):
    assert CPU_ENV["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d}) on a node without it"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit, match="local rank 1 has no GPU"):
        pretrain.setup_distributed()


def test_cuda_setup_turns_on_cudnn_benchmark(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert pretrain.setup_distributed()[2] == torch.device("cuda", 0)
    assert torch.backends.cudnn.benchmark


def test_cuda_gather_sends_and_receives_contiguous_tensors(monkeypatch):
    """NCCL may stage a gather with the receive buffers' strides: all of them must be contiguous."""
    def all_gather(out, x):
        assert x.is_contiguous() and all(o.is_contiguous() for o in out)
        for r, o in enumerate(out):
            o.copy_(x + r)
    monkeypatch.setattr(pretrain, "world_size", lambda: 2)
    monkeypatch.setattr(pretrain.dist, "all_gather", all_gather)
    x = torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d)  # what --channels-last gives
    assert torch.equal(pretrain.concat_all_gather(x), torch.cat([x, x + 1]))


def _cuda_checkpoint(tmp_path, enabled: bool) -> tuple:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=enabled)
    return model, optimizer, scaler, argparse.Namespace(arch="mini")


@pytest.mark.parametrize("saved, loaded", [(False, True), (True, False)])
def test_cuda_resume_across_precisions(tmp_path, saved, loaded):
    """A checkpoint without loss scaling (fp32, bf16, CPU) resumes with fp16's GradScaler and back."""
    model, optimizer, scaler, args = _cuda_checkpoint(tmp_path, saved)
    if saved:
        scaler.scale(torch.ones(()))
        scaler.update(1024.0)  # a scale of its own
    pretrain.save_resumable(str(tmp_path), model, optimizer, scaler, args, epoch=3)
    model, optimizer, scaler, args = _cuda_checkpoint(tmp_path, loaded)
    assert pretrain.resume(str(tmp_path), model, optimizer, scaler, "mini") == 3
    assert scaler.is_enabled() == loaded


def test_cuda_resume_on_fewer_gpus_restores_each_rank_its_own(tmp_path, monkeypatch):
    model, optimizer, scaler, args = _cuda_checkpoint(tmp_path, False)
    pretrain.save_resumable(str(tmp_path), model, optimizer, scaler, args, epoch=1)
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert len(state["rng_cpu"]) == 1 and state["rng_cuda"] == []  # one rank, no GPU
    states = [torch.full((16,), r, dtype=torch.uint8) for r in range(8)]  # what 8 GPU ranks saved
    models.save_checkpoint({**state, "rng_cuda": states}, str(tmp_path / "checkpoint.pth"))
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append(int(s[0])))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("the states of all 8 GPUs"))
    monkeypatch.setattr(pretrain.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(pretrain.dist, "get_rank", lambda: 3)  # rank 3 of a run on 4 GPUs
    pretrain.resume(str(tmp_path), model, optimizer, scaler, "mini")
    assert restored == [3]


def test_cuda_farneback_runs_without_tf32(monkeypatch):
    seen, conv2d = [], F.conv2d
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # PyTorch's default
    monkeypatch.setattr(augment.F, "conv2d", lambda *a, **k: seen.append(torch.backends.cudnn.allow_tf32) or conv2d(*a, **k))
    augment.farneback_torch(torch.rand(1, 2, 40, 40) * 255)
    assert seen and not any(seen) and torch.backends.cudnn.allow_tf32


def test_cuda_eq7_logits_stay_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    z_a, z_p, z_n = (F.normalize(torch.randn(4, 16, generator=g), dim=1) for _ in range(3))
    queue = F.normalize(torch.randn(16, 64, generator=g), dim=0)
    exact = pretrain.contrastive_logits(z_a, z_p, z_n, queue, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, as CUDA autocast gives
        mixed = pretrain.contrastive_logits(z_a, z_p, z_n, queue, 0.07)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, exact, atol=1e-6)


def test_cuda_workers_receive_no_device_tensors():
    triplet = augment.DSMTriplet(16)
    triplet.s.grids(triplet.s.dst[None].to("meta"))  # the training process caches A on its device
    assert "meta" in triplet.s._A_on
    sent = pickle.loads(pickle.dumps(augment.FramesAndDraws(triplet)))  # what a spawned worker receives
    assert sent.triplet.s._A_on == {}
    assert torch.equal(sent.triplet.s.grid(triplet.s.dst), triplet.s.grid(triplet.s.dst))


def test_cuda_device_path_and_forward_keep_to_the_device():
    """On the meta device every CPU tensor that meets a device tensor raises: apply_batch, DSM.forward
    and the losses must create theirs on the device."""
    triplet = augment.DSMTriplet(24, flow_max=3.0)
    to_device = augment.FramesAndDraws(triplet)
    frames = lambda i: _augment_moving_rgb(4, 30, 40, dx=1 + i % 2, seed=i)
    batch = augment.collate_frames([{"views": to_device(frames(i), frames(i + 4), np.random.default_rng(i)), "index": i}
                                    for i in range(4)])
    views = triplet.apply_batch(batch["views"]["frames"], batch["views"]["draws"], "meta")
    assert views.device.type == "meta" and views.shape == (4, 3, 3, 4, 24, 24)
    model = pretrain.DSM("mini", K=16, bn_splits=2).to("meta")
    out = model(views[:, 0], views[:, 1], views[:, 2], torch.arange(4, device="meta"))
    terms = pretrain.dsm_losses(out, "both", 0.5)
    terms["loss"].backward()
    assert out["logits"].shape == (4, 18) and terms["loss"].device.type == "meta"


def test_cuda_channels_last_converts_the_model():
    args = argparse.Namespace(channels_last=True)
    model = pretrain.place(models.Encoder("mini", 8), args, torch.device("cpu"))
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last_3d) for w in convs)
    assert not convs[0].is_contiguous()  # a 3x3x3 stem: the two formats differ


def _cuda_retrieve_rank(rank: int, world: int, port: int, out: str) -> None:
    """Rank 0 sees a cached split, rank 1 (another node's --out) does not: both must take rank 0's word."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                         timeout=__import__("datetime").timedelta(seconds=30))
    try:
        args = retrieve.parse_args([*TINY_DOWNSTREAM, "--pretrained", "none", "--out", out])
        args.cache_dir = os.path.join(out, f"cache{rank}")
        hit = retrieve.split_features(models.build_backbone("mini"), args, False, rank, world, torch.device("cpu"))[3]
        torch.save({"hit": hit, "files": sorted(os.listdir(args.cache_dir)) if os.path.isdir(args.cache_dir) else []},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_cuda_retrieve_ranks_follow_rank_0_on_the_cache(tmp_path):
    retrieve.main([*TINY_DOWNSTREAM, "--pretrained", "none", "--out", str(tmp_path), "--cache-dir",
                   str(tmp_path / "cache0")])  # rank 0's node holds the test split's features
    torch.multiprocessing.spawn(_cuda_retrieve_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["hit"] and ranks[1]["hit"] and ranks[1]["files"] == []


def test_cuda_device_path_on_the_gpu_gives_the_cpu_views(cuda):
    triplet = augment.DSMTriplet(32, flow_max=3.0)
    to_device = augment.FramesAndDraws(triplet)
    samples = [(_augment_moving_rgb(6, 40, 48, dx=2, seed=i), _augment_moving_rgb(6, 40, 48, dx=1, seed=i + 5))
               for i in range(3)]
    cpu = torch.stack([triplet(c, s, np.random.default_rng(i)) for i, (c, s) in enumerate(samples)])
    batch = augment.collate_frames([{"views": to_device(c, s, np.random.default_rng(i)), "index": i}
                                    for i, (c, s) in enumerate(samples)])
    gpu = triplet.apply_batch(batch["views"]["frames"], batch["views"]["draws"], cuda).cpu()
    assert torch.allclose(gpu[:, :2], cpu[:, :2], atol=1e-4)  # a, p
    assert (gpu[:, 2] - cpu[:, 2]).abs().mean() < 1e-3  # n: Farneback in torch against OpenCV


def test_cuda_one_amp_step(cuda):
    args = argparse.Namespace(amp=True, channels_last=True, loss="both", margin=0.5)
    model = pretrain.place(pretrain.DSM("mini", K=32, bn_splits=2), args, cuda)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.01)
    amp_dtype = pretrain.amp_dtype_for(args, cuda)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    views = torch.randn(8, 3, 3, 4, 32, 32, device=cuda)
    terms = pretrain.train_step(model, views, torch.arange(8, device=cuda), optimizer, scaler, args, amp_dtype)
    assert amp_dtype in (torch.bfloat16, torch.float16) and math.isfinite(float(terms["loss"]))


def test_bench_gpu_without_a_gpu_says_so_in_one_line():
    proc = subprocess.run([sys.executable, "bench.py", "gpu"], cwd=os.path.dirname(__file__), capture_output=True,
                          text=True, env=CPU_ENV, timeout=120)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        "bench.py gpu: no CUDA GPU on this machine (torch.cuda.is_available() is False)"]


def test_bench_gpu_runs_every_row_on_tiny_settings(tmp_path, monkeypatch):
    """Each command of `bench.py gpu` (the CPU stands in for the GPU: --amp is then a no-op) on the
    UCF101 layout it writes, so that the one GPU run is not where a flag or a layout fails."""
    import bench

    layout = bench._gpu_videos(str(tmp_path / "data"), train_per_class=8, test_per_class=2, frames=40,
                               height=48, width=64)
    views = bench._gpu_views(str(tmp_path / "data" / "source.mp4"), "cpu", size=32, clip_len=4, samples=2)
    assert views["views_a_p_max"] < 1e-4 and views["epe_mean"] < 1e-3 < views["flow_px"]
    tiny = ["--arch", "mini", "--size", "32", "--clip-len", "4", "--stride", "2", "--batch-size", "8"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the stage scripts run on the CPU
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    runs = bench._gpu_commands(layout, 0, str(tmp_path / "runs"), paper=tiny, queue=8)
    assert len(runs) == 8
    for name, (command, _, _) in runs.items():  # every pretraining's flags parse; the rows differ only in them
        if command[1] == "pretrain.py":
            pretrain.parse_args(command[2:])
    ran = ("pretrain amp channels-last", "torchrun 1 process (NCCL), amp", "finetune --amp, 1 epoch", "retrieve --amp")
    rows = {name: bench._gpu_stage(*runs[name]) for name in ran}  # finetune and retrieve start from the first
    failed = {name: row["error"] for name, row in rows.items() if "error" in row}
    assert not failed, failed
    assert all(rows[name]["clips_per_s"] > 0 for name in ran[:3]) and "recall@1" in rows["retrieve --amp"]


# ---- visualize.py ----------------------------------------------------------
import csv as _visualize_csv

from PIL import Image as _VisualizeImage

import visualize


def _visualize_heatmap(feature_map, size):
    """One clip's heat as video_heat makes it: the channel mean upsampled (energy), then min-max."""
    return visualize.minmax(visualize.energy(feature_map, size)[0].numpy())


def test_visualize_heatmap_shape_range_and_peak():
    torch.manual_seed(0)
    heat = _visualize_heatmap(torch.randn(1, 4, 2, 3, 3), (8, 12, 12))
    assert heat.shape == (8, 12, 12) and heat.dtype == np.float32
    assert heat.min() == 0.0 and heat.max() == 1.0
    feature_map = torch.zeros(1, 2, 2, 3, 3)
    feature_map[0, 1, 1, 0, 2] = 5.0  # one hot cell: second time step, top row, right column
    peak = _visualize_heatmap(feature_map, (8, 12, 12))
    t, y, x = np.unravel_index(peak.argmax(), peak.shape)
    assert t >= 4 and y < 4 and x >= 8  # the cell's eighth of the upsampled volume
    assert _visualize_heatmap(torch.ones(1, 2, 2, 3, 3), (4, 6, 6)).max() == 0.0  # flat: no contrast


def test_visualize_box_mass_equals_direct_computation():
    torch.manual_seed(1)
    feature_map = torch.rand(1, 3, 2, 4, 5)  # a hand-made activation map
    heat = _visualize_heatmap(feature_map, (3, 8, 10))
    boxes = [(2, 1, 6, 5), (0, 0, 10, 8), (-2, 5, 3, 11)]  # the last wraps left/right and bottom/top
    direct = [heat[0, 1:5, 2:6].sum() / heat[0].sum(), 1.0]
    rows, cols = [5, 6, 7, 0, 1, 2], [8, 9, 0, 1, 2]
    direct.append(heat[2][np.ix_(rows, cols)].sum() / heat[2].sum())
    assert visualize.box_mass(heat, boxes) == pytest.approx(float(np.mean(direct)), rel=1e-6)
    chance = visualize.box_mass(np.ones_like(heat), boxes)
    assert chance == pytest.approx((16 / 80 + 1 + 30 / 80) / 3)
    heat[1] = 0  # a frame without heat has no share and is left out
    assert visualize.box_mass(heat, boxes) == pytest.approx((direct[0] + direct[2]) / 2, rel=1e-6)
    assert np.isnan(visualize.box_mass(np.zeros_like(heat), boxes))


def test_visualize_overlay_is_jet_in_rgb():
    frames = np.full((2, 1, 3, 3), 100, np.uint8)
    heat = np.array([[[0.0, 0.5, 1.0]], [[1.0, 1.0, 1.0]]], np.float32)
    cold, middle, hot = visualize.overlay(frames, heat, alpha=1.0)[0, 0].astype(int)
    assert cold[2] > 100 > cold[0] and hot[0] > 100 > hot[2] and middle[1] == 255  # blue, green, red: not BGR
    half = visualize.overlay(frames, heat)
    assert half.shape == frames.shape and half.dtype == np.uint8
    assert np.abs(half[1].astype(int) - (100 + np.array([128, 0, 0])) // 2).max() <= 1  # mean of frame and red
    assert (visualize.overlay(frames, heat, alpha=0.0) == frames).all()


class _VisualizeFirstChannel(torch.nn.Module):
    """A 'backbone' whose feature map is its input's first channel: the heat must be the red channel."""

    def forward(self, x):
        return x[:, :1]


def test_visualize_video_heat_averages_windows():
    frames = np.random.default_rng(0).integers(0, 256, (11, 6, 5, 3), dtype=np.uint8)
    heat, response, starts = visualize.video_heat(_VisualizeFirstChannel(), frames, 4, 1, 3, torch.device("cpu"), 2)
    assert starts == [0, 3, 6] and heat.shape == (9 + 1, 6, 5)  # frame 10 is in no window
    red = (frames[:10, ..., 0] / 255 - augment.MEAN[0]) / augment.STD[0]
    np.testing.assert_allclose(heat, (red - red.min()) / (red.max() - red.min()), atol=1e-5)
    means = np.array([red[s:s + 4].mean() for s in starts])
    np.testing.assert_allclose(response, (means - means.min()) / (means.max() - means.min()), atol=1e-5)
    with pytest.raises(ValueError, match="fewer than one window"):
        visualize.video_heat(_VisualizeFirstChannel(), frames[:3], 4, 1, 3, torch.device("cpu"))


def test_visualize_probes_change_input_as_specified():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (6, 10, 12, 3), dtype=np.uint8)
    still = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    static = visualize.probe_static(frames, 2)
    assert static.shape == frames.shape and (static == frames[2]).all()
    pasted = visualize.probe_paste(frames, still[1:5, 2:8], 3, 4)
    assert (pasted[:, 3:7, 4:10] == still[1:5, 2:8]).all()
    outside = np.ones((10, 12), bool)
    outside[3:7, 4:10] = False
    assert (pasted[:, outside] == frames[:, outside]).all()
    with pytest.raises(ValueError, match="does not fit"):
        visualize.probe_paste(frames, still[:4, :6], 8, 0)
    blended = visualize.probe_insert(frames, still, 0.25)
    expected = np.round(0.75 * frames.astype(np.float64) + 0.25 * still.astype(np.float64))
    assert np.abs(blended.astype(int) - expected).max() <= 1  # float32 rounding at .5
    assert (visualize.probe_insert(frames, still, 0.0) == frames).all()


def _visualize_decode(path):
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_visualize_cli_synthetic_outputs_decode(tmp_path, capsys):
    ckpt = tmp_path / "random.pth"
    torch.manual_seed(0)
    models.save_checkpoint({"arch": "mini", "state_dict": models.build_backbone("mini").state_dict()}, str(ckpt))
    out = tmp_path / "vis"
    visualize.main(["--pretrained", str(ckpt), "--names", "tiny", "--arch", "mini", "--size", "16", "--clip-len", "4",
                    "--num-test", "2", "--probe", "paste", "--zoom", "2", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "16 windows over 64 frames" in printed and "moving object's box" in printed and "pasted" in printed
    video = _visualize_decode(out / "tiny_paste_heat.mp4")
    assert video.shape == (64, 36, 36, 3)  # short side 18, zoom 2
    sheet = _VisualizeImage.open(out / "tiny_paste_sheet.png")
    sheet.load()
    assert sheet.size == (8 * 36, 14 + 2 * 36)
    with open(out / "tiny_paste_response.csv") as f:
        rows = list(_visualize_csv.DictReader(f))
    assert [int(r["start_frame"]) for r in rows] == list(range(0, 61, 4))
    response = [float(r["response"]) for r in rows]
    assert min(response) == 0.0 and max(response) == 1.0
    _VisualizeImage.open(out / "tiny_paste_response.png").load()


def test_visualize_cli_video_file_and_eval(tmp_path, capsys):
    _data_write_video(tmp_path / "a.avi", num_frames=12, width=40, height=32)
    _data_write_video(tmp_path / "b.avi", num_frames=12, width=48, height=32)
    tiny = ["--arch", "mini", "--size", "16", "--clip-len", "4", "--out", str(tmp_path / "vis")]
    visualize.main(["--video", str(tmp_path / "a.avi"), "--probe", "insert", "--other-video", str(tmp_path / "b.avi"),
                    *tiny])
    video = _visualize_decode(tmp_path / "vis" / "random_insert_heat.mp4")
    assert video.shape[0] == 12 and video.shape[1:3] == (18 // 2 * 2 * 14, 22 * 14)  # 32x40 -> 18x22, zoom 14
    visualize.main(["--eval", "--pretrained", "none", "none", "--names", "a", "b", "--num-test", "2", *tiny])
    assert "| a | " in capsys.readouterr().out
    with open(tmp_path / "vis" / "eval.json") as f:
        results = json.load(f)["results"]
    assert results["a"] == results["b"]  # same seed, same random init, same numbers
    assert 0 < results["a"]["box_mass"] < 1
    with pytest.raises(SystemExit):
        visualize.parse_args(["--pretrained", "none", "--names", "a", "b"])


# ---- bench.py results: the targets ------------------------------------------

import bench


def test_bench_targets_name_every_seed_that_falls_short():
    def seed(dsm_knn: float, dsm_ft: float) -> dict[str, dict[str, float]]:
        return {"random init": {"kNN motion": 15.0, "fine-tune top-1": math.nan},
                "supervised": {"kNN motion": math.nan, "fine-tune top-1": 13.0},
                "MoCo baseline": {"kNN motion": 35.0, "kNN scene": 50.0, "fine-tune top-1": 30.0},
                "DSM (Triplet)": {"kNN motion": 60.0, "fine-tune top-1": math.nan},
                "DSM": {"kNN motion": dsm_knn, "kNN scene": 40.0, "fine-tune top-1": dsm_ft}}

    lines = bench._target_lines([seed(50.0, 60.0), seed(39.0, math.nan)], [0, 2])
    assert len(lines) == len(bench.TARGETS)
    by_target = {target[:3]: line for target, line in zip(bench.TARGETS, lines)}
    assert by_target[("DSM", "random init", "kNN motion")].endswith(": met")
    assert "+15.0, +4.0" in by_target[("DSM", "MoCo baseline", "kNN motion")]
    assert by_target[("DSM", "MoCo baseline", "kNN motion")].endswith("MISSED on the mean")  # mean +9.5, each > 0
    assert by_target[("MoCo baseline", "DSM", "kNN scene")].endswith(": met")
    assert by_target[("DSM", "supervised", "fine-tune top-1")].endswith("MISSED on seed 2")  # a missing run is no lead
    lines = bench._target_lines([seed(50.0, 60.0), seed(34.0, 40.0)], [0, 2])
    assert dict(zip([t[:3] for t in bench.TARGETS], lines))[("DSM", "MoCo baseline", "kNN motion")].endswith(
        "MISSED on seed 2")


def test_bench_cell_counts_the_seeds_that_have_a_value():
    assert bench._cell([1.0, 3.0, math.nan]) == "2.0 ± 1.4 (2 seeds)"  # a Table 4 row past --ablation-seeds
    assert bench._cell([2.0, 4.0]) == "3.0 ± 1.4" and bench._cell([math.nan]) == "—"


def test_bench_decoupling_figure_is_written_for_every_row_with_a_knn(tmp_path):
    def seed(shift: float) -> dict[str, dict[str, float]]:  # bench_results' per-seed cells, no runs behind them
        knn = {"random init": (15.0, 20.0), "supervised": (math.nan, math.nan), "MoCo baseline": (30.0, 70.0),
               "DSM (Triplet)": (45.0, 40.0), "DSM": (55.0, 30.0), "S-warp + T-shift": (40.0, 50.0)}
        return {row: {"kNN motion": x + shift, "kNN scene": y - shift, "R@1": 5.0} for row, (x, y) in knn.items()}

    path = tmp_path / "not yet" / "decoupling.png"  # the folder is created
    last = seed(-1.0)
    last["S-warp + T-shift"] = {"kNN motion": math.nan, "kNN scene": math.nan}  # Table 4 rows: first seeds only
    drawn = bench.plot_decoupling([seed(0.0), seed(2.0), last], str(path))
    assert drawn == ["random init", "MoCo baseline", "DSM (Triplet)", "DSM", "S-warp + T-shift"]  # no kNN: no point
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


# ---- data.py prepare ----


def _prepare_tree(src, names, **kwargs):
    """Videos by `_data_write_video` (96x64, 5 fps, 40 frames, a keyframe every 25) at src/name."""
    for name in names:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        _data_write_video(src / name, **{"width": 96, "height": 64, "gop": 25, **kwargs})


def _prepare_probe(path):
    """(container, codec, width, height, rate, frames decoded, keyframe indices, pix_fmt) of a video."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        keys = [frame.key_frame for frame in container.decode(stream)]
        return (container.format.name, stream.codec_context.name, stream.width, stream.height, stream.average_rate,
                len(keys), [i for i, key in enumerate(keys) if key], stream.pix_fmt)


def _prepare_snapshot(root):
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def test_prepare_size_is_even_and_never_upscaled():
    assert data.prepared_size(1280, 720, 256) == (456, 256)
    assert data.prepared_size(720, 1280, 256) == (256, 456)
    assert data.prepared_size(341, 256, 128) == (170, 128)
    assert data.prepared_size(320, 240, 256) == (320, 240)  # at or below: its own size
    assert data.prepared_size(321, 241, 256) == (320, 240)  # less an odd row and column, never more


def test_prepare_output_size_frames_rate_and_keyframes(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _prepare_tree(src, ["A/v_A_g01_c01.avi"], num_frames=50)
    _prepare_tree(src, ["B/portrait.MP4"], num_frames=45, width=64, height=96)  # the extension in any case
    _prepare_tree(src, ["small.mkv"], width=40, height=30)  # below --short-side
    data.main(["prepare", str(src), str(dst), "--short-side", "48", "--keyframe-every", "8", "--workers", "1"])
    expected = {"A/v_A_g01_c01.avi": (72, 48, 50), "B/portrait.MP4": (48, 72, 45), "small.mkv": (40, 30, 40)}
    for rel, (width, height, frames) in expected.items():
        container, codec, *size, rate, count, keys, pix_fmt = _prepare_probe(dst / rel)
        assert (codec, *size, rate, count, pix_fmt) == ("h264", width, height, 5, frames, "yuv420p"), rel
        assert keys == list(range(0, frames, 8)), rel  # exactly every 8: not the source's 25, no extra at cuts
        files = data.VideoFiles([data.VideoRecord(str(dst / rel), 0)], short_side=min(width, height))
        asked = [frames - 1, 30, 33, 0, 17, 9]  # far in: seeks (5 fps, > 2 s), out of order, the last frame
        assert _data_frame_ids(files.read(0, lambda n: asked)) == asked, rel
    # an .avi holds MP4 (FFmpeg's AVI demuxer dates H.264 frames one late), found by its content
    assert _prepare_probe(dst / "A/v_A_g01_c01.avi")[0].startswith("mov,mp4")
    assert sorted(p.name for p in dst.rglob("*") if p.is_file()) == \
        ["portrait.MP4", "prepare_report.json", "small.mkv", "v_A_g01_c01.avi"]


@pytest.mark.filterwarnings("ignore:BatchNorm sees")  # a batch of 8 in 4 BatchNorm groups: this test is about the data
def test_prepare_ucf101_layout_trains_on_the_prepared_tree(tmp_path):
    out, dst = tmp_path / "synthetic", tmp_path / "prepared"
    data.make_synthetic(str(out), num_train=16, num_test=2, seed=0, scene_bias=0.8, short_side=48)
    data.prepare(str(out / "videos"), str(dst), short_side=32, workers=1)
    records, classes = data.build_records("ucf101", str(dst), str(out / "splits"), 1, True)  # the same split files
    assert classes == list(data.CLASSES) and len(records) == 16 and all(r.path.startswith(str(dst)) for r in records)
    item = data.ClipDataset(data.VideoFiles(records, 32), clip_len=4, stride=2, shift=(2, 20))[3]
    assert item["views"].shape == (2, 4, 32, 32, 3) and item["skipped"] == 0
    pretrain.main(["--dataset", "ucf101", "--root", str(dst), "--split-dir", str(out / "splits"), "--arch", "mini",
                   "--size", "32", "--clip-len", "4", "--stride", "2", "--batch-size", "8",
                   "--moco-k", "8", "--workers", "0", "--epochs", "1", "--knn-every", "0", "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "checkpoint.pth").exists()


def test_prepare_rerun_skips_what_is_done(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _prepare_tree(src, ["a.avi", "b/b.avi", "b/c.avi"])
    assert data.prepare(str(src), str(dst), 48, workers=1)["done"] == 3
    before = _prepare_snapshot(dst / "b")
    _prepare_tree(src, ["d.avi"])
    capsys.readouterr()
    report = data.prepare(str(src), str(dst), 48, workers=1)
    assert (report["done"], report["skipped_existing"], report["failed"]) == (1, 3, [])
    assert "3 already in" in capsys.readouterr().out
    assert _prepare_snapshot(dst / "b") == before  # not rewritten
    assert json.loads((dst / "prepare_report.json").read_text())["skipped_existing"] == 3
    with pytest.raises(SystemExit, match="prepared with"):  # other settings would mix sizes in one tree
        data.prepare(str(src), str(dst), 32, workers=1)


def test_prepare_killed_run_leaves_no_file_under_a_final_name(tmp_path, monkeypatch, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _prepare_tree(src, ["a.avi"])
    final, real_encode = dst / "a.avi", data._encode_frames

    def killed(frames, out, *args):
        real_encode((frame for _, frame in zip(range(5), frames)), out, *args)  # 5 frames, then the kill
        assert (dst / ("a.avi" + data.PART_SUFFIX)).exists() and not final.exists()  # written under the temporary name
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_encode_frames", killed)
    with pytest.raises(KeyboardInterrupt):
        data.prepare(str(src), str(dst), 48, workers=1)
    assert not final.exists() and not list(dst.rglob("*" + data.PART_SUFFIX))
    monkeypatch.undo()
    (dst / ("a.avi" + data.PART_SUFFIX)).write_bytes(b"half a video, as a SIGKILL leaves it")
    capsys.readouterr()
    report = data.prepare(str(src), str(dst), 48, workers=1)
    assert (report["done"], report["skipped_existing"]) == (1, 0)  # the temporary file was not taken for done
    assert "removed 1 partial" in capsys.readouterr().out
    assert _prepare_probe(final)[5] == 40 and not list(dst.rglob("*" + data.PART_SUFFIX))


def test_prepare_bad_videos_are_reported_and_src_is_untouched(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    _prepare_tree(src, ["good/a.avi", "good/b.avi"])
    good = (src / "good/a.avi").read_bytes()
    with av.open(str(src / "good/a.avi")) as container:
        packet_starts = [packet.pos for packet in container.demux(video=0) if packet.size]
    (src / "bad").mkdir()
    (src / "bad/zero.avi").write_bytes(b"")
    (src / "bad/garbage.avi").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    (src / "bad/text.mp4").write_text("not a video\n" * 100)
    (src / "bad/truncated.avi").write_bytes(good[: packet_starts[20]])  # the stream stops after frame 19 of 40
    before = _prepare_snapshot(src)
    run = subprocess.run([sys.executable, "data.py", "prepare", str(src), str(dst), "--short-side", "48",
                          "--workers", "2"], cwd=os.path.dirname(__file__), capture_output=True, text=True,
                         timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    report = json.loads((dst / "prepare_report.json").read_text())
    reasons = {entry["path"]: entry["reason"] for entry in report["failed"]}
    assert set(reasons) == {"bad/zero.avi", "bad/garbage.avi", "bad/text.mp4", "bad/truncated.avi"}
    assert reasons["bad/zero.avi"] == "zero bytes" and reasons["bad/truncated.avi"].startswith("truncated, 20 of the 40")
    assert all(reasons[name] for name in reasons)
    for name in reasons:
        assert name in run.stdout + run.stderr and not (dst / name).exists()
    assert (report["done"], report["short_side"], report["keyframe_every"]) == (2, 48, 16)
    assert "2 done, 0 skipped (already there), 4 failed" in run.stdout
    assert _prepare_snapshot(src) == before  # nothing under SRC written, not even touched
    assert not list(dst.rglob("*" + data.PART_SUFFIX))


def test_prepare_refuses_overlapping_or_missing_folders(tmp_path, capsys):
    src = tmp_path / "src"
    _prepare_tree(src, ["a.avi"])
    for dst, message in ((src, "must not be"), (src / "out", "must not be"), (tmp_path, "must not be")):
        with pytest.raises(SystemExit, match=message):
            data.prepare(str(src), str(dst), 48, workers=1)
    with pytest.raises(SystemExit, match="is not a folder"):
        data.prepare(str(tmp_path / "missing"), str(tmp_path / "dst"), 48)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no videos"):
        data.prepare(str(tmp_path / "empty"), str(tmp_path / "dst"), 48)
    with pytest.raises(SystemExit):
        data.main(["prepare", str(src), str(tmp_path / "dst"), "--short-side", "47"])
    assert "even --short-side" in capsys.readouterr().err
    assert _prepare_snapshot(src).keys() == {"a.avi"}


# ---- the README names only what exists -----------------------------------------------
import pathlib
import re


def test_readme_names_only_existing_functions_and_flags():
    """Every `module.name` the README points at resolves, and every --flag it shows is defined by a script."""
    readme = pathlib.Path(__file__).with_name("README.md").read_text()
    modules = {"augment": augment, "data": data, "models": models, "pretrain": pretrain, "finetune": finetune,
               "retrieve": retrieve, "visualize": visualize, "bench": bench}
    for name in set(re.findall(r"`(augment|data|models|pretrain|finetune|retrieve|visualize|bench)\.(\w[\w.]*)`", readme)):
        module, attribute = name
        if attribute == "py":
            continue
        obj = modules[module]
        for part in attribute.split("."):
            assert hasattr(obj, part), f"README names {module}.{attribute}, which does not exist"
            obj = getattr(obj, part)
    sources = "".join(pathlib.Path(__file__).with_name(f).read_text() for f in
                      ("data.py", "augment.py", "pretrain.py", "finetune.py", "retrieve.py", "visualize.py", "bench.py"))
    torchrun = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port", "--help"}
    for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", readme)) - torchrun:
        assert f'"{flag}"' in sources or f'"{flag[2:]}"' in sources, f"README shows {flag}, which no script defines"
