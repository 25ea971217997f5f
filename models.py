"""The networks of DSM (paper, "Networks" and the retrieval paragraph) and checkpoint I/O.

The paper uses three 3D backbones f -- C3D (Tran et al. 2015), I3D (Carreira and Zisserman
2017) and 3D ResNet-34 (Hara et al. 2018) -- "followed by a global average pooling layer and
a fully connected layer to project the representations into a 128-dimensional latent space",
L2-normalised. This file holds:

    build_backbone(arch)      f: (B, 3, T, H, W) -> last feature map (B, C, T', H', W')
    Encoder(arch, dim=128)    z = normalise(fc(GAP(f(x))))  -- z_a, z_p, z_n of the triplet
    Classifier(arch, num_classes)   fine-tuning / linear-probe head: GAP -> dropout -> fc
    retrieval_features(map)   adaptive max-pool to C x 2 x 7 x 7, flattened (Tables 2-3)
    save_checkpoint / load_checkpoint / load_backbone   what every stage writes and reads

`arch` is one of ARCHS: c3d, i3d, r3d18, r3d34 (the paper's nets plus R3D-18) and `mini`,
a small R3D that pretrains on a CPU in minutes (the scripts' default). No layer has a
fixed input size, so every net runs at 112 and at 224. Layer names follow the public code
each net comes from (VCP's C3D, piergiaj/pytorch-i3d, kenshohara/3D-ResNets-PyTorch).

Nothing to run here; it is imported by the stage scripts. Its checks and numbers:
    pytest test_dsm.py -k models
    python bench.py model          # speed per clip and GFLOP/s, against torchvision's r3d_18
    python bench.py model-table    # params, GFLOPs, feature-map shapes (README table)
"""
import os
from collections import Counter, OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = ("c3d", "i3d", "r3d18", "r3d34", "mini")


# ---- C3D -------------------------------------------------------------------

def conv_bn_relu(c_in: int, c_out: int) -> list[tuple[str, nn.Module]]:
    return [("conv", nn.Conv3d(c_in, c_out, 3, padding=1)), ("bn", nn.BatchNorm3d(c_out)),
            ("relu", nn.ReLU(inplace=True))]


class C3D(nn.Sequential):
    """C3D with BatchNorm as in VCP / PRP / Clip Order: 8 convs 3x3x3, 4 max-pools, no fc6/fc7.

    Those works replace pool5 + fc6/fc7 by a global average pool, so the map ends at
    relu5b: 512 x 2 x 7 x 7 for a 16x112x112 clip, exactly the paper's retrieval grid. (The
    original pool5's (0, 1, 1) padding only served fc6's fixed 8192 inputs; with no pool5
    and no fc, any size works: pool4 takes 4 x 14 x 14 to 2 x 7 x 7 at 112.)
    pool1 keeps time (1x2x2) so early layers see motion at full frame rate.
    """

    def __init__(self):
        layers, c_in = [], 3
        # (layer, channels, max-pool after it)
        plan = [("1", 64, (1, 2, 2)), ("2", 128, 2), ("3a", 256, None), ("3b", 256, 2),
                ("4a", 512, None), ("4b", 512, 2), ("5a", 512, None), ("5b", 512, None)]
        for name, c_out, pool in plan:
            layers += [(f"{kind}{name}", m) for kind, m in conv_bn_relu(c_in, c_out)]
            if pool is not None:
                layers.append((f"pool{name[0]}", nn.MaxPool3d(pool, stride=pool)))
            c_in = c_out
        super().__init__(OrderedDict(layers))
        self.out_channels = 512


# ---- I3D -------------------------------------------------------------------

def tf_same_pad(x: torch.Tensor, kernel: tuple[int, ...], stride: tuple[int, ...]) -> torch.Tensor:
    """Zero-pad (B, C, T, H, W) like TensorFlow's "SAME": output size ceil(size / stride).

    The extra pixel goes at the end, as in the TF original, so weights ported from it give
    the same maps.
    """
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
        # A stride-1 odd kernel's "same" padding is symmetric: let the conv do it, no copy.
        static = (self.stride == (1, 1, 1))
        assert not static or all(k % 2 == 1 for k in self.kernel), "same padding needs odd k"
        padding = tuple(k // 2 for k in self.kernel) if static else 0
        self.conv3d = nn.Conv3d(c_in, c_out, self.kernel, self.stride, padding, bias=False)
        self.bn = nn.BatchNorm3d(c_out, eps=1e-3, momentum=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != (1, 1, 1):
            x = tf_same_pad(x, self.kernel, self.stride)
        return F.relu(self.bn(self.conv3d(x)), inplace=True)


class MaxPool3dSame(nn.MaxPool3d):
    """Strided max-pool with TF "same" padding. Zero padding equals -inf padding here
    because every pooled map follows a ReLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(tf_same_pad(x, self.kernel_size, self.stride))


class InceptionModule(nn.Module):
    """Four branches concatenated on channels: 1x1 | 1x1-3x3 | 1x1-3x3 | pool-1x1."""

    def __init__(self, c_in: int, c: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(c_in, c[0])
        self.b1a, self.b1b = Unit3D(c_in, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(c_in, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a = nn.MaxPool3d(3, stride=1, padding=1)  # "same" for stride 1 is symmetric
        self.b3b = Unit3D(c_in, c[5])
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)),
                          self.b3b(self.b3a(x))], dim=1)


class I3D(nn.Sequential):
    """Inception-v1 inflated to 3D, stem to Mixed_5c (no logits): 1024 x 2 x 7 x 7 at 16x224."""

    def __init__(self):
        mixed = {"Mixed_3b": (64, 96, 128, 16, 32, 32), "Mixed_3c": (128, 128, 192, 32, 96, 64),
                 "Mixed_4b": (192, 96, 208, 16, 48, 64), "Mixed_4c": (160, 112, 224, 24, 64, 64),
                 "Mixed_4d": (128, 128, 256, 24, 64, 64), "Mixed_4e": (112, 144, 288, 32, 64, 64),
                 "Mixed_4f": (256, 160, 320, 32, 128, 128),
                 "Mixed_5b": (256, 160, 320, 32, 128, 128), "Mixed_5c": (384, 192, 384, 48, 128, 128)}
        layers = OrderedDict([
            ("Conv3d_1a_7x7", Unit3D(3, 64, (7, 7, 7), (2, 2, 2))),
            ("MaxPool3d_2a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2))),
            ("Conv3d_2b_1x1", Unit3D(64, 64)),
            ("Conv3d_2c_3x3", Unit3D(64, 192, (3, 3, 3))),
            ("MaxPool3d_3a_3x3", MaxPool3dSame((1, 3, 3), (1, 2, 2)))])
        c_in = 192
        for name, channels in mixed.items():
            if name == "Mixed_4b":
                layers["MaxPool3d_4a_3x3"] = MaxPool3dSame((3, 3, 3), (2, 2, 2))
            if name == "Mixed_5b":
                layers["MaxPool3d_5a_2x2"] = MaxPool3dSame((2, 2, 2), (2, 2, 2))
            layers[name] = InceptionModule(c_in, channels)
            c_in = layers[name].out_channels
        super().__init__(layers)
        self.out_channels = c_in
        assert self.out_channels == 1024


# ---- 3D ResNets ------------------------------------------------------------

class BasicBlock(nn.Module):
    """Two 3x3x3 convs plus identity; a 1x1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv3d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm3d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet3d(nn.Sequential):
    """3D ResNet of Hara et al. 2018 (kenshohara/3D-ResNets-PyTorch) without avgpool/fc.

    conv1 7x7x7 stride (1, 2, 2), BN, ReLU, max-pool 3x3x3 stride 2, four stages of
    BasicBlocks (stride 2 from the second on): 512 x 1 x 4 x 4 at 16x112, 1 x 7 x 7 at 224.

    Shortcut type B (1x1x1 conv + BN when the shape changes) rather than Hara's original
    type A (zero-padded identity): B is the default of the current 3D-ResNets-PyTorch code
    and of torchvision's video ResNets, the common choice in later self-supervised work,
    and costs < 1% more parameters (R3D-34: 63.5 M vs 63.3 M).
    """

    def __init__(self, blocks: tuple[int, ...], widths: tuple[int, ...] = (64, 128, 256, 512),
                 stem_kernel: tuple[int, int, int] = (7, 7, 7)):
        layers = OrderedDict([
            ("conv1", nn.Conv3d(3, widths[0], stem_kernel, stride=(1, 2, 2),
                                padding=tuple(k // 2 for k in stem_kernel), bias=False)),
            ("bn1", nn.BatchNorm3d(widths[0])),
            ("relu", nn.ReLU(inplace=True)),
            ("maxpool", nn.MaxPool3d(3, stride=2, padding=1))])
        c_in = widths[0]
        for i, (n, c_out) in enumerate(zip(blocks, widths)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1)
                     for j in range(n)]
            layers[f"layer{i + 1}"] = nn.Sequential(*stage)
            c_in = c_out
        super().__init__(layers)
        self.out_channels = c_in


def mini() -> ResNet3d:
    """R3D-10 at a quarter of the width (16-32-64-128), one BasicBlock per stage.

    The 3x3x3 stem costs 1/16 of a 7x7x7 one on 16 channels, which keeps a 16x112x112 clip
    under 0.5 GFLOPs and a 16x64x64 clip near 0.15, so a CPU pretraining run takes minutes.
    """
    return ResNet3d((1, 1, 1, 1), widths=(16, 32, 64, 128), stem_kernel=(3, 3, 3))


# ---- building and heads ----------------------------------------------------

def init_weights(model: nn.Module) -> None:
    """The reference implementations' init: He (fan_out) convs, BN as identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm3d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_backbone(arch: str) -> nn.Module:
    """f for `arch` in ARCHS: (B, 3, T, H, W) -> (B, out_channels, T', H', W')."""
    builders = {"c3d": C3D, "i3d": I3D, "r3d18": lambda: ResNet3d((2, 2, 2, 2)),
                "r3d34": lambda: ResNet3d((3, 4, 6, 3)), "mini": mini}
    assert tuple(builders) == ARCHS
    if arch not in builders:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    model = builders[arch]()
    init_weights(model)
    return model


def as_backbone(backbone_or_arch: str | nn.Module) -> nn.Module:
    if isinstance(backbone_or_arch, str):
        return build_backbone(backbone_or_arch)
    assert hasattr(backbone_or_arch, "out_channels"), "a backbone needs .out_channels"
    return backbone_or_arch


class Encoder(nn.Module):
    """f, global average pool, fc to D = 128, L2 normalisation: the z of Eq. 5 and Eq. 7."""

    def __init__(self, arch: str | nn.Module, dim: int = 128):
        super().__init__()
        self.backbone = as_backbone(arch)
        self.fc = nn.Linear(self.backbone.out_channels, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x).mean(dim=(2, 3, 4))  # (B, C): global average pool
        return F.normalize(self.fc(h), dim=1)  # (B, D) on the unit sphere


class Classifier(nn.Module):
    """f, global average pool, dropout, fc to the classes (fine-tuning, linear probe)."""

    def __init__(self, backbone_or_arch: str | nn.Module, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.backbone = as_backbone(backbone_or_arch)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.backbone.out_channels, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.01)  # as MoCo's linear classifier
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.backbone(x).mean(dim=(2, 3, 4))  # (B, C)
        return self.fc(self.dropout(h))  # (B, num_classes) logits


def retrieval_features(feature_map: torch.Tensor, size: tuple[int, int, int] = (2, 7, 7),
                       pool: str = "max") -> torch.Tensor:
    """(B, C, T', H', W') -> (B, C * 2 * 7 * 7): the paper's adaptive max pool (retrieval
    paragraph), so every backbone gives a representation of the same scale. Not normalised."""
    if feature_map.dim() != 5:
        raise ValueError(f"expected a (B, C, T, H, W) feature map, got shape {tuple(feature_map.shape)}")
    if pool == "max":
        pooled = F.adaptive_max_pool3d(feature_map, size)
    elif pool == "avg":
        pooled = F.adaptive_avg_pool3d(feature_map, size)
    else:
        raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
    return pooled.flatten(1)  # (B, C * 2 * 7 * 7)


# ---- checkpoints -----------------------------------------------------------

PLAIN_TYPES = (str, int, float, bool, type(None))
# Exact types torch.load(weights_only=True) rebuilds (Counter: the LR schedulers' milestones).
MAPPING_TYPES = (dict, OrderedDict, Counter)
SEQUENCE_TYPES = (list, tuple, torch.Size)


def check_plain(value: object, key: str) -> None:
    """Raise TypeError naming `key` unless `value` is tensors and plain Python values only."""
    if isinstance(value, torch.Tensor) or type(value) in PLAIN_TYPES:
        return
    if type(value) in MAPPING_TYPES:
        for k, v in value.items():
            if type(k) not in PLAIN_TYPES:
                raise TypeError(f"checkpoint key {key}: dict key {k!r} is a {type(k).__name__}")
            check_plain(v, f"{key}.{k}")
    elif type(value) in SEQUENCE_TYPES:
        for i, v in enumerate(value):
            check_plain(v, f"{key}[{i}]")
    else:
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise TypeError(f"checkpoint key {key} holds a {kind}; only tensors, dict, list, "
                        "tuple, str, int, float, bool and None load with weights_only=True")


def save_checkpoint(state: dict, path: str) -> None:
    """Write `state` atomically: a crash leaves either the old file or the new one, whole."""
    if type(state) not in MAPPING_TYPES:
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    for k, v in state.items():
        check_plain(v, str(k))
    directory = os.path.dirname(os.path.abspath(path))
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
    fd = os.open(directory, os.O_RDONLY)  # persist the rename itself
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint on the CPU; only tensors and plain values are unpickled."""
    return torch.load(path, map_location="cpu", weights_only=True)


def backbone_keys(state_dict: dict) -> dict:
    """Backbone weights from a pretraining, Encoder/Classifier or plain backbone state dict.

    Only the query encoder: encoder_k (the momentum copy), the head and the queue are left.
    """
    state = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DDP wrapper
    for prefix in ("encoder_q.backbone.", "backbone."):
        picked = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if picked:
            return picked
    return state


def load_backbone(path: str, arch: str) -> nn.Module:
    """build_backbone(arch) with the (query) backbone weights of the checkpoint at `path`."""
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "arch" not in ckpt or "state_dict" not in ckpt:
        raise ValueError(f"{path}: expected a dict with 'arch' and 'state_dict'")
    if ckpt["arch"] != arch:
        raise ValueError(f"{path} holds a {ckpt['arch']!r} network, but arch {arch!r} was asked for")
    model = build_backbone(arch)
    state = backbone_keys(ckpt["state_dict"])
    if not set(state) & set(model.state_dict()):
        raise ValueError(f"{path} (arch {ckpt['arch']!r}) has no weights that fit a {arch!r} "
                         f"backbone; its keys start with {sorted(ckpt['state_dict'])[:3]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    print(f"load_backbone: {len(state) - len(unexpected)} tensors from {path}"
          + (f"; missing (left at init): {missing}" if missing else "")
          + (f"; unexpected (ignored): {unexpected}" if unexpected else ""))
    return model
