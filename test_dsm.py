"""Tests for the DSM reference implementation: `pytest test_dsm.py` (CPU, fast).

Sections follow the stages: data, augmentation, models, pretraining.
Every video file a test needs is written by the test itself with PyAV.
"""

# ---- data.py ---------------------------------------------------------------
import warnings

import av
import numpy as np
import pytest
import torch

import data


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
    with pytest.raises(RuntimeError, match="6 bad videos in a row"):
        data.ClipDataset(only_bad)[2]


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
            assert np.all(moves[cls]) and np.all(np.hypot(step_x, step_y) < 0.016 * side), cls
        else:
            assert np.mean(growth > 0 if cls == "Grow" else growth < 0) > 0.8, cls
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

# (data tests go here)

# ---- augment.py ------------------------------------------------------------
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.interpolate import RBFInterpolator

import augment


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


def test_augment_tps_grid_interpolates_control_points():
    rng = np.random.default_rng(0)
    H, W = 20, 24
    flat = rng.choice(H * W, size=9, replace=False)  # control points on distinct pixel centres
    rows, cols = flat // W, flat % W
    dst = _augment_base_grid(H, W)[rows, cols].float()
    src = dst + torch.from_numpy(rng.uniform(-0.2, 0.2, size=(9, 2))).float()
    grid = augment.tps_grid(dst, src, H, W)
    assert grid.shape == (H, W, 2) and grid.dtype == torch.float32
    assert torch.allclose(grid[rows, cols], src, atol=1e-4)  # f(dst_i) = src_i
    assert not torch.allclose(grid, _augment_base_grid(H, W).float(), atol=1e-2)


def test_augment_tps_grid_identity_when_src_is_dst():
    dst = augment.TPSWarp(10, 14, points=4).dst
    grid = augment.tps_grid(dst, dst.clone(), 10, 14)
    assert torch.allclose(grid, _augment_base_grid(10, 14).float(), atol=1e-5)


def test_augment_tps_grid_matches_scipy_rbf_interpolator():
    rng = np.random.default_rng(1)
    H, W = 18, 26
    dst = torch.from_numpy(rng.uniform(-1, 1, size=(12, 2)))
    src = dst + torch.from_numpy(rng.uniform(-0.2, 0.2, size=(12, 2)))
    spline = RBFInterpolator(dst.numpy(), src.numpy(), kernel="thin_plate_spline", degree=1)
    expected = spline(_augment_base_grid(H, W).reshape(-1, 2).numpy()).reshape(H, W, 2)
    grid = augment.tps_grid(dst.float(), src.float(), H, W)
    assert np.abs(grid.double().numpy() - expected).max() < 1e-4


def test_augment_tpswarp_grid_and_warp():
    warp = augment.TPSWarp(16, 20, points=5, offset=0.1)
    assert warp.dst.shape == (25, 2) and warp.dst.min() == -1 and warp.dst.max() == 1
    src = warp.sample_src(np.random.default_rng(2))
    delta = (src - warp.dst).abs()
    assert delta.max() <= 0.2 + 1e-6 and delta.max() > 0.1  # C = 0.1 x frame = 0.2 grid units
    assert torch.allclose(warp.grid(src), augment.tps_grid(warp.dst, src, 16, 20), atol=1e-5)
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
    assert (out[:, 1:, :, -3:] == 0).all()  # black boundary, as the paper describes for large M


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
    half = augment.farneback_flow(clip, scale=0.5)
    assert half.shape == flow.shape
    assert (half[inner] - flow[inner]).abs().mean() < 0.2


def test_augment_farneback_rejects_bad_input():
    with pytest.raises(ValueError, match="scale"):
        augment.farneback_flow(torch.rand(3, 3, 16, 16), scale=0)
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
    out = augment.colour_jitter(clip, 0.2, np.random.default_rng(5))
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
    flips = [torch.equal(whole(square, np.random.default_rng(seed)), resized.flip(-1)) for seed in range(8)]
    assert any(flips) and not all(flips)
    assert all(f or torch.equal(whole(square, np.random.default_rng(s)), resized) for s, f in enumerate(flips))
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


# (augment tests go here)

# ---- models.py -------------------------------------------------------------
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import models

# Parameter counts without fc of the reference implementations (VCP's C3D with BN,
# piergiaj/pytorch-i3d to Mixed_5c, Hara's R3D with shortcut B).
MODELS_PARAMS = {"c3d": 27_661_440, "i3d": 12_287_264, "r3d18": 33_203_904, "r3d34": 63_513_536}
# Last feature map (C, T', H', W') for 16x112x112 and 16x224x224 clips.
MODELS_MAPS = {"c3d": ((512, 2, 7, 7), (512, 2, 14, 14)),
               "i3d": ((1024, 2, 4, 4), (1024, 2, 7, 7)),
               "r3d18": ((512, 1, 4, 4), (512, 1, 7, 7)),
               "r3d34": ((512, 1, 4, 4), (512, 1, 7, 7)),
               "mini": ((128, 1, 4, 4), (128, 1, 7, 7))}


def _models_meta(arch: str) -> torch.nn.Module:
    with torch.device("meta"):  # no memory, no compute: shapes and counts only
        return models.build_backbone(arch)


@pytest.mark.parametrize("arch", sorted(MODELS_PARAMS))
def test_models_param_counts(arch):
    n = sum(p.numel() for p in _models_meta(arch).parameters())
    assert abs(n - MODELS_PARAMS[arch]) <= 0.005 * MODELS_PARAMS[arch], n


def test_models_mini_is_cpu_sized():
    backbone = _models_meta("mini")
    assert sum(p.numel() for p in backbone.parameters()) < 2e6
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


@pytest.mark.parametrize("arch", models.ARCHS)
def test_models_meta_shapes_match_cpu(arch):
    torch.manual_seed(0)
    backbone = models.build_backbone(arch).eval()
    with torch.no_grad():
        real = backbone(torch.randn(1, 3, 9, 50, 50))
    meta = _models_meta(arch)(torch.empty(1, 3, 9, 50, 50, device="meta"))
    assert real.shape == meta.shape and real.shape[1] == backbone.out_channels


@pytest.mark.parametrize("t, h", [(16, 224), (9, 50), (10, 47), (7, 113)])
def test_models_i3d_same_padding_gives_ceil_sizes(t, h):
    # TF "same": every strided layer outputs ceil(size / stride); I3D halves time 3 times
    # (Conv3d_1a, MaxPool3d_4a, MaxPool3d_5a) and space 5 times.
    halve = lambda n, k: n if k == 0 else halve(math.ceil(n / 2), k - 1)
    out = _models_meta("i3d")(torch.empty(1, 3, t, h, h + 1, device="meta"))
    assert tuple(out.shape) == (1, 1024, halve(t, 3), halve(h, 5), halve(h + 1, 5))


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


@pytest.mark.parametrize("arch", models.ARCHS)
def test_models_channels_last_and_bf16_autocast(arch):
    torch.manual_seed(0)
    backbone = models.build_backbone(arch).eval()
    x = torch.randn(2, 3, 8, 40, 40)
    with torch.no_grad():
        reference = backbone(x)
        backbone.to(memory_format=torch.channels_last_3d)
        x_cl = x.to(memory_format=torch.channels_last_3d)
        out = backbone(x_cl)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = backbone(x_cl)
    scale = reference.abs().max()
    assert (out - reference).abs().max() <= 1e-4 * scale
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - reference).abs().max() <= 0.05 * scale


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
# (models tests go here)

# ---- pretrain.py -----------------------------------------------------------
# (pretrain tests go here)
