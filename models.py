"""The networks of DSM (paper: "Networks"; retrieval features: "Video Retrieval") and checkpoint I/O.

build_backbone(arch) is f: (B, 3, T, H, W) -> last feature map for the paper's C3D, I3D, R3D-34, plus R3D-18 and `mini`
(a CPU-sized R3D), layers named as in each net's public code. Check: `pytest test_dsm.py -k models`, `bench.py train`.
"""
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


class C3D(nn.Sequential):
    """C3D with BatchNorm as in VCP / PRP / Clip Order, no pool5/fc6/fc7 (any input size): 16x112x112 -> 512x2x7x7."""

    def __init__(self):
        layers, c_in = [], 3
        # (layer, channels, max-pool after it); pool1 keeps time so early layers see motion at full frame rate
        for name, c_out, pool in [("1", 64, (1, 2, 2)), ("2", 128, 2), ("3a", 256, None), ("3b", 256, 2),
                                  ("4a", 512, None), ("4b", 512, 2), ("5a", 512, None), ("5b", 512, None)]:
            layers += [(f"conv{name}", nn.Conv3d(c_in, c_out, 3, padding=1)), (f"bn{name}", nn.BatchNorm3d(c_out)),
                       (f"relu{name}", nn.ReLU(inplace=True))]
            if pool is not None:
                layers.append((f"pool{name[0]}", nn.MaxPool3d(pool, stride=pool)))
            c_in = c_out
        super().__init__(OrderedDict(layers))
        self.out_channels = 512


def tf_same_pad(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad (B, C, T, H, W) as TF's "SAME" (size ceil(size / stride)), extra pixel last: ported weights match."""
    pad = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride))):
        total = max(k - (s if size % s == 0 else size % s), 0)
        pad += [total // 2, total - total // 2]
    return F.pad(x, pad) if any(pad) else x


class Unit3D(nn.Module):
    """Conv3d (no bias) + BN(eps=1e-3, momentum=0.01) + ReLU with TF "same" padding."""

    def __init__(self, c_in: int, c_out: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)
        # Stride 1 (every kernel here is odd): "same" padding is symmetric, so the conv does it without a copy.
        padding = tuple(k // 2 for k in self.kernel) if self.stride == (1, 1, 1) else 0
        self.conv3d = nn.Conv3d(c_in, c_out, self.kernel, self.stride, padding, bias=False)
        self.bn = nn.BatchNorm3d(c_out, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1, 1):
            x = tf_same_pad(x, self.kernel, self.stride)
        return F.relu(self.bn(self.conv3d(x)), inplace=True)


class MaxPool3dSame(nn.MaxPool3d):
    """Strided max-pool with TF "same" padding; zeros equal -inf here, as every pooled map follows a ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(tf_same_pad(x, self.kernel_size, self.stride))


class InceptionModule(nn.Module):
    """Four branches concatenated on channels: 1x1 | 1x1-3x3 | 1x1-3x3 | pool-1x1."""

    def __init__(self, c_in: int, c: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(c_in, c[0])
        self.b1a, self.b1b = Unit3D(c_in, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(c_in, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = nn.MaxPool3d(3, stride=1, padding=1), Unit3D(c_in, c[5])  # stride 1: "same" is symmetric
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


class I3D(nn.Sequential):
    """Inception-v1 inflated to 3D, stem to Mixed_5c (no logits): 1024 x 2 x 7 x 7 at 16x224."""

    def __init__(self):
        mixed = {"Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
                 "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
                 "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
                 "Mixed_4f": (256, 160, 320, 32, 128, 128), "Mixed_5b": (256, 160, 320, 32, 128, 128),
                 "Mixed_5c": (384, 192, 384, 48, 128, 128)}
        layers = OrderedDict(Conv3d_1a_7x7=Unit3D(3, 64, (7, 7, 7), (2, 2, 2)),
                             MaxPool3d_2a_3x3=MaxPool3dSame((1, 3, 3), (1, 2, 2)),
                             Conv3d_2b_1x1=Unit3D(64, 64), Conv3d_2c_3x3=Unit3D(64, 192, (3, 3, 3)),
                             MaxPool3d_3a_3x3=MaxPool3dSame((1, 3, 3), (1, 2, 2)))
        c_in, pools = 192, {"Mixed_4b": ("MaxPool3d_4a_3x3", (3, 3, 3)), "Mixed_5b": ("MaxPool3d_5a_2x2", (2, 2, 2))}
        for name, channels in mixed.items():
            if name in pools:  # before the 4th and the 5th stage
                layers[pools[name][0]] = MaxPool3dSame(pools[name][1], (2, 2, 2))
            layers[name] = InceptionModule(c_in, channels)
            c_in = layers[name].out_channels
        super().__init__(layers)
        self.out_channels = c_in


class BasicBlock(nn.Module):
    """Two 3x3x3 convs plus identity; a 1x1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(c_in, c_out, 3, stride, padding=1, bias=False), nn.BatchNorm3d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv3d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out)
        self.downsample = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv3d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm3d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet3d(nn.Sequential):
    """3D ResNet (Hara et al. 2018) without avgpool/fc; shortcut B (1x1x1 conv + BN): R3D-34 63.5 M params, not 63.3."""

    def __init__(self, blocks: tuple[int, ...], widths: tuple[int, ...] = (64, 128, 256, 512),
                 stem_kernel: tuple[int, int, int] = (7, 7, 7)):
        pad = tuple(k // 2 for k in stem_kernel)
        layers = OrderedDict(conv1=nn.Conv3d(3, widths[0], stem_kernel, (1, 2, 2), pad, bias=False),
                             bn1=nn.BatchNorm3d(widths[0]), relu=nn.ReLU(inplace=True),
                             maxpool=nn.MaxPool3d(3, stride=2, padding=1))
        c_in = widths[0]
        for i, (n, c_out) in enumerate(zip(blocks, widths)):  # stride 2 from the second stage on
            stage = [BasicBlock(c_in, c_out, 1 if i == 0 else 2)] + [BasicBlock(c_out, c_out) for _ in range(n - 1)]
            layers[f"layer{i + 1}"] = nn.Sequential(*stage)
            c_in = c_out
        super().__init__(layers)
        self.out_channels = c_in


# mini: R3D-10 at a quarter of the width, 3x3x3 stem: < 0.5 GFLOPs per 16x112x112 clip, minutes to pretrain on a CPU
BUILDERS = {"c3d": C3D, "i3d": I3D, "r3d18": lambda: ResNet3d((2, 2, 2, 2)), "r3d34": lambda: ResNet3d((3, 4, 6, 3)),
            "mini": lambda: ResNet3d((1, 1, 1, 1), widths=(16, 32, 64, 128), stem_kernel=(3, 3, 3))}
ARCHS = tuple(BUILDERS)


def build_backbone(arch: str) -> nn.Module:
    """f for `arch` in ARCHS: (B, 3, T, H, W) -> (B, out_channels, T', H', W'); He convs, BN at its default 1."""
    if arch not in BUILDERS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    model = BUILDERS[arch]()
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


class Encoder(nn.Module):
    """f, global average pool, fc to D = 128, L2 normalisation: the z of Eq. 5 and Eq. 7."""

    def __init__(self, arch: str | nn.Module, dim: int = 128):
        super().__init__()
        self.backbone = build_backbone(arch) if isinstance(arch, str) else arch
        self.fc = nn.Linear(self.backbone.out_channels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.fc(self.backbone(x).mean(dim=(2, 3, 4))), dim=1)  # (B, D) on the unit sphere


class Classifier(nn.Module):
    """f, global average pool, dropout, fc to the classes (fine-tuning, linear probe)."""

    def __init__(self, backbone_or_arch: str | nn.Module, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.backbone = build_backbone(backbone_or_arch) if isinstance(backbone_or_arch, str) else backbone_or_arch
        self.dropout, self.fc = nn.Dropout(dropout), nn.Linear(self.backbone.out_channels, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)  # as MoCo's linear classifier
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.backbone(x).mean(dim=(2, 3, 4))))  # (B, num_classes) logits


def retrieval_features(feature_map: torch.Tensor, size: tuple[int, int, int] = (2, 7, 7),
                       pool: str = "max") -> torch.Tensor:
    """(B, C, T', H', W') -> (B, C * 2 * 7 * 7), unnormalised: the paper's adaptive max pool gives nets one scale."""
    if feature_map.dim() != 5:
        raise ValueError(f"expected a (B, C, T, H, W) feature map, got shape {tuple(feature_map.shape)}")
    if pool not in ("max", "avg"):
        raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
    return (F.adaptive_max_pool3d if pool == "max" else F.adaptive_avg_pool3d)(feature_map, size).flatten(1)


PLAIN_TYPES = (str, int, float, bool, type(None))  # with tensors and the containers below: what weights_only loads
MAPPING_TYPES = (dict, OrderedDict)  # exact types, as torch.load rebuilds them; state_dict() is an OrderedDict


def check_plain(value: object, key: str) -> None:
    """Raise TypeError naming `key` unless `value` is tensors and plain Python values only."""
    if type(value) in MAPPING_TYPES:
        for k, v in value.items():
            if type(k) not in PLAIN_TYPES:
                raise TypeError(f"checkpoint key {key}: dict key {k!r} is a {type(k).__name__}")
            check_plain(v, f"{key}.{k}")
    elif type(value) in (list, tuple, torch.Size):
        for i, v in enumerate(value):
            check_plain(v, f"{key}[{i}]")
    elif not (isinstance(value, torch.Tensor) or type(value) in PLAIN_TYPES):
        raise TypeError(f"checkpoint key {key} holds a {type(value).__module__}.{type(value).__qualname__}; only "
                        "tensors, dict, list, tuple, str, int, float, bool and None load with weights_only=True")


def save_checkpoint(state: dict, path: str) -> None:
    """Write `state` atomically: a crash leaves either the old file or the new one, whole."""
    if type(state) not in MAPPING_TYPES:
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    for k, v in state.items():
        check_plain(v, str(k))
    tmp = f"{path}.{os.getpid()}.tmp"  # same directory, so os.replace is an atomic rename
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)  # persist the rename itself
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint on the CPU; only tensors and plain values are unpickled."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_backbone(path: str, arch: str) -> nn.Module:
    """build_backbone(arch) with the (query) backbone weights of a pretraining, Encoder, Classifier or f checkpoint."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: expected a dict with 'arch' and 'state_dict'")
    if ckpt["arch"] != arch:
        raise ValueError(f"{path} holds a {ckpt['arch']!r} network, but arch {arch!r} was asked for")
    model, state = build_backbone(arch), {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    prefix = next((p for p in ("encoder_q.backbone.", "backbone.") if any(k.startswith(p) for k in state)), "")
    state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not set(state) & set(model.state_dict()):
        raise ValueError(f"{path} (arch {ckpt['arch']!r}) has no weights that fit a {arch!r} "
                         f"backbone; its keys start with {sorted(ckpt['state_dict'])[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    print(f"load_backbone: {len(state) - len(unexpected)} tensors from {path}"
          + (f"; missing (left at init): {missing}" if missing else "")
          + (f"; unexpected (ignored): {unexpected}" if unexpected else ""))
    return model
