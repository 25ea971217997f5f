"""Data stage of DSM: which frames make a clip (T frames at a stride, paper 16 x 4), the negative's temporal shift
(Eq. 4), the 10 test clips per video; videos of UCF101, HMDB51, Kinetics-400 or plain-list split files decoded with
PyAV, or drawn on the fly (synthetic: the classes are motions); `prepare` re-encodes a dataset once at training size,
a keyframe every 16 frames (README, "Datasets"). ClipDataset calls augment.py's `transform(clip, shifted, rng)`.

    python data.py make-synthetic OUT                  # the synthetic dataset as UCF101-style files
    python data.py prepare SRC DST --short-side 256    # re-encode once, then train with --root DST
"""
import argparse
import contextlib
import csv
import json
import os
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from fractions import Fraction
from types import SimpleNamespace

import av
import numpy as np
import torch
from tqdm import tqdm

# Temporal-shift bounds (alpha1, alpha2) in frames (Default Settings): Kinetics videos are longer.
SHIFT_DEFAULTS = {"synthetic": (2, 20), "ucf101": (2, 20), "hmdb51": (2, 20), "kinetics": (4, 30), "list": (2, 20)}
SEEK_AFTER_SECONDS = 2.0  # closer to the start than this, decoding from frame 0 beats a seek
END_SLACK = 3             # headers that over-count by this many frames are padded, not "truncated"
PART_SUFFIX = ".partial"  # NAME + PART_SUFFIX until whole, then renamed; no video extension, so no rerun takes it


def short_side_for(size: int) -> int:
    """Short side to decode at for a crop of `size` (the usual 8/7: 128 for 112, 256 for 224)."""
    return round(size * 8 / 7)


def temporal_indices(num_frames: int, start: int, clip_len: int, stride: int) -> list[int]:
    """Indices start, start+stride, ... of a clip, looping from the beginning past the end."""
    assert num_frames > 0 and clip_len > 0 and stride > 0, (num_frames, clip_len, stride)
    return [(start + k * stride) % num_frames for k in range(clip_len)]


def sample_shift(rng: np.random.Generator, alpha1: int, alpha2: int) -> int:
    """tau ~ U[alpha1, alpha2], an integer number of frames, both ends included (Eq. 4)."""
    if not 0 <= alpha1 <= alpha2:
        raise ValueError(f"temporal shift needs 0 <= alpha1 <= alpha2, got ({alpha1}, {alpha2})")
    return int(rng.integers(alpha1, alpha2 + 1))


def last_start(num_frames: int, clip_len: int, stride: int) -> int:
    """The last start at which a clip (span (clip_len - 1) * stride + 1) ends inside the video, else 0."""
    return max(num_frames - ((clip_len - 1) * stride + 1), 0)


def train_indices(num_frames: int, clip_len: int, stride: int, shift: tuple[int, int] | None,
                  rng: np.random.Generator, static: bool = False) -> list[int]:
    """The anchor clip, then with shift = (alpha1, alpha2) its frames tau later (Eq. 4); static: one frame (Fig. 1)."""
    if static:
        anchor = [int(rng.integers(num_frames))] * clip_len
    else:  # a clip never jumps: it starts where it fits
        start = int(rng.integers(last_start(num_frames, clip_len, stride) + 1))
        anchor = temporal_indices(num_frames, start, clip_len, stride)
    tau = None if shift is None else sample_shift(rng, *shift)
    return anchor if tau is None else anchor + [(k + tau) % num_frames for k in anchor]  # Eq. 4 loops past the end


def test_starts(num_frames: int, clip_len: int, stride: int, num_clips: int) -> list[int]:
    """Clip k starts at the centre of the k-th of num_clips equal parts of the valid starts (a short video: 0)."""
    assert num_frames > 0 and num_clips > 0, (num_frames, num_clips)
    return [(2 * k + 1) * last_start(num_frames, clip_len, stride) // (2 * num_clips) for k in range(num_clips)]


@dataclass(frozen=True)
class VideoRecord:
    path: str
    label: int  # 0-based


def _lines(path: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines; the official files mix CRLF and LF."""
    with open(path, encoding="utf-8") as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]


def _pair(text: str, where: str, at_first_space: bool = False) -> tuple[str, str]:
    parts = text.split(maxsplit=1) if at_first_space else text.rsplit(maxsplit=1)
    if len(parts) != 2:
        raise ValueError(f"{where}: expected two fields, got {text!r}")
    return parts[0], parts[1]


def read_ucf101(root: str, split_dir: str, split: int, train: bool) -> tuple[list[VideoRecord], list[str]]:
    """UCF101: classInd.txt '1 ApplyEyeMakeup'; trainlist0S.txt 'Class/v_..avi 1'; testlist0S.txt 'Class/v_..avi'."""
    class_file = os.path.join(split_dir, "classInd.txt")
    numbered = sorted((int(num), name) for num, name in
                      (_pair(text, f"{class_file}:{n}", at_first_space=True) for n, text in _lines(class_file)))
    if [num for num, _ in numbered] != list(range(1, len(numbered) + 1)):
        raise ValueError(f"{class_file}: class numbers are not 1..{len(numbered)}")
    index = {name: k for k, (_, name) in enumerate(numbered)}
    list_file, records = os.path.join(split_dir, f"{'train' if train else 'test'}list0{split}.txt"), []
    for n, text in _lines(list_file):
        rel, *given = text.split()
        cls = rel.split("/")[0]
        if cls not in index:
            raise ValueError(f"{list_file}:{n}: class folder {cls!r} is not in {class_file}")
        if given and int(given[0]) - 1 != index[cls]:
            raise ValueError(f"{list_file}:{n}: label {given[0]} disagrees with classInd's {index[cls] + 1} for {cls}")
        records.append(VideoRecord(os.path.join(root, rel), index[cls]))
    return records, list(index)


def read_hmdb51(root: str, split_dir: str, split: int, train: bool) -> tuple[list[VideoRecord], list[str]]:
    """HMDB51: <class>_test_split<S>.txt lines '<name>.avi T', T = 1 train, 2 test, 0 unused."""
    pattern = re.compile(rf"^(.+)_test_split{split}\.txt$")
    classes = sorted(m.group(1) for m in map(pattern.match, os.listdir(split_dir)) if m)
    if not classes:
        raise FileNotFoundError(f"no *_test_split{split}.txt files in {split_dir}")
    records = []
    for label, cls in enumerate(classes):
        split_file = os.path.join(split_dir, f"{cls}_test_split{split}.txt")
        for n, text in _lines(split_file):
            name, tag = _pair(text, f"{split_file}:{n}")
            if tag not in ("0", "1", "2"):
                raise ValueError(f"{split_file}:{n}: split tag {tag!r} is not 0, 1 or 2")
            if tag == ("1" if train else "2"):
                records.append(VideoRecord(os.path.join(root, cls, name), label))
    return records, classes


def _kinetics_rows(csv_path: str) -> list[dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = {"label", "youtube_id", "time_start", "time_end", "split"} - set(rows[0] if rows else ())
    if missing:
        raise ValueError(f"{csv_path}: missing columns {sorted(missing)}")
    return rows


def read_kinetics(root: str, csv_path: str, train: bool, classes: list[str]) -> tuple[list[VideoRecord], list[str]]:
    """Kinetics CSV rows of the split; a video is the first on disk of <split>/<label>/<id>[_<start>_<end>].mp4."""
    index, records = {name: k for k, name in enumerate(classes)}, []
    for n, row in enumerate(_kinetics_rows(csv_path), 2):
        if row["split"] not in ({"train"} if train else {"val", "validate", "test"}):
            continue
        if row["label"] not in index:
            raise ValueError(f"{csv_path}:{n}: label {row['label']!r} is not a training class")
        stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
        paths = [os.path.join(root, row["split"], folder, name + ".mp4")
                 for folder in (row["label"], row["label"].replace(" ", "_")) for name in (stem, row["youtube_id"])]
        records.append(VideoRecord(next((p for p in paths if os.path.exists(p)), paths[0]), index[row["label"]]))
    return records, classes


def build_records(dataset: str, root: str, split_dir: str, split: int,
                  train: bool) -> tuple[list[VideoRecord], list[str]]:
    """Records and classes of one split, every video on disk; kinetics: train.csv's classes, validate.csv or val.csv."""
    part = "train" if train else "test"
    if dataset == "ucf101":
        where = os.path.join(split_dir, f"{part}list0{split}.txt")
        records, classes = read_ucf101(root, split_dir, split, train)
    elif dataset == "hmdb51":
        where = os.path.join(split_dir, f"*_test_split{split}.txt")
        records, classes = read_hmdb51(root, split_dir, split, train)
    elif dataset == "kinetics":
        train_csv, *val_csvs = (os.path.join(split_dir, name) for name in ("train.csv", "validate.csv", "val.csv"))
        where = train_csv if train else next((p for p in val_csvs if os.path.exists(p)), val_csvs[0])
        classes = sorted({row["label"] for row in _kinetics_rows(train_csv)})
        records, classes = read_kinetics(root, where, train, classes)
    elif dataset == "list":  # 'relative/path.mp4 LABEL' (0-based); the classes are the numbers '0', '1', ...
        where, records = os.path.join(split_dir, f"{part}list.txt"), []
        for n, text in _lines(where):
            rel, label = _pair(text, f"{where}:{n}")
            if not label.isdigit():
                raise ValueError(f"{where}:{n}: label {label!r} is not a non-negative integer")
            records.append(VideoRecord(os.path.join(root, rel), int(label)))
        classes = [str(k) for k in range(max((r.label for r in records), default=-1) + 1)]
    else:
        raise ValueError(f"dataset {dataset!r} has no split files; choose from ucf101, hmdb51, kinetics, list")
    if not records:
        raise ValueError(f"{where} lists no videos for this split")
    absent = [r.path for r in records if not os.path.exists(r.path)]
    if absent:
        raise FileNotFoundError(f"{len(absent)} of the {len(records)} videos in {where} are not on disk, "
                                f"e.g. {', '.join(absent[:5])}")
    return records, classes


class BadVideo(Exception):
    """A video that cannot give the frames asked for; the message names the file and the reason."""


class BadVideoWarning(UserWarning):
    """Issued once per file and process when ClipDataset skips a bad video."""


def _frame_rate(stream: av.video.stream.VideoStream) -> Fraction | None:
    return stream.average_rate or stream.guessed_rate or stream.base_rate


def _count_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """Frames in the stream: from the header, else duration x rate, else by decoding them all."""
    if stream.frames > 0:
        return stream.frames
    rate = _frame_rate(stream)
    if rate and stream.duration:
        return round(float(stream.duration * stream.time_base * rate))
    if rate and container.duration:
        return round(container.duration / av.time_base * float(rate))
    count = sum(1 for _ in container.decode(stream))
    container.seek(stream.start_time or 0, stream=stream)
    return count


@contextlib.contextmanager
def _open_video(path: str, threads: int = 0):
    """(container, first video stream, frame count); BadVideo names the file's fault (others' errors raise as is)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        raise BadVideo(f"{path}: {'zero bytes' if os.path.isfile(path) else 'missing'}")
    try:
        with av.open(path, metadata_errors="ignore") as container:
            if not container.streams.video:
                raise BadVideo(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if threads:
                stream.codec_context.thread_count = threads
            yield container, stream, _count_frames(container, stream)
    except (av.FFmpegError, OSError) as error:
        if getattr(error, "filename", None) not in (None, path):
            raise
        raise BadVideo(f"{path}: not a video or damaged ({error})") from error


def _rgb(frame: av.VideoFrame, short_side: int) -> np.ndarray:
    """(H, W, 3) uint8 with the short side resized to `short_side`, aspect kept."""
    scale = short_side / min(frame.width, frame.height)
    return frame.to_ndarray(width=max(1, round(frame.width * scale)),
                            height=max(1, round(frame.height * scale)), format="rgb24")


def _scan(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
          wanted: list[int], num_frames: int, short_side: int, seeked: bool) -> dict[int, np.ndarray] | None:
    """The frames `wanted` (sorted, unique) by time stamp x rate, an index in a gap getting the frame on screen; None
    if a seek landed past wanted[0]. A stream that ends early lacks the rest, unless within END_SLACK of its header."""
    rate, start = _frame_rate(stream), stream.start_time or 0
    frames_per_tick = float(stream.time_base * rate) if rate else 0.0
    out, j, last, last_index = {}, 0, None, -1
    for count, frame in enumerate(container.decode(stream)):
        stamped = frame.pts is not None and rate
        if not stamped and seeked:
            return None
        index = round((frame.pts - start) * frames_per_tick) if stamped else count
        if last is None and seeked and index > wanted[0]:
            return None
        while j < len(wanted) and wanted[j] <= index:
            out[wanted[j]] = _rgb(frame if wanted[j] == index or last is None else last, short_side)
            j += 1
        if j == len(wanted):
            return out
        last, last_index = frame, index
    if last is not None and last_index >= num_frames - 1 - END_SLACK:
        out.update((k, _rgb(last, short_side)) for k in wanted[j:])
    return out


def _decode(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
            wanted: list[int], num_frames: int, short_side: int) -> dict[int, np.ndarray]:
    """The frames `wanted`, seeking to the keyframe before the first one when it is far in."""
    rate, start = _frame_rate(stream), stream.start_time or 0
    if rate and wanted[0] > SEEK_AFTER_SECONDS * rate:
        container.seek(start + int(wanted[0] / (rate * stream.time_base)), stream=stream)
        frames = _scan(container, stream, wanted, num_frames, short_side, seeked=True)
        if frames is not None:
            return frames
        container.seek(start, stream=stream)  # the seek overshot: decode from the beginning
    return _scan(container, stream, wanted, num_frames, short_side, seeked=False)


class VideoFiles:
    """A source of videos stored as files, decoded with PyAV."""

    def __init__(self, records: list[VideoRecord], short_side: int, min_frames: int = 1):
        if short_side < 1 or min_frames < 1:
            raise ValueError(f"short_side and min_frames must be >= 1, got {short_side}, {min_frames}")
        self.records, self.short_side, self.min_frames = list(records), short_side, min_frames

    def __len__(self) -> int:
        return len(self.records)

    def label(self, i: int) -> int:
        return self.records[i].label

    def name(self, i: int) -> str:
        return self.records[i].path

    def read(self, i: int, choose: Callable[[int], list[int]]) -> np.ndarray:
        """uint8 (len(indices), H, W, 3) of the frames indices = choose(num_frames), in that order."""
        path = self.records[i].path
        with _open_video(path) as (container, stream, num_frames):
            if num_frames < self.min_frames:
                raise BadVideo(f"{path}: {num_frames} frames, fewer than the {self.min_frames} needed")
            indices = choose(num_frames)
            if not indices or not all(0 <= k < num_frames for k in indices):
                raise ValueError(f"choose({num_frames}) gave indices outside [0, {num_frames}): {indices}")
            frames = _decode(container, stream, sorted(set(indices)), num_frames, self.short_side)
        lost = [k for k in indices if k not in frames]
        if lost:
            raise BadVideo(f"{path}: truncated, frame {min(lost)} of the {num_frames} in its header does not decode")
        return np.stack([frames[k] for k in indices])


# Pairs that differ only in direction, so that no single frame tells the class apart.
CLASSES = ("Left", "Right", "Up", "Down", "Clockwise", "Anticlockwise", "Grow", "Shrink")
SCENES = ("HStripes", "VStripes", "Diagonals", "Checker", "Blobs", "Gradient", "Noise", "Rings")
# Two colours per scene, every channel in [60, 200]: the object's black rim shows on all of them.
PALETTES = np.array([
    [[190, 80, 70], [200, 170, 150]], [[70, 120, 190], [160, 190, 200]], [[80, 160, 80], [190, 200, 120]],
    [[180, 180, 180], [90, 90, 90]], [[150, 80, 170], [200, 150, 90]], [[60, 150, 150], [200, 120, 110]],
    [[130, 110, 80], [190, 170, 130]], [[170, 110, 140], [110, 170, 160]]], dtype=np.float32)
SPLIT_IDS = {"train": 0, "test": 1}


class SyntheticVideos:
    """Videos drawn on the fly, deterministic in (seed, split, i): an object whose motion is the class over a static
    scene, the class's own with probability scene_bias in the train split, independent of the class in test."""

    def __init__(self, split: str, num_videos: int, seed: int = 0, scene_bias: float = 0.8,
                 short_side: int = 128, num_frames: int = 64):
        if split not in SPLIT_IDS or num_videos < 1 or short_side < 8 or num_frames < 1 or not 0 <= scene_bias <= 1:
            raise ValueError(f"need split 'train' or 'test', num_videos >= 1, short_side >= 8, num_frames >= 1, 0 <= "
                             f"scene_bias <= 1; got {split!r}, {num_videos}, {short_side}, {num_frames}, {scene_bias}")
        self.split, self.seed, self.scene_bias = split, seed, scene_bias
        self.short_side, self.num_frames = short_side, num_frames
        self.num_classes, self.classes, self.scenes = len(CLASSES), list(CLASSES), list(SCENES)
        self._videos = [self._draw_video(i) for i in range(num_videos)]

    def _draw_video(self, i: int) -> SimpleNamespace:
        """Everything random about video i, lengths in pixels."""
        rng = np.random.default_rng([self.seed, SPLIT_IDS[self.split], i])
        side, label, keep, other = self.short_side, i % len(CLASSES), rng.random(), int(rng.integers(1, len(SCENES)))
        if self.split == "train":
            scene = label if keep < self.scene_bias else (label + other) % len(SCENES)
        else:
            scene = int(rng.integers(len(SCENES)))
        first = rng.integers(0, 256, 3)
        colours = np.stack([first, (first + 128) % 256]).astype(np.uint8)  # checker colours, 128 apart everywhere
        return SimpleNamespace(  # speed per frame, size the side or diameter, an orbit's start angle and radius
            label=label, scene=scene, speed=side * rng.uniform(0.025, 0.035), size=side * rng.uniform(0.20, 0.25),
            disk=bool(rng.integers(2)), colours=colours, cells=int(rng.integers(2, 5)),
            x0=side * rng.random(), y0=side * rng.random(), theta0=2 * np.pi * rng.random(),
            radius=side * rng.uniform(0.20, 0.28), bg_shift=rng.random(2), bg_freq=rng.uniform(0.85, 1.15),
            bg_colour=PALETTES[scene] + rng.uniform(-15, 15, (2, 3)), bg_seed=int(rng.integers(2**31)))

    def __len__(self) -> int:
        return len(self._videos)

    def label(self, i: int) -> int:
        return self._videos[i].label

    def scene(self, i: int) -> int:
        return self._videos[i].scene

    def name(self, i: int) -> str:
        """UCF101-style 'Class/v_Class_gXX_cYY.avi'; train takes odd groups, test even ones."""
        cls, k = CLASSES[self.label(i)], i // len(CLASSES)
        return f"{cls}/v_{cls}_g{2 * (k // 10) + 1 + SPLIT_IDS[self.split]:02d}_c{k % 10 + 1:02d}.avi"

    def _state(self, v: SimpleNamespace, t: int) -> tuple[float, float, float]:
        """Object centre x, y and size in frame t. Translations wrap around the frame."""
        side, travel = self.short_side, v.speed * t
        if v.label < 4:
            dx, dy = [(-travel, 0), (travel, 0), (0, -travel), (0, travel)][v.label]
            return (v.x0 + dx) % side, (v.y0 + dy) % side, v.size
        if v.label < 6:  # y points down, so a growing angle turns clockwise on screen
            theta = v.theta0 + (travel if v.label == 4 else -travel) / v.radius
            return side / 2 + v.radius * np.cos(theta), side / 2 + v.radius * np.sin(theta), v.size
        # 0.5x to 1.5x the size in one ramp over the whole video: a size that jumps back is a jump cut.
        grown = v.size * t / max(self.num_frames - 1, 1)
        return v.x0, v.y0, 0.5 * v.size + (grown if v.label == 6 else v.size - grown)

    def box(self, i: int, t: int) -> tuple[float, float, float, float]:
        """x0, y0, x1, y1 in pixels of the object in frame t; past an edge it goes on at the opposite side."""
        x, y, size = self._state(self._videos[i], t)
        return x - size / 2, y - size / 2, x + size / 2, y + size / 2

    def _background(self, v: SimpleNamespace) -> np.ndarray:
        """(H, W, 3) uint8 static scene: its palette mixed by a texture of its kind."""
        side, f = self.short_side, v.bg_freq
        xs = np.broadcast_to(((np.arange(side) + 0.5) / side)[None, :], (side, side))  # (H, W) in frame sides
        x, y = xs + v.bg_shift[0], xs.T + v.bg_shift[1]  # shifted per video, so no two look alike
        noise = lambda: np.random.default_rng(v.bg_seed).random(((side + 1) // 2, (side + 1) // 2))
        waves = {"HStripes": lambda: np.sin(12 * np.pi * f * y), "VStripes": lambda: np.sin(12 * np.pi * f * x),
                 "Diagonals": lambda: np.sin(10 * np.pi * f * (x + y)),
                 "Checker": lambda: 2.0 * ((np.floor(5 * f * x) + np.floor(5 * f * y)) % 2) - 1,
                 "Blobs": lambda: np.sin(3 * np.pi * f * x) * np.sin(3 * np.pi * f * y),
                 "Gradient": lambda: np.cos(np.pi * f * (x + 0.5 * y) / 1.5),
                 # 2x2 blocks survive video coding better than single pixels
                 "Noise": lambda: 2 * noise().repeat(2, 0).repeat(2, 1)[:side, :side] - 1,
                 "Rings": lambda: np.sin(8 * np.pi * f * np.hypot(xs - v.bg_shift[0], xs.T - v.bg_shift[1]))}
        mix = (0.5 + 0.5 * waves[SCENES[v.scene]]())[..., None]  # (H, W, 1) in [0, 1]
        return (v.bg_colour[0] + (v.bg_colour[1] - v.bg_colour[0]) * mix).astype(np.uint8)

    def _draw(self, v: SimpleNamespace, background: np.ndarray, t: int) -> np.ndarray:
        """(H, W, 3) uint8 frame t: the checkered object with a black rim over the scene."""
        side, centres = self.short_side, np.arange(self.short_side) + 0.5
        cx, cy, size = self._state(v, t)
        dx = (centres - cx + side / 2) % side - side / 2  # (W,) toroidal offsets from the centre
        dy = (centres - cy + side / 2) % side - side / 2  # (H,)
        cols, rows = np.flatnonzero(np.abs(dx) <= size / 2), np.flatnonzero(np.abs(dy) <= size / 2)
        dx, dy = dx[cols][None, :], dy[rows][:, None]  # only the object's rows and columns
        reach = np.hypot(dx, dy) if v.disk else np.maximum(np.abs(dx), np.abs(dy))  # (h, w)
        cell = np.floor((dx / size + 0.5) * v.cells) + np.floor((dy / size + 0.5) * v.cells)
        texture = v.colours[(cell % 2).astype(np.intp)]  # (h, w, 3); scales with the object
        texture[reach > size / 2 - max(1.0, side / 64)] = 0
        frame = background.copy()
        patch = frame[np.ix_(rows, cols)]
        patch[reach <= size / 2] = texture[reach <= size / 2]
        frame[np.ix_(rows, cols)] = patch
        return frame

    def render(self, i: int, indices: Sequence[int]) -> np.ndarray:
        """uint8 (len(indices), S, S, 3), drawing each distinct frame once."""
        v = self._videos[i]
        background = self._background(v)
        distinct, order = np.unique(np.asarray(indices, dtype=np.int64), return_inverse=True)
        return np.stack([self._draw(v, background, int(t)) for t in distinct])[order.reshape(-1)]

    def read(self, i: int, choose: Callable[[int], list[int]]) -> np.ndarray:
        return self.render(i, choose(self.num_frames))


def _write_text(path: str, lines: list[str]) -> None:
    with open(path + PART_SUFFIX, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    os.replace(path + PART_SUFFIX, path)


def make_synthetic(out: str, num_train: int, num_test: int, seed: int, scene_bias: float, short_side: int) -> None:
    """OUT/videos/<Class>/v_<Class>_gXX_cYY.avi (MPEG-4 part 2, as UCF101), then UCF101 split 1 files in OUT/splits."""
    lists = {}
    for split, num_videos in (("train", num_train), ("test", num_test)):
        source = SyntheticVideos(split, num_videos, seed, scene_bias, short_side)
        for i in tqdm(range(len(source)), desc=f"synthetic {split}"):
            path = os.path.join(out, "videos", source.name(i))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with av.open(path + PART_SUFFIX, "w", format="avi") as container:
                stream = container.add_stream("mpeg4", rate=25)
                stream.width, stream.height, stream.pix_fmt = short_side, short_side, "yuv420p"
                stream.codec_context.qmin = stream.codec_context.qmax = 3  # ~4/255 mean error at 128 x 128
                for image in source.render(i, range(source.num_frames)):
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
                container.mux(stream.encode())
            os.replace(path + PART_SUFFIX, path)
        lists[split] = [(source.name(i), source.label(i)) for i in range(len(source))]
    os.makedirs(os.path.join(out, "splits"), exist_ok=True)
    _write_text(os.path.join(out, "splits", "classInd.txt"), [f"{k + 1} {c}" for k, c in enumerate(CLASSES)])
    _write_text(os.path.join(out, "splits", "trainlist01.txt"), [f"{rel} {label + 1}" for rel, label in lists["train"]])
    _write_text(os.path.join(out, "splits", "testlist01.txt"), [rel for rel, _ in lists["test"]])


_warned: set[str] = set()  # bad videos already reported by this process


class ClipDataset(torch.utils.data.Dataset):
    """Clips of a VideoFiles or SyntheticVideos. train: views = transform(clip, shifted tau later (Eq. 4) or None, rng);
    test: the stack of transform(clip, None, rng) over the test_starts clips; no transform: uint8 frames. static: one
    frame (Fig. 1). Sample i draws from default_rng([seed, epoch, i]): call set_epoch each epoch. A bad video is
    skipped for the next that decodes ("index": the video used; "skipped" > 0 exactly when i is bad)."""

    def __init__(self, source, clip_len: int = 16, stride: int = 4, transform: Callable | None = None,
                 shift: tuple[int, int] | None = None, mode: str = "train", test_clips: int = 10,
                 static: bool = False, seed: int = 0):
        if mode not in ("train", "test") or clip_len < 1 or stride < 1 or test_clips < 1:
            raise ValueError(f"need mode 'train' or 'test', clip_len, stride, test_clips >= 1; "
                             f"got {mode!r}, {clip_len}, {stride}, {test_clips}")
        if shift is not None and (mode == "test" or not 0 <= shift[0] <= shift[1]):
            raise ValueError(f"shift must be (alpha1, alpha2) with 0 <= alpha1 <= alpha2, train only; got {shift}")
        self.source, self.clip_len, self.stride, self.transform, self.epoch = source, clip_len, stride, transform, 0
        self.shift, self.mode, self.test_clips, self.static, self.seed = shift, mode, test_clips, static, seed

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        for skipped in range(len(self.source)):
            j = (i + skipped) % len(self.source)
            try:
                views = self._views(j, rng)
            except BadVideo as error:
                reason = error
                if self.source.name(j) not in _warned:
                    _warned.add(self.source.name(j))
                    warnings.warn(f"skipping bad video {error}", BadVideoWarning, stacklevel=2)
                continue
            scene = self.source.scene(j) if hasattr(self.source, "scene") else -1  # -1: not known
            return {"views": views, "label": self.source.label(j), "scene": scene, "index": j, "skipped": skipped}
        raise RuntimeError(f"{len(self.source)} bad videos in a row from index {i}, all there are; the last: {reason}")

    def _views(self, j: int, rng: np.random.Generator):
        """Video j's views from one decode of all the frames they need: a and n, or every test clip."""
        T = self.clip_len
        if self.mode == "train":
            frames = self.source.read(j, lambda n: train_indices(n, T, self.stride, self.shift, rng, self.static))
            if self.transform is None:
                return torch.from_numpy(frames if self.shift is None else frames.reshape(2, T, *frames.shape[1:]))
            return self.transform(frames[:T], None if self.shift is None else frames[T:], rng)

        def choose(num_frames: int) -> list[int]:
            starts = test_starts(num_frames, T, self.stride, self.test_clips)
            clips = [temporal_indices(num_frames, start, T, self.stride) for start in starts]
            return [k for clip in clips for k in ([clip[T // 2]] * T if self.static else clip)]

        frames = self.source.read(j, choose)
        clips = frames.reshape(self.test_clips, T, *frames.shape[1:])  # (test_clips, T, H, W, 3)
        if self.transform is None:
            return torch.from_numpy(clips)
        return torch.stack([self.transform(clip, None, rng) for clip in clips])


VIDEO_EXTENSIONS = (".avi", ".mp4", ".mkv", ".webm", ".mov", ".mpg", ".mpeg", ".m4v")
# Names never change, so split files still apply. Containers that cannot carry H.264 with exact time stamps hold MP4
# (FFmpeg's AVI demuxer dates H.264 frames one late, WebM takes only VP8/VP9/AV1, MPEG-PS loses the time stamps).
PREPARE_CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}  # others: mp4
PREPARE_REPORT = "prepare_report.json"
# CRF 18 is close to transparent; at short side 256 veryfast costs less than decoding a 720p source.
X264_OPTIONS = {"preset": "veryfast", "crf": "18"}


def prepared_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) at short side short_side, aspect kept, both even (yuv420p); never upscaled: no detail to gain."""
    short, long = min(width, height), max(width, height)
    if short <= short_side:
        return width - width % 2, height - height % 2
    long = 2 * round(long * short_side / short / 2)
    return (long, short_side) if width >= height else (short_side, long)


def _encode_frames(frames, out: av.container.OutputContainer, rate: Fraction, short_side: int,
                   keyframe_every: int, threads: int) -> int:
    """Encode `frames` into `out`, renumbered 0, 1, ... at `rate` (closing gaps), sized by the first frame; how many."""
    stream, count = None, 0
    for count, frame in enumerate(frames, 1):
        if stream is None:  # scenecut=0: no keyframes at cuts beyond the fixed ones
            stream = out.add_stream("libx264", rate=rate, options={**X264_OPTIONS, "threads": str(threads),
                                    "x264-params": f"keyint={keyframe_every}:min-keyint={keyframe_every}:scenecut=0"})
            stream.width, stream.height = prepared_size(frame.width, frame.height, short_side)
            stream.pix_fmt, stream.codec_context.gop_size = "yuv420p", keyframe_every
        image = frame.reformat(stream.width, stream.height, "yuv420p", interpolation="AREA")
        image.pts, image.time_base = count - 1, 1 / rate
        image.pict_type = av.video.frame.PictureType.NONE  # else x264 makes the source's I-frames keyframes
        out.mux(stream.encode(image))
    if stream is not None:
        out.mux(stream.encode())
    return count


def prepare_video(src: str, dst: str, short_side: int, keyframe_every: int = 16, threads: int = 1) -> int:
    """Re-encode src's first video stream to dst (see `prepare`): its frame count; BadVideo names what src lacks."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    part = dst + PART_SUFFIX
    try:
        with _open_video(src, threads) as (source, stream, expected):
            rate = _frame_rate(stream)
            if not rate:
                raise BadVideo(f"{src}: no frame rate in its header")
            with av.open(part, "w", format=PREPARE_CONTAINERS.get(os.path.splitext(dst)[1].lower(), "mp4")) as out:
                count = _encode_frames(source.decode(stream), out, rate, short_side, keyframe_every, threads)
                if count == 0 or count < expected - END_SLACK:
                    raise BadVideo(f"{src}: truncated, {count} of the {expected} frames in its header decode")
        os.replace(part, dst)
        return count
    finally:
        if os.path.exists(part):
            os.remove(part)


def _prepare_job(job: tuple[str, str, str, int, int, int]) -> tuple[str, str | None]:
    """(rel, None) when the video is done, (rel, reason) when it is bad; runs in a worker process."""
    rel, src, dst, short_side, keyframe_every, threads = job
    try:
        prepare_video(src, dst, short_side, keyframe_every, threads)
        return rel, None
    except BadVideo as error:
        return rel, str(error).removeprefix(f"{src}: ")


def _check_prepare(src: str, dst: str, settings: dict) -> list[str]:
    """The videos under SRC; exits unless SRC is a folder apart from DST and DST holds none with other settings."""
    if not os.path.isdir(src):
        raise SystemExit(f"prepare: SRC {src} is not a folder")
    if os.path.commonpath([src, dst]) in (src, dst):
        raise SystemExit(f"prepare: DST {dst} and SRC {src} must not be or hold one another: choose a DST outside SRC")
    videos = []
    for folder, dirs, files in os.walk(src):  # sorted, video extensions in any case
        dirs.sort()
        videos += [os.path.relpath(os.path.join(folder, name), src) for name in sorted(files)
                   if os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS]
    if not videos:
        raise SystemExit(f"prepare: no videos ({' '.join(VIDEO_EXTENSIONS)}) under {src}")
    if "libx264" not in av.codecs_available:  # PyAV's wheels bundle it; a build on a system FFmpeg may not
        raise SystemExit("prepare: this PyAV's FFmpeg has no libx264 encoder: install PyAV's wheel (pip install av)")
    if os.path.exists(os.path.join(dst, PREPARE_REPORT)):
        with open(os.path.join(dst, PREPARE_REPORT), encoding="utf-8") as f:
            report = json.load(f)
        before = {key: report.get(key) for key in settings}
        if before != settings:
            raise SystemExit(f"prepare: {dst} was prepared with {before}, not {settings}: use another DST")
    return videos


def prepare(src: str, dst: str, short_side: int, keyframe_every: int = 16, workers: int | None = None) -> dict:
    """Re-encode every video under src into dst, same relative paths: H.264 at short side `short_side` (never
    upscaled), a keyframe every `keyframe_every` frames, same frames and rate, no audio (PREPARE_CONTAINERS). A rerun
    skips existing outputs; bad videos are named on the console and in DST/prepare_report.json, which this returns."""
    src, dst = os.path.realpath(src), os.path.realpath(dst)
    settings = {"short_side": short_side, "keyframe_every": keyframe_every, "encoder": "libx264"}
    videos, report_path = _check_prepare(src, dst, settings), os.path.join(dst, PREPARE_REPORT)
    os.makedirs(dst, exist_ok=True)
    # The settings go first, so that a rerun after a kill still refuses other settings.
    _write_text(report_path, json.dumps({"source": src, **settings, "finished": False}, indent=1).splitlines())
    todo = [rel for rel in videos if not os.path.exists(os.path.join(dst, rel))]
    stale = [path for path in (os.path.join(dst, rel) + PART_SUFFIX for rel in todo) if os.path.exists(path)]
    for path in stale:  # left by a killed run
        os.remove(path)
    workers = workers or len(os.sched_getaffinity(0))
    print(f"prepare: {len(videos)} videos under {src}; {len(videos) - len(todo)} already in {dst}, skipped; "
          f"{len(todo)} to encode with libx264 on {workers} workers"
          + (f"; removed {len(stale)} partial files of a killed run" if stale else ""))
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    jobs = [(rel, os.path.join(src, rel), os.path.join(dst, rel), short_side, keyframe_every, threads) for rel in todo]
    failed, pool = [], ProcessPoolExecutor(workers) if workers > 1 and len(jobs) > 1 else None  # 1: in this process
    try:
        results = map(_prepare_job, jobs) if pool is None else \
            (future.result() for future in as_completed([pool.submit(_prepare_job, job) for job in jobs]))
        for rel, reason in tqdm(results, total=len(jobs), desc="prepare", unit="video", smoothing=0.05):
            if reason is not None:
                failed.append({"path": rel, "reason": reason})
                tqdm.write(f"skipping bad video {rel}: {reason}")
    finally:
        if pool is not None:  # Ctrl-C: stop at once, not after every queued video
            pool.shutdown(wait=False, cancel_futures=True)
    failed.sort(key=lambda entry: entry["path"])
    report = {"source": src, **settings, "finished": True, "done": len(todo) - len(failed),
              "skipped_existing": len(videos) - len(todo), "failed": failed}
    _write_text(report_path, json.dumps(report, indent=1).splitlines())
    print(f"prepare: {report['done']} done, {report['skipped_existing']} skipped (already there), "
          f"{len(failed)} failed" + (f" (listed in {report_path})" if failed else ""))
    return report


# Defaults of --size/--clip-len/--stride/--crop-scale: the paper's 16 x 4 frames at 224 (C3D: --size 112), and a CPU
# clip for the synthetic 64-pixel frames, whose 16-pixel object crops below 0.6 of the area lose (docs/RESULTS.md).
CLIP_DEFAULTS = {"synthetic": dict(size=64, clip_len=8, stride=2, crop_scale=[0.6, 1.0]),
                 "paper": dict(size=224, clip_len=16, stride=4, crop_scale=[0.3, 1.0])}


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """The data flags every stage script shares."""
    add = parser.add_argument_group("data (paper: Datasets, Default Settings, Temporal Shift)").add_argument
    add("--dataset", choices=list(SHIFT_DEFAULTS), default="synthetic", help="default: synthetic")
    add("--root", default=None, help="video folder (needed unless synthetic)")
    add("--split-dir", default=None, help="annotation folder: UCF101 classInd/trainlist0S/testlist0S, "
        "HMDB51 *_test_splitS, Kinetics train.csv + validate.csv, list trainlist.txt + testlist.txt")
    add("--split", type=int, choices=(1, 2, 3), default=1, help="UCF101/HMDB51 split (default: 1)")
    add("--size", type=int, default=None,
        help="crop size; frames are decoded at short side 8/7 of it (default: 64 on synthetic, else 224)")
    add("--clip-len", type=int, default=None, help="frames T per clip (default: 8 on synthetic, else 16)")
    add("--stride", type=int, default=None, help="temporal stride (default: 2 on synthetic, else 4)")
    add("--crop-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
        help="area fraction of the random resized crop (default: 0.6 1 on synthetic, else 0.3 1)")
    add("--shift", type=int, nargs=2, default=None, metavar=("ALPHA1", "ALPHA2"),
        help="bounds of the temporal shift tau, frames (Eq. 4; default: 4 30 on kinetics, else 2 20)")
    add("--flip", choices=("on", "off"), default=None, help="random horizontal flip, one coin per sample (default: off "
        "on synthetic, whose classes are mirror pairs, else on; off for make-synthetic's files too)")
    add("--workers", type=int, default=2, help="DataLoader worker processes per rank (default: 2)")
    add("--num-train", type=int, default=800, help="synthetic training videos (default: 800)")
    add("--num-test", type=int, default=400, help="synthetic test videos (default: 400)")
    add("--scene-bias", type=float, default=0.8,
        help="synthetic training videos whose scene is their class's own (default: 0.8)")
    add("--data-seed", type=int, default=0, help="seed of the synthetic videos themselves (default: 0)")


def resolve_data_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the data flags left at None and check the ones that need a folder."""
    defaults = CLIP_DEFAULTS["synthetic" if args.dataset == "synthetic" else "paper"]
    vars(args).update({k: v for k, v in defaults.items() if getattr(args, k) is None})
    args.flip = (args.dataset != "synthetic") if args.flip is None else args.flip == "on"
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        raise SystemExit(f"need 0 < LO <= HI <= 1 for --crop-scale, got {args.crop_scale}")
    args.shift = tuple(args.shift or SHIFT_DEFAULTS[args.dataset])
    if not 0 <= args.shift[0] <= args.shift[1]:
        raise SystemExit(f"need 0 <= ALPHA1 <= ALPHA2 for --shift, got {args.shift}")
    if args.dataset != "synthetic" and not (args.root and args.split_dir):
        raise SystemExit(f"--dataset {args.dataset} needs --root (videos) and --split-dir (annotations)")
    return args


def build_source(args: argparse.Namespace, train: bool) -> VideoFiles | SyntheticVideos:
    """The training or test split the data flags name; videos missing on disk stop here, before training."""
    if args.dataset == "synthetic":
        return SyntheticVideos("train" if train else "test", args.num_train if train else args.num_test,
                               args.data_seed, args.scene_bias, short_side_for(args.size))
    records, _ = build_records(args.dataset, args.root, args.split_dir, args.split, train)
    return VideoFiles(records, short_side_for(args.size), min_frames=args.clip_len)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("make-synthetic", help="write the synthetic dataset as UCF101-style files")
    make.add_argument("out", help="output folder: OUT/videos and OUT/splits")
    make.add_argument("--num-train", type=int, default=800, help="training videos, over the 8 classes (default: 800)")
    make.add_argument("--num-test", type=int, default=400, help="test videos, over the 8 classes (default: 400)")
    make.add_argument("--seed", type=int, default=0, help="random seed of the videos (default: 0)")
    make.add_argument("--scene-bias", type=float, default=0.8,
                      help="training videos whose scene is their class's own (default: 0.8)")
    make.add_argument("--short-side", type=int, default=128, help="frame side in pixels (default: 128)")
    prep = commands.add_parser("prepare", help="re-encode a dataset once at training size, keyframes every K frames",
                               description=prepare.__doc__)
    prep.add_argument("src", help="folder of the original videos (never written)")
    prep.add_argument("dst", help="output folder, outside SRC: the same relative paths and file names")
    prep.add_argument("--short-side", type=int, required=True, help="short side of the output in pixels, even "
                      "(256 for crops of 224, 128 for 112); videos already at or below it keep their size")
    prep.add_argument("--keyframe-every", type=int, default=16, help="frames between keyframes (default: 16)")
    prep.add_argument("--workers", type=int, default=None, help="worker processes (default: every core allowed)")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        if args.short_side < 2 or args.short_side % 2 or args.keyframe_every < 1 or (args.workers or 1) < 1:
            parser.error("need an even --short-side >= 2, --keyframe-every >= 1, --workers >= 1")
        prepare(args.src, args.dst, args.short_side, args.keyframe_every, args.workers)
    else:
        if args.num_train < 1 or args.num_test < 1 or not 0 <= args.scene_bias <= 1 or args.short_side < 8:
            parser.error("need --num-train, --num-test >= 1, 0 <= --scene-bias <= 1, --short-side >= 8")
        make_synthetic(args.out, args.num_train, args.num_test, args.seed, args.scene_bias, args.short_side)


if __name__ == "__main__":
    main()
