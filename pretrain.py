"""DSM pretraining: MoCo with a scene-broken positive and a motion-broken negative.

The paper's "Overall Architecture" and "Objective Function" sections. Every training video gives a triplet (augment.py):

    a = b(c1)     -> f_q -> z_a    anchor: a plain augmented clip                  (query)
    p = s(b(c2))  -> f_k -> z_p    positive: TPS-warped, scene broken, motion kept  (key k+)
    n = t(b(c3))  -> f_q -> z_n    negative: flow-scaled and time-shifted, motion broken, scene kept

and f_q learns with the contrastive loss (Eq. 7, `--loss contrastive`, the paper's "DSM" rows), the intra-video
triplet loss (Eq. 5, `--loss triplet`, "DSM (Triplet)"), or both. f_k is the momentum (EMA) copy of f_q and the
queue holds its embeddings of other videos, as in MoCo (He et al. 2020).

Run:
    python pretrain.py                       # built-in synthetic videos, `mini` net, CPU
    torchrun --nproc_per_node=8 pretrain.py --dataset kinetics --root K400_256 --split-dir K400/annotations \\
        --arch i3d --size 224 --batch-size 128 --amp --out runs/k400_i3d
"""
import argparse
import contextlib
import copy
import json
import math
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import augment
import data
import models

# What the CPU demo on the built-in synthetic videos changes from the paper's settings: 200 epochs
# and a 6536-entry queue fit neither 5 minutes on 2 cores nor a training set of 800 videos; in 6
# epochs of `mini` the paper's SGD learns little motion for any method where AdamW does; tau 0.04
# leads MoCo as 0.07 does (docs/RESULTS.md). Flags given on the command line always win.
SYNTHETIC_DEFAULTS = dict(arch="mini", epochs=6, batch_size=16, moco_k=512, moco_t=0.04, optimizer="adam", lr=1e-3,
                          knn_every=3)
PAPER_DEFAULTS = dict(arch="i3d", epochs=200, batch_size=128, moco_k=6536, moco_t=0.07, optimizer="sgd", lr=0.003,
                      knn_every=0)
EMBEDDING_DIM = 128  # D of z_a, z_p, z_n and the queue (paper)
# m of f_k on the synthetic demo when Eq. 7 meets an intra-video negative: in its 300 steps f_k at m = 0.99 lags ~100
# steps behind f_q, and Eq. 7 weighed f_q(a).f_q(n) against f_q(a).f_k(p) across that lag (n took more than p). MoCo
# and Eq. 5 alone keep the paper's 0.99: on two tuning seeds no other m beat it on both (docs/RESULTS.md).
SYNTHETIC_EQ7_MOMENTUM = 0.95
SGD_MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # paper, Pre-training Settings
LR_STEPS = (0.4, 0.6, 0.8)  # x0.1 at these fractions of the epochs: 80, 120, 160 of 200 (paper)
KNN_K = 20  # neighbours of the kNN monitor, as InstDisc and MoCo's monitors
PRINT_EVERY = 10  # steps between progress-bar updates, the only device syncs of a training loop
BN_SPLITS = 4  # shuffle-BN on one process: BatchNorm groups, as MoCo's single-GPU demo (4 devices' worth)
MIN_BN_GROUP = 4  # clips per BatchNorm group below which its batch statistics are mostly noise


# ---- distributed helpers (shared by finetune.py and retrieve.py) ------------------------

def setup_distributed(workers: int = 0) -> tuple[int, int, torch.device]:
    """One process per device, as launched by torchrun; a plain `python` run is rank 0 of 1. On the CPU the
    `workers` DataLoader processes need cores too: torch's one thread per core on top of them made an epoch 1.25x
    slower (docs/RESULTS.md), so the process keeps the cores the workers leave, unless OMP_NUM_THREADS is set."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"local rank {local_rank} has no GPU: this node shows {torch.cuda.device_count()}; "
                             "start at most that many processes per node (torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        torch.backends.cudnn.benchmark = True  # fixed clip sizes: cuDNN times its kernels once and keeps the fastest
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            torch.set_num_threads(max(1, cores // world - workers))
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def teardown_distributed() -> None:
    """Every rank done with gloo/NCCL before any tears it down: a rank that leaves early can abort another."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (no gradient flows back)."""
    if world_size() == 1:
        return x
    x = x.contiguous()  # NCCL may stage the gather with the receive buffers' strides (pytorch#163712)
    gathered = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world_size())]
    dist.all_gather(gathered, x)
    return torch.cat(gathered)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN, step 1: deal the global batch out to the ranks in a random order. Without it the key's
    BatchNorm statistics come from the same samples as the query's on each device, and the network can find the
    positive through them instead of the content."""
    x_all = concat_all_gather(x)  # (world * B, ...)
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    if world_size() > 1:
        dist.broadcast(idx_shuffle, src=0)
    idx_unshuffle = torch.argsort(idx_shuffle)
    rank = dist.get_rank() if dist.is_initialized() else 0
    return x_all[idx_shuffle.view(world_size(), -1)[rank]], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
    """Shuffle-BN, step 2: give every rank back the outputs of its own samples."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return concat_all_gather(x)[idx_unshuffle.view(world_size(), -1)[rank]]


# ---- the model: query encoder, momentum encoder, queue -----------------------------------

class SplitBatchNorm3d(nn.BatchNorm3d):
    """BatchNorm3d whose training statistics come from `splits` interleaved sub-batches (sample i in
    group i mod splits), in one call: what `splits` devices of a DDP run would each compute.
    MoCo's single-GPU demo does the same with a 2D SplitBatchNorm."""

    splits = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.splits == 1:
            return super().forward(x)
        N, C = x.shape[:2]  # (N, C, T, H, W)
        assert N % self.splits == 0, f"a batch of {N} does not split into {self.splits} BatchNorm groups"
        mean, var = self.running_mean.repeat(self.splits), self.running_var.repeat(self.splits)
        grouped = x.reshape(N // self.splits, C * self.splits, *x.shape[2:])  # group g = channels g*C..(g+1)*C-1
        out = F.batch_norm(grouped, mean, var, self.weight.repeat(self.splits), self.bias.repeat(self.splits),
                           True, self.momentum, self.eps)
        self.running_mean.copy_(mean.view(self.splits, C).mean(0))  # the groups' running statistics, averaged
        self.running_var.copy_(var.view(self.splits, C).mean(0))
        return out.view_as(x)


def split_batchnorm_(model: nn.Module, splits: int) -> nn.Module:
    """Make every BatchNorm3d of `model` a SplitBatchNorm3d over `splits` groups, in place; same state_dict."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            m.__class__, m.splits = SplitBatchNorm3d, splits
    return model


class DSM(nn.Module):
    """f_q, its momentum copy f_k and a queue of K key embeddings (MoCo) for the DSM triplet.

    z_a = f_q(a) is the query. p is MoCo's key k+: z_p = f_k(p), shuffle-BN, no gradient; the queue holds z_p of
    past batches, Eq. 7's embeddings of other videos, with the index of the video each came from, so that keys of
    the anchor's own video leave Eq. 7's denominator. The paper does not say which encoder embeds n: here f_q, with
    gradient (through f_k the synthetic demo's kNN was far lower: docs/RESULTS.md). `bn_splits` > 1 emulates
    shuffle-BN on one process (SplitBatchNorm3d).
    """

    def __init__(self, arch: str, dim: int = 128, K: int = 6536, m: float = 0.99, tau: float = 0.07,
                 bn_splits: int = 1):
        super().__init__()
        self.K, self.m, self.tau = K, m, tau
        self.encoder_q = split_batchnorm_(models.Encoder(arch, dim), bn_splits)
        self.encoder_k = copy.deepcopy(self.encoder_q)
        self.encoder_k.requires_grad_(False)  # f_k learns only through the momentum update
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))  # (D, K) random unit vectors
        self.register_buffer("queue_video", torch.full((K,), -1, dtype=torch.long))  # (K,) video of each key
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(self.m).add_(param_q.detach(), alpha=1 - self.m)  # theta_k <- m theta_k + (1 - m) theta_q

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, video: torch.Tensor) -> None:
        keys, video = concat_all_gather(keys), concat_all_gather(video)  # every rank's keys: all queues stay equal
        assert keys.shape[0] <= self.K, "the queue must hold at least one global batch of keys"
        slots = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % self.K
        self.queue[:, slots] = keys.T.to(self.queue.dtype)  # FIFO: overwrite the oldest keys, wrapping at K
        self.queue_video[slots] = video
        self.queue_ptr[0] = (self.queue_ptr[0] + keys.shape[0]) % self.K

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        """f_k(x) with shuffle-BN: across ranks under DDP, across the bn_splits groups on one process."""
        x, idx_unshuffle = batch_shuffle(x)
        return batch_unshuffle(self.encoder_k(x), idx_unshuffle)

    def forward(self, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor | None,
                video: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """a, p, n: (B, C, T, H, W), video: (B,) dataset index -> z_a, z_p, z_n (B, D) and the Eq. 7 logits."""
        self.momentum_update()
        z_a = self.encoder_q(a)  # (B, D), unit norm
        z_n = None if n is None else self.encoder_q(n)  # (B, D)
        z_p = self.encode_keys(p)  # (B, D)
        out = {"z_a": z_a, "z_p": z_p, "z_n": z_n}
        if self.K > 0:
            own = self.queue_video[None] == video[:, None]  # (B, K): keys of the anchor's own video
            out["logits"] = contrastive_logits(z_a, z_p, z_n, self.queue.clone().detach(), self.tau, own)
            out["own_in_queue"] = own.any(1).float().mean()  # logged: how often the mask matters
            self.enqueue(z_p, video)
        return out


def contrastive_logits(z_a: torch.Tensor, z_p: torch.Tensor, z_n: torch.Tensor | None, queue: torch.Tensor,
                       tau: float, own: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of Eq. 7, the positive at index 0: [z_a.z_p, z_a.z_n, z_a.queue] / tau, (B, 2 + K). own (B, K): queue
    keys of the anchor's own video, left out of the denominator (logit -inf). All in float32: under autocast the
    matmul z_a @ queue alone would run in bf16 or fp16."""
    z_a, z_p, queue = z_a.float(), z_p.float(), queue.float()
    l_pos = (z_a * z_p).sum(1, keepdim=True)  # (B, 1)  z_a . z_p
    device = z_a.device.type
    with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else contextlib.nullcontext():
        l_queue = z_a @ queue  # (B, K)  z_a . k for the K keys of other videos
    if own is not None:
        l_queue = l_queue.masked_fill(own, float("-inf"))
    l_intra = [] if z_n is None else [(z_a * z_n.float()).sum(1, keepdim=True)]  # (B, 1)  z_a . z_n, same video
    return torch.cat([l_pos, *l_intra, l_queue], dim=1) / tau  # Eq. 7's logits


def dsm_losses(out: dict[str, torch.Tensor], loss: str, margin: float) -> dict[str, torch.Tensor]:
    """The loss terms of one batch and, under "loss", the one trained on or (both) their sum."""
    terms = {}
    if loss in ("contrastive", "both"):
        logits = out["logits"].float()
        terms["contrastive"] = F.cross_entropy(logits, logits.new_zeros(len(logits), dtype=torch.long))  # Eq. 7
        with torch.no_grad():  # what Eq. 7's softmax gives the positive and the intra-video negative
            prob = logits.softmax(dim=1)
            terms["p_p"] = prob[:, 0].mean()
            if out.get("z_n") is not None:
                terms["p_n"] = prob[:, 1].mean()
        if "own_in_queue" in out:  # share of anchors whose own video has a key in the queue
            terms["own_in_queue"] = out["own_in_queue"]
    if loss in ("triplet", "both"):
        d_ap = (out["z_a"] - out["z_p"]).norm(dim=1)  # d(z_a, z_p) = ||z_a - z_p||_2
        d_an = (out["z_a"] - out["z_n"]).norm(dim=1)  # d(z_a, z_n)
        terms["triplet"] = F.relu(d_ap - d_an + margin).mean()  # Eq. 5, averaged over the batch
    terms["loss"] = terms["contrastive"] + terms["triplet"] if loss == "both" else terms[loss]
    return terms


# ---- data --------------------------------------------------------------------------------

def resolve_defaults(args: argparse.Namespace, synthetic: dict, paper: dict) -> argparse.Namespace:
    """Fill every flag left at None from the synthetic-demo or the paper settings."""
    for key, value in (synthetic if args.dataset == "synthetic" else paper).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def make_loader(dataset: data.ClipDataset, batch_size: int, args: argparse.Namespace, train: bool,
                rank: int, world: int, collate_fn=None) -> torch.utils.data.DataLoader:
    """A loader over this rank's shard. The sampler shuffles by (seed, epoch) even on one process,
    so a resumed run sees the same order as an uninterrupted one."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train,
                                                  seed=args.seed, drop_last=train)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=args.workers,
                                       pin_memory=torch.cuda.is_available(), drop_last=train,
                                       worker_init_fn=augment.worker_init, collate_fn=collate_fn)


def set_epoch(loader: torch.utils.data.DataLoader, epoch: int) -> None:
    loader.sampler.set_epoch(epoch)
    loader.dataset.set_epoch(epoch)


def pretrain_loader(args: argparse.Namespace, rank: int, world: int) -> torch.utils.data.DataLoader:
    """Triplets (a, p, n) from the training split; Table 4's rows choose the disturbances."""
    transform = augment.DSMTriplet(args.size, positive=args.positive, negative=args.negative, flow_max=args.flow_max,
                                   crop_scale=args.crop_scale, flip=args.flip)
    shift = args.shift if args.negative in ("disturb", "shift") else None
    on_device = args.augment_device != "cpu"  # workers decode and draw; train_one_epoch applies b, s, t
    dataset = data.ClipDataset(data.build_source(args, train=True), args.clip_len, args.stride,
                               augment.FramesAndDraws(transform) if on_device else transform,
                               shift=shift, mode="train", seed=args.seed)
    return make_loader(dataset, args.batch_size // world, args, train=True, rank=rank, world=world,
                       collate_fn=augment.collate_frames if on_device else None)


# ---- training ----------------------------------------------------------------------------

def make_optimizer(params, args: argparse.Namespace) -> torch.optim.Optimizer:
    """The paper's SGD (momentum 0.9, weight decay 5e-4), or AdamW with that weight decay."""
    if args.optimizer == "adam":
        return torch.optim.AdamW(params, lr=args.lr, weight_decay=WEIGHT_DECAY)
    return torch.optim.SGD(params, lr=args.lr, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)


def learning_rate(args: argparse.Namespace, epoch: int) -> float:
    """SGD: x0.1 at 40, 60 and 80% of the epochs (the paper: 80/120/160 of 200); AdamW: constant."""
    if args.optimizer == "adam":
        return args.lr
    return args.lr * 0.1 ** sum(epoch >= round(args.epochs * f) for f in LR_STEPS)


def check_finite(terms: dict[str, float], epoch: int, step: int) -> None:
    bad = {k: v for k, v in terms.items() if not math.isfinite(v)}
    if bad:
        raise FloatingPointError(f"non-finite loss at epoch {epoch + 1}, step {step}: {bad}; the last "
                                 "good checkpoint is kept. Try a lower --lr or turn off --amp.")


def train_step(model: nn.Module, views: torch.Tensor, video: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, args: argparse.Namespace, amp_dtype: torch.dtype | None) -> dict:
    """One step on the triplets `views` (B, 3, C, T, H, W), or (B, 2, ...) without a negative, of videos `video`."""
    a, p, n = (as_input(views[:, i], args) if i < views.shape[1] else None for i in range(3))
    with torch.autocast(views.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        terms = dsm_losses(model(a, p, n, video), args.loss, args.margin)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    return {k: v.detach() for k, v in terms.items()}


def as_input(x: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """channels_last_3d lets cuDNN pick its fastest 3D kernels on GPUs (--channels-last)."""
    return x.contiguous(memory_format=torch.channels_last_3d) if args.channels_last else x


def place(model: nn.Module, args: argparse.Namespace, device: torch.device) -> nn.Module:
    """The model on its device, its 5-d weights channels_last_3d with --channels-last: inputs alone
    in that format would make cuDNN convert at every layer."""
    return model.to(device, memory_format=torch.channels_last_3d if args.channels_last else torch.preserve_format)


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, args: argparse.Namespace, epoch: int,
                    device: torch.device) -> dict[str, float]:
    """One pass over this rank's shard; returns the epoch's mean loss terms, speed and skipped videos."""
    model.train()
    amp_dtype = amp_dtype_for(args, device)
    sums, skipped, wait, seen = {}, 0, 0.0, 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main(), leave=False)
    t_start = t_ready = time.perf_counter()
    for step, batch in enumerate(bar, 1):
        wait += time.perf_counter() - t_ready
        views, video = batch["views"], batch["index"].to(device)
        if isinstance(views, dict):  # --augment-device cuda: the workers sent frames and draws; apply them batched
            views = loader.dataset.transform.triplet.apply_batch(views["frames"], views["draws"], device)
        else:
            views = views.to(device, non_blocking=True)
        for k, v in train_step(model, views, video, optimizer, scaler, args, amp_dtype).items():
            sums[k] = sums.get(k, 0.0) + v
        skipped += int((batch["skipped"] > 0).sum())  # sample i skips exactly when video i is bad
        seen += len(views) * world_size()
        if step % PRINT_EVERY == 0 or step == len(loader):
            means = {k: float(v) / step for k, v in sums.items()}
            check_finite(means, epoch, step)
            elapsed = time.perf_counter() - t_start
            bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                            clips_s=f"{seen / elapsed:.1f}", wait=f"{wait / elapsed:.0%}")
        t_ready = time.perf_counter()
    elapsed = time.perf_counter() - t_start
    skipped = int(concat_all_gather(torch.tensor([skipped], device=device)).sum())
    memory = {"peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30} if device.type == "cuda" else {}
    return {**{k: float(v) / len(loader) for k, v in sums.items()}, "clips_per_s": seen / elapsed,
            "data_wait": wait / elapsed, "skipped_videos": skipped, **memory}


def amp_dtype_for(args: argparse.Namespace, device: torch.device) -> torch.dtype | None:
    """--amp: bfloat16 where the GPU computes it natively (Ampere and newer; no loss scaling needed), else
    float16 with loss scaling: V100, T4 and RTX 20xx only emulate bf16, and slowly. CPU stays float32."""
    if not args.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


# ---- kNN monitor (InstDisc / MoCo / DINO style) ------------------------------------------

def knn_loaders(args: argparse.Namespace, rank: int, world: int) -> tuple:
    """Train and test splits, one centre clip per video, for the kNN monitor."""
    transform = augment.ClipTransform(args.size, train=False)
    return tuple(make_loader(data.ClipDataset(data.build_source(args, train=split), args.clip_len, args.stride,
                                              transform, mode="test", test_clips=1, seed=args.seed),
                             max(1, args.batch_size // world), args, train=False, rank=rank, world=world)
                 for split in (True, False))


@torch.no_grad()
def embed(backbone: nn.Module, loader: torch.utils.data.DataLoader,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised, average-pooled backbone features (N, C), labels (N,) and scenes (N,; -1 where
    not known) of the whole split, on every rank."""
    backbone.eval()
    feats, labels, scenes, index = [], [], [], []
    for batch in loader:
        x = batch["views"].to(device).flatten(0, 1)  # (B * clips, C, T, H, W)
        f = backbone(x).float().mean(dim=(2, 3, 4))  # (B * clips, C) global average pool
        feats.append(f.view(len(batch["label"]), -1, f.shape[1]).mean(1))  # (B, C) mean over a video's clips
        labels.append(batch["label"].to(device))
        scenes.append(batch["scene"].to(device))
        index.append(batch["index"].to(device))
    feats, labels, scenes, index = (concat_all_gather(torch.cat(t)) for t in (feats, labels, scenes, index))
    n = len(loader.dataset)  # the sampler pads shards with repeats: put every video back in its own row
    read = torch.zeros(n, dtype=torch.bool, device=index.device).index_fill_(0, index, True)  # bad videos: never read
    out_f, out_y, out_s = (t.new_zeros(n, *t.shape[1:]).index_copy_(0, index, t)[read] for t in (feats, labels, scenes))
    return F.normalize(out_f, dim=1), out_y, out_s


def knn_top1(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
             k: int = 20, t: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN (Wu et al. 2018): each of the k most cosine-similar training videos votes exp(sim / t)."""
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    correct = 0
    for i in range(0, len(test_f), chunk):
        sim, idx = (test_f[i:i + chunk] @ train_f.T).topk(min(k, len(train_f)), dim=1)  # (chunk, k)
        votes = torch.zeros(len(sim), num_classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / t).exp())
        correct += int((votes.argmax(1) == test_y[i:i + chunk]).sum())
    return 100.0 * correct / len(test_f)


def knn_monitor(backbone: nn.Module, loaders: tuple, args: argparse.Namespace, device: torch.device) -> dict:
    """kNN top-1 (%) of test-split videos among train-split videos in the backbone's feature space: on the motion
    classes ("knn_top1") and, where scenes are known, on the scene ("knn_scene_top1"). Decoupling shows as the first
    up and the second down. Watching must not change the run: each DataLoader iterator draws its seed from torch's
    global generator, which also drives shuffle-BN, so that generator's state is put back afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        train_f, train_y, train_s = embed(backbone, loaders[0], device)
        test_f, test_y, test_s = embed(backbone, loaders[1], device)
    out = {"knn_top1": knn_top1(train_f, train_y, test_f, test_y, k=KNN_K)}
    if bool((train_s >= 0).all()) and bool((test_s >= 0).all()):
        out["knn_scene_top1"] = knn_top1(train_f, train_s, test_f, test_s, k=KNN_K)
    return out


# ---- checkpoints and logs (rank 0 alone writes) -------------------------------------------

def save_resumable(out: str, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                   args: argparse.Namespace, epoch: int) -> None:
    """Everything a killed run needs to end where an uninterrupted one would: model, momentum encoder, queue,
    optimiser, scaler, epoch and every rank's RNG state. Call it on every rank (the RNG states are gathered)."""
    rng = rng_states()
    if is_main():
        models.save_checkpoint({"arch": args.arch, "epoch": epoch, "state_dict": model.state_dict(),
                                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                "args": vars(args), **rng}, os.path.join(out, "checkpoint.pth"))


def rng_states() -> dict[str, list[torch.Tensor]]:
    """Each rank's CPU and GPU generator state, as lists indexed by rank (rank 0 saves them all)."""
    cuda = torch.cuda.is_available()
    own = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if cuda else [])
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    every = [list(concat_all_gather(state.to(device)[None]).cpu()) for state in own]  # NCCL moves CUDA tensors only
    return {"rng_cpu": every[0], "rng_cuda": every[1] if cuda else []}


def restore_rng(state: dict) -> None:
    """Give this rank its own generator states back. On another number of ranks, rank r takes rank
    r mod (ranks saved): the run goes on, no longer bit for bit the uninterrupted one."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    cpu = state["rng_cpu"] if isinstance(state["rng_cpu"], list) else [state["rng_cpu"]]
    torch.set_rng_state(cpu[rank % len(cpu)])
    if state["rng_cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng_cuda"][rank % len(state["rng_cuda"])])


def resume(out: str, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
           arch: str) -> int:
    """Load OUT/checkpoint.pth if there is one; returns the number of finished epochs."""
    path = os.path.join(out, "checkpoint.pth")
    if not os.path.exists(path):
        if is_main():
            print(f"--resume: no {path} yet, starting from scratch")
        return 0
    state = models.load_checkpoint(path)
    if state["arch"] != arch:
        raise ValueError(f"{path} holds a {state['arch']} model, but --arch is {arch}")
    model.load_state_dict(state["state_dict"])
    optimizer.load_state_dict(state["optimizer"])
    if state["scaler"] and scaler.is_enabled():  # empty when written without loss scaling (fp32, bf16, CPU)
        scaler.load_state_dict(state["scaler"])
    restore_rng(state)
    truncate_log(os.path.join(out, "log.jsonl"), state["epoch"])
    if is_main():
        print(f"resumed from {path} after epoch {state['epoch']}")
    return state["epoch"]


def truncate_log(path: str, epochs_done: int) -> None:
    """Drop log lines of epochs the checkpoint does not hold (a kill between log and checkpoint)."""
    if not is_main() or not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)["epoch"] <= epochs_done]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def log_epoch(out: str, record: dict) -> None:
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


# ---- command line and main ---------------------------------------------------------------

def add_run_args(parser: argparse.ArgumentParser, out: str, training: bool) -> argparse._ArgumentGroup:
    """The run flags every stage script shares: where to write, seed, GPU speed-ups (and resume)."""
    run = parser.add_argument_group("run")
    run.add_argument("--out", default=out, help=f"run folder (default: {out})")
    run.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentations (default: 0)")
    run.add_argument("--amp", action="store_true",
                     help="mixed precision on CUDA: bf16 where native, else fp16 (default: off)")
    run.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format (default: off)")
    if training:
        run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pth (default: off)")
    return run


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """The method's flags (paper: Objective Function, Table 4) and the optimiser's (Pre-training Settings)."""
    method = parser.add_argument_group("DSM method (paper: Objective Function, Table 4)")
    method.add_argument("--arch", choices=models.ARCHS, default=None,
                        help="backbone (default: mini on synthetic, else i3d)")
    method.add_argument("--loss", choices=["contrastive", "triplet", "both"], default="contrastive",
                        help="Eq. 7 (the 'DSM' rows), Eq. 5 ('DSM (Triplet)'), or their sum (default: contrastive)")
    method.add_argument("--positive", choices=["tps", "none"], default="tps",
                        help="tps = S-warping; none = another crop of the same clip (default: tps)")
    method.add_argument("--negative", choices=["disturb", "flow", "shift", "none"], default="disturb",
                        help="disturb = M-disturb (flow scaling + temporal shift), flow = Scaling-Of, shift = T-Shift, "
                             "none = queue negatives only; '--positive none --negative none' is the MoCo baseline "
                             "(default: disturb)")
    method.add_argument("--flow-max", type=float, default=5.0, help="M of Eq. 3: phi(t) ~ U[0, M] (default: 5)")
    method.add_argument("--moco-k", type=int, default=None,
                        help="queue length K (default: 512 on synthetic, else 6536)")
    method.add_argument("--moco-m", type=float, default=None,
                        help="momentum m of f_k (default: 0.95 on synthetic when Eq. 7 has a negative n, else 0.99)")
    method.add_argument("--moco-t", type=float, default=None,
                        help="temperature tau of Eq. 7; the paper writes 1, its code uses 0.07 "
                             "(default: 0.04 on synthetic, else 0.07)")
    method.add_argument("--margin", type=float, default=0.5, help="triplet margin of Eq. 5 (default: 0.5)")
    optim = parser.add_argument_group("optimisation (paper: Pre-training Settings)")
    optim.add_argument("--epochs", type=int, default=None, help="default: 6 on synthetic, else 200")
    optim.add_argument("--batch-size", type=int, default=None,
                       help="GLOBAL batch, split over the ranks (default: 16 on synthetic, else 128)")
    optim.add_argument("--lr", type=float, default=None,
                       help="learning rate for the global batch; the paper's SGD 0.003 is for 128, scale it "
                            "linearly with the batch (default: AdamW 1e-3 on synthetic, else 0.003)")
    optim.add_argument("--optimizer", choices=["sgd", "adam"], default=None,
                       help="sgd = the paper's SGD (momentum 0.9, weight decay 5e-4, lr x0.1 at 40, 60 and 80%% of "
                            "the epochs); adam = AdamW, constant lr (default: adam on synthetic, else sgd)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_data_args(parser)
    parser.add_argument("--augment-device", choices=["cpu", "cuda"], default=None,
                        help="where b, s and t run: cpu = per sample in the DataLoader workers; cuda = batched on "
                             "the training GPU, the workers only decode and draw (default: cuda when training on "
                             "a GPU, else cpu)")
    add_method_args(parser)
    run = add_run_args(parser, "runs/pretrain", training=True)
    run.add_argument("--knn-every", type=int, default=None,
                     help="kNN monitor every N epochs, 0 = only at the end (default: 3 on synthetic, else 0)")
    args = resolve_defaults(parser.parse_args(argv), SYNTHETIC_DEFAULTS, PAPER_DEFAULTS)
    data.resolve_data_args(args)
    if args.moco_m is None:
        eq7_with_n = args.loss != "triplet" and args.negative != "none"
        args.moco_m = SYNTHETIC_EQ7_MOMENTUM if args.dataset == "synthetic" and eq7_with_n else 0.99
    args.augment_device = args.augment_device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.augment_device == "cuda" and not torch.cuda.is_available():
        parser.error("--augment-device cuda needs a GPU; this machine has none")
    if args.loss != "contrastive" and args.negative == "none":
        parser.error(f"--loss {args.loss} needs a negative for Eq. 5: choose --negative disturb, flow or shift")
    if args.loss != "triplet" and args.moco_k < args.batch_size:
        parser.error(f"--moco-k {args.moco_k} must hold at least one global batch (--batch-size {args.batch_size})")
    return args


def check_queue(args: argparse.Namespace, num_videos: int) -> None:
    """A queue longer than the training set holds the anchor's own video as a 'negative'."""
    if args.loss != "triplet" and args.moco_k >= num_videos:
        suggestion = max(args.batch_size, num_videos // 2)
        raise SystemExit(f"--moco-k {args.moco_k} is not smaller than the training set ({num_videos} videos): "
                         f"the queue would hold the anchor's own video; try --moco-k {suggestion}")


def print_config(stage: str, args: argparse.Namespace, world: int, bn_group: int | None, **fields: object) -> None:
    """Print the resolved setting once, on rank 0, and warn about settings that are surely unintended: the synthetic
    demo on several devices, and BatchNorm groups of a few clips (bn_group None: BatchNorm frozen or in eval mode)."""
    if not is_main():
        return
    shown = dict(dataset=args.dataset, arch=args.arch, clip=f"{args.clip_len} x {args.stride} frames at {args.size}",
                 batch=f"{args.batch_size} global = {args.batch_size // world} per rank x {world}", **fields,
                 out=args.out)
    print(f"{stage}: " + " | ".join(f"{k} {v}" for k, v in shown.items()), flush=True)
    if args.dataset == "synthetic" and world > 1:
        warnings.warn(f"{stage} runs the built-in synthetic CPU demo on {world} processes (a smoke test of the "
                      "setup). The paper's setting needs the data: --dataset kinetics|ucf101 --root VIDEOS "
                      "--split-dir SPLITS, which also selects 224 px, 16 x 4 frames, batch 128, K 6536, 200 epochs.")
    if bn_group is not None and bn_group < MIN_BN_GROUP:
        warnings.warn(f"BatchNorm sees {bn_group} clips at a time ({args.batch_size} over {world} ranks"
                      f"{'' if world > 1 else f' and {BN_SPLITS} shuffle-BN groups'}): raise --batch-size to at least "
                      f"{MIN_BN_GROUP * args.batch_size // bn_group} for batch statistics worth the name.")


def final_report(model: DSM, knn: tuple, args: argparse.Namespace, device: torch.device) -> dict:
    """kNN top-1 of the learned encoder next to a randomly initialised one: what pretraining bought."""
    learned = knn_monitor(model.encoder_q.backbone, knn, args, device)
    torch.manual_seed(args.seed)
    random_init = knn_monitor(models.build_backbone(args.arch).to(device), knn, args, device)
    if is_main():
        print(f"kNN top-1 on the test split, motion classes: pretrained {learned['knn_top1']:.1f}% | "
              f"random init {random_init['knn_top1']:.1f}%")
        if "knn_scene_top1" in learned:
            print(f"kNN top-1 on the test split, scene label:    pretrained {learned['knn_scene_top1']:.1f}% | "
                  f"random init {random_init['knn_scene_top1']:.1f}%  (lower = less scene)")
    return {**learned, **{k + "_random_init": v for k, v in random_init.items()}}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.workers)
    assert args.batch_size % world == 0, f"--batch-size {args.batch_size} must divide over {world} ranks"
    torch.manual_seed(args.seed)
    loader = pretrain_loader(args, rank, world)
    check_queue(args, len(loader.dataset))
    bn_splits = BN_SPLITS if world == 1 else 1  # under DDP every rank is a BatchNorm group of its own
    assert (args.batch_size // world) % bn_splits == 0, \
        f"the batch {args.batch_size} must split into {bn_splits} BatchNorm groups of the same size"
    print_config("pretrain", args, world, args.batch_size // world // bn_splits,
                 method=f"loss {args.loss}, positive {args.positive}, negative {args.negative}",
                 queue=f"K {args.moco_k}, tau {args.moco_t}, m {args.moco_m}" if args.loss != "triplet" else "none",
                 schedule=f"{args.epochs} epochs, {args.optimizer} lr {args.lr}")
    K = 0 if args.loss == "triplet" else args.moco_k
    model = place(DSM(args.arch, EMBEDDING_DIM, K, args.moco_m, args.moco_t, bn_splits), args, device)
    optimizer = make_optimizer(model.encoder_q.parameters(), args)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype_for(args, device) == torch.float16)
    if is_main():
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
    start = resume(args.out, model, optimizer, scaler, args.arch) if args.resume else 0
    ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    knn = knn_loaders(args, rank, world)
    for epoch in range(start, args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, epoch)
        set_epoch(loader, epoch)
        stats = train_one_epoch(ddp_model, loader, optimizer, scaler, args, epoch, device)
        if args.knn_every and (epoch + 1) % args.knn_every == 0 and epoch + 1 < args.epochs:
            stats.update(knn_monitor(model.encoder_q.backbone, knn, args, device))
        if epoch + 1 == args.epochs:
            stats.update(final_report(model, knn, args, device))
        if is_main():
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats}
            print(json.dumps(record))
            log_epoch(args.out, record)
        save_resumable(args.out, model, optimizer, scaler, args, epoch + 1)  # f_q, f_k, queue, optimiser, RNG
        if is_main():  # and f_q's backbone alone, for finetune.py and retrieve.py
            models.save_checkpoint({"arch": args.arch, "state_dict": model.encoder_q.backbone.state_dict()},
                                   os.path.join(args.out, "backbone.pth"))
    teardown_distributed()


if __name__ == "__main__":
    main()
