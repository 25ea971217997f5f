"""Action recognition downstream of DSM (paper: "Fine-tuning Settings", "Evaluation Settings", Table 1, Figs. 1, 4).

--protocol full fine-tunes every weight from the pretrained backbone (45 epochs, lr 0.1 x0.1 every 10; the CPU demo's
backbone at 0.1x the fc's lr); linear freezes it, BatchNorm included, and trains the fc. A test video's prediction is
the mean of its 10 uniformly spaced clips' softmaxes. --label-fraction 0.01 / 0.1: class-balanced subsets (Fig. 4);
--static: one frame repeated, --compare: what motion adds per class (Fig. 1); --split all: the mean of the three
splits (Table 1). Writes OUT/results.json (clip/video top-1/top-5 %, per_class_top1, the arguments), OUT/log.jsonl.

    python pretrain.py && python finetune.py      # synthetic videos, `mini`, CPU: a few minutes after pretraining
    python finetune.py --pretrained none --out runs/finetune_scratch          # supervised from scratch
    python finetune.py --static --out runs/finetune_static && python finetune.py --compare runs/finetune runs/finetune_static
    torchrun --nproc_per_node=8 finetune.py --dataset hmdb51 --root HMDB51 --split-dir HMDB51/testTrainMulti_7030_splits \\
        --arch i3d --size 224 --pretrained runs/k400_i3d/checkpoint.pth --split all --amp --out runs/hmdb_i3d
"""
import argparse
import json
import os
import pathlib
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import augment
import data
import models
import pretrain
from pretrain import concat_all_gather, is_main

# The synthetic CPU demo: 24 epochs of 16-clip batches (lr x0.1 every 8), minutes on 2 cores, the backbone at 0.1x the
# fc's lr. Three fine-tuning seeds from one checkpoint: at one lr they spread over 12 points or collapse; at 0.1x for 12
# epochs over 9; for 24 epochs over 2.75 (docs/RESULTS.md).
SYNTHETIC_DEFAULTS = dict(arch="mini", epochs=24, batch_size=16, lr=0.1, lr_every=8, backbone_lr=0.1)
PAPER_DEFAULTS = dict(arch="i3d", epochs=45, batch_size=128, lr=0.1, lr_every=10, backbone_lr=1.0)
PROTOCOL_DEFAULTS = {"full": dict(wd=5e-4, dropout=0.5), "linear": dict(wd=0.0, dropout=0.0)}  # linear: MoCo's probe


def balanced_subset(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Sorted indices of round(fraction * N / C) >= 1 videos per class (SimCLR's 1%, 10%; paper: ~6, ~57, Kinetics)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    classes, rng = np.unique(labels), np.random.default_rng(seed)
    per_class = max(1, round(fraction * len(labels) / len(classes)))
    kept = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return sorted(int(i) for i in np.concatenate(kept))


def training_set(args: argparse.Namespace, source) -> torch.utils.data.Dataset:
    """Train-split clips with the basic augmentation; --static: one frame repeated (Fig. 1)."""
    transform = augment.ClipTransform(args.size, train=True, flip=args.flip, crop_scale=args.crop_scale)
    dataset = data.ClipDataset(source, args.clip_len, args.stride, transform, mode="train", static=args.static, seed=args.seed)
    if args.label_fraction == 1:
        return dataset
    kept = balanced_subset([source.label(i) for i in range(len(source))], args.label_fraction, args.seed)
    if is_main():
        print(f"--label-fraction {args.label_fraction}: {len(kept)} of {len(source)} training videos")
    subset = torch.utils.data.Subset(dataset, kept)
    subset.set_epoch = dataset.set_epoch  # pretrain.set_epoch(loader) must reach the clips: new ones every epoch
    return subset


def test_set(args: argparse.Namespace, source) -> data.ClipDataset:
    """--test-clips centre-cropped clips per video, spaced uniformly (Evaluation Settings)."""
    return data.ClipDataset(source, args.clip_len, args.stride, augment.ClipTransform(args.size, train=False),
                            mode="test", test_clips=args.test_clips, seed=args.seed)


class LinearProbe(models.Classifier):
    """A Classifier with a frozen backbone: no gradients, and BatchNorm in eval mode keeps the pretrained statistics."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.0):
        super().__init__(backbone, num_classes, dropout)
        self.backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()
        return self


def build_model(args: argparse.Namespace, num_classes: int) -> models.Classifier:
    """The pretrained query backbone f (or a random one) under a new fc for the classes."""
    pretrained = args.pretrained != "none"
    backbone = models.load_backbone(args.pretrained, args.arch) if pretrained else models.build_backbone(args.arch)
    return (LinearProbe if args.protocol == "linear" else models.Classifier)(backbone, num_classes, args.dropout)


def learning_rate(args: argparse.Namespace, epoch: int) -> float:
    return args.lr * 0.1 ** (epoch // args.lr_every)  # paper: x0.1 every 10 epochs


def make_optimizer(model: models.Classifier, args: argparse.Namespace) -> torch.optim.SGD:
    """SGD over what trains: the backbone at --backbone-lr times the fc's lr (full), the fc alone (linear)."""
    groups = [{"params": [p for p in model.backbone.parameters() if p.requires_grad], "lr_mult": args.backbone_lr},
              {"params": list(model.fc.parameters()), "lr_mult": 1.0}]
    groups = [g | {"lr": args.lr * g["lr_mult"]} for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)


def train_step(model: nn.Module, clips: torch.Tensor, labels: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on clips (B, C, T, H, W); returns the loss and the logits (B, classes), detached."""
    with torch.autocast(clips.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(clips)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, args: argparse.Namespace, epoch: int, device: torch.device) -> dict:
    """One pass over this rank's shard: mean loss, clip top-1 on the augmented clips, speed, skips."""
    model.train()
    amp_dtype = pretrain.amp_dtype_for(args, device)
    loss_sum, correct, skipped = torch.zeros((), device=device), torch.zeros((), device=device), 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main(), leave=False)
    t_start = time.perf_counter()
    for step, batch in enumerate(bar, 1):
        clips = pretrain.as_input(batch["views"].to(device, non_blocking=True), args)  # (B, C, T, H, W)
        labels = batch["label"].to(device, non_blocking=True)
        loss, logits = train_step(model, clips, labels, optimizer, scaler, amp_dtype)
        loss_sum += loss
        correct += (logits.argmax(1) == labels).sum()
        skipped += int((batch["skipped"] > 0).sum())  # sample i skips exactly when video i is bad
        if step % pretrain.PRINT_EVERY == 0 or step == len(loader):
            mean_loss = float(loss_sum) / step
            pretrain.check_finite({"loss": mean_loss}, epoch, step)
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{100 * float(correct) / (step * len(labels)):.1f}",
                            lr=f"{optimizer.param_groups[-1]['lr']:.2e}")
    elapsed, totals = time.perf_counter() - t_start, torch.stack([loss_sum, correct, loss_sum.new_tensor(skipped)])
    loss_sum, correct, skipped = concat_all_gather(totals[None]).sum(0).tolist()  # over the ranks
    seen = len(loader) * loader.batch_size * pretrain.world_size()  # drop_last: every training batch is full
    return {"loss": loss_sum / (len(loader) * pretrain.world_size()), "train_clip_top1": 100 * correct / seen,
            "clips_per_s": seen / elapsed, "skipped_videos": int(skipped)}


@torch.no_grad()
def predict(model: nn.Module, loader: torch.utils.data.DataLoader, args: argparse.Namespace, device: torch.device) -> dict:
    """Per video, on every rank: "probs" its clips' mean softmax, "clip_top1/5" its right clips, "label", "read"."""
    model.eval()
    amp_dtype = pretrain.amp_dtype_for(args, device)
    names, rows = ("probs", "clip_top1", "clip_top5", "label", "index"), []
    for batch in tqdm(loader, desc="test", disable=not is_main(), leave=False):
        views = batch["views"].to(device, non_blocking=True)  # (B, num_clips, C, T, H, W)
        labels = batch["label"].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(pretrain.as_input(views.flatten(0, 1), args))  # (B * num_clips, classes)
        probs = logits.float().softmax(1).view(*views.shape[:2], -1)  # (B, num_clips, classes)
        hits = probs.topk(min(5, probs.shape[2]), dim=2).indices == labels[:, None, None]  # (B, num_clips, 5)
        rows.append((probs.mean(1), hits[..., 0].sum(1), hits.any(2).sum(1), labels, batch["index"].to(device)))
    gathered = {k: concat_all_gather(torch.cat(v)) for k, v in zip(names, zip(*rows))}
    index, n = gathered.pop("index"), len(loader.dataset)  # drop the sampler's padding repeats
    out = {k: v.new_zeros(n, *v.shape[1:]).index_copy_(0, index, v) for k, v in gathered.items()}
    out["read"] = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, index, True)
    return out


def accuracies(pred: dict[str, torch.Tensor], classes: Sequence[str], clips_per_video: int) -> dict:
    """Clip- and video-level top-1/top-5 (percent) and video top-1 per class of predict()'s output."""
    read = pred["read"]
    if not read.any():
        raise RuntimeError("no test video could be read")
    labels, probs = pred["label"][read], pred["probs"][read]
    top = probs.topk(min(5, probs.shape[1]), dim=1).indices  # (N, 5)
    video_top1, video_top5 = top[:, 0] == labels, (top == labels[:, None]).any(1)
    pct = lambda hits, total: 100 * int(hits.sum()) / total  # exact integer counts, no float32 rounding
    clips = clips_per_video * len(labels)
    return {"clip_top1": pct(pred["clip_top1"][read], clips), "clip_top5": pct(pred["clip_top5"][read], clips),
            "video_top1": pct(video_top1, len(labels)), "video_top5": pct(video_top5, len(labels)),
            "per_class_top1": {classes[c]: pct(video_top1[labels == c], int((labels == c).sum()))
                               for c in labels.unique().tolist()},
            "num_videos": len(labels), "skipped_videos": int((~read).sum())}


def evaluate(model: nn.Module, source, classes: Sequence[str], args: argparse.Namespace, rank: int, world: int,
             device: torch.device) -> dict:
    """accuracies() of `model` on every video of `source`."""
    # Without gradients a clip costs ~1/3 of a training clip's memory: 2 x the training batch in clips fits.
    videos = max(1, 2 * args.batch_size // world // args.test_clips)
    loader = pretrain.make_loader(test_set(args, source), videos, args, train=False, rank=rank, world=world)
    return accuracies(predict(model, loader, args, device), classes, args.test_clips)


def relative_improvement(normal: dict[str, float], static: dict[str, float]) -> dict[str, float]:
    """(acc_normal - acc_static) / acc_static per class in both (Fig. 1's dots); acc_static 0: +inf, 0 if both are."""
    return {name: (normal[name] - static[name]) / static[name] if static[name] > 0
            else float("inf") if normal[name] > 0 else 0.0 for name in sorted(normal.keys() & static.keys())}


def compare(normal_out: str, static_out: str, threshold: float = 0.05) -> dict[str, float]:
    """Print each class's relative improvement of OUT_NORMAL over OUT_STATIC, and the share under 5% (paper: ~24%)."""
    per_class = [json.loads(pathlib.Path(out, "results.json").read_text())["per_class_top1"]
                 for out in (normal_out, static_out)]
    gains = relative_improvement(*per_class)
    if not gains:
        raise SystemExit(f"{normal_out} and {static_out} share no class")
    print(f"{'class':24s} {'normal':>7s} {'static':>7s} {'relative':>9s}")
    for name, gain in sorted(gains.items(), key=lambda kv: kv[1]):
        print(f"{name:24s} {per_class[0][name]:7.1f} {per_class[1][name]:7.1f} {gain:+9.1%}")
    below = sum(gain < threshold for gain in gains.values())
    print(f"{below} of {len(gains)} classes ({below / len(gains):.0%}) gain less than {threshold:.0%} from motion")
    return gains


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     conflict_handler="resolve")  # --split gains "all" below
    data.add_data_args(parser)
    parser.add_argument("--split", choices=("1", "2", "3", "all"), default="1",
                        help="UCF101/HMDB51 split, or all: the three into OUT/split1..3, their mean in OUT (default: 1)")
    method = parser.add_argument_group("protocol (paper: Fine-tuning and Evaluation Settings)")
    method.add_argument("--pretrained", default="runs/pretrain/checkpoint.pth",
                        help="checkpoint whose query backbone starts the model, or none (default: %(default)s)")
    method.add_argument("--arch", choices=models.ARCHS, default=None, help="backbone (default: mini on synthetic, else i3d)")
    method.add_argument("--protocol", choices=("full", "linear"), default="full", help="full: all train; linear: the fc")
    method.add_argument("--label-fraction", type=float, default=1.0, help="class-balanced share of train (Fig. 4)")
    method.add_argument("--static", action="store_true", help="train on one random frame repeated (Fig. 1) (default: off)")
    method.add_argument("--test-clips", type=int, default=10, help="uniformly spaced clips per test video (default: 10)")
    method.add_argument("--eval-train", action="store_true", help="also test on the train split: train_* (default: off)")
    method.add_argument("--compare", nargs=2, metavar=("OUT_NORMAL", "OUT_STATIC"), help="only print Fig. 1's per-class gains")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=None, help="default: 24 on synthetic, else 45")
    optim.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch (default: 16 on synthetic, else 128)")
    optim.add_argument("--lr", type=float, default=None, help="SGD learning rate of the fc (default: 0.1)")
    optim.add_argument("--backbone-lr", type=float, default=None,
                       help="the backbone's lr as a multiple of --lr, full protocol (default: 0.1 on synthetic, else 1)")
    optim.add_argument("--lr-every", type=int, default=None, help="lr x0.1 every N epochs (default: 8 on synthetic, else 10)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    optim.add_argument("--wd", type=float, default=None, help="weight decay (default: 5e-4 full, 0 linear)")
    optim.add_argument("--dropout", type=float, default=None, help="dropout before the fc (default: 0.5 full, 0 linear)")
    pretrain.add_run_args(parser, "runs/finetune", training=True)
    args = pretrain.resolve_defaults(parser.parse_args(argv), SYNTHETIC_DEFAULTS, PAPER_DEFAULTS)
    vars(args).update({k: v for k, v in PROTOCOL_DEFAULTS[args.protocol].items() if getattr(args, k) is None})
    data.resolve_data_args(args)
    if args.split == "all" and args.dataset == "synthetic":
        parser.error("--split all: the synthetic dataset has one split; use --split 1")
    if not 0 < args.label_fraction <= 1 or args.test_clips < 1 or args.lr_every < 1:
        parser.error("need 0 < --label-fraction <= 1, --test-clips >= 1 and --lr-every >= 1")
    if not args.compare and args.pretrained != "none" and not os.path.isfile(args.pretrained):
        parser.error(f"--pretrained {args.pretrained}: no such file; run `python pretrain.py` first, "
                     "or pass --pretrained none for a randomly initialised backbone")
    return args


def write_json(path: str, record: dict) -> None:
    pathlib.Path(path + ".tmp").write_text(json.dumps(record, indent=2))
    os.replace(path + ".tmp", path)  # atomic: a killed run leaves the old results whole


def run_split(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    """Train on args.split's train list into args.out, then test; returns the results."""
    torch.manual_seed(args.seed)
    train_source, test_source = data.build_source(args, train=True), data.build_source(args, train=False)
    loader = pretrain.make_loader(training_set(args, train_source), args.batch_size // world, args, train=True,
                                  rank=rank, world=world)
    if len(loader) == 0:
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {len(loader.dataset)} training videos ({world} ranks)")
    if args.dataset == "synthetic":  # the class names, position = label
        classes = list(data.CLASSES)
    elif args.dataset == "list":
        labels = [s.label(i) for s in (train_source, test_source) for i in range(len(s))]
        classes = [str(k) for k in range(1 + max(labels))]
    else:
        classes = data.build_records(args.dataset, args.root, args.split_dir, args.split, train=False)[1]
    model = pretrain.place(build_model(args, len(classes)), args, device)
    optimizer = make_optimizer(model, args)
    scaler = torch.amp.GradScaler(device.type, enabled=pretrain.amp_dtype_for(args, device) == torch.float16)
    os.makedirs(args.out, exist_ok=True)
    start = pretrain.resume(args.out, model, optimizer, scaler, args.arch) if args.resume else 0
    ddp = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    for epoch in range(start, args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, epoch) * group["lr_mult"]
        pretrain.set_epoch(loader, epoch)
        stats = train_one_epoch(ddp, loader, optimizer, scaler, args, epoch, device)
        if is_main():
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[-1]["lr"], **stats}  # the fc's
            print(json.dumps(record))
            pretrain.log_epoch(args.out, record)
        pretrain.save_resumable(args.out, model, optimizer, scaler, args, epoch + 1)
    results = evaluate(model, test_source, classes, args, rank, world, device)
    if args.eval_train:
        results |= {f"train_{k}": v for k, v in evaluate(model, train_source, classes, args, rank, world, device).items()}
    results.update(num_train_videos=len(loader.dataset), args=vars(args))
    if is_main():
        write_json(os.path.join(args.out, "results.json"), results)
        print(f"split {args.split}: video top-1 {results['video_top1']:.1f}% | clip top-1 {results['clip_top1']:.1f}% "
              f"| {results['num_videos']} test videos -> {args.out}/results.json")
    return results


def main(argv: list[str] | None = None) -> dict[str, float] | None:
    """Train and test (every split with --split all); with --compare, return Fig. 1's gains instead."""
    args = parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    rank, world, device = pretrain.setup_distributed(args.workers)
    assert args.batch_size % world == 0, f"--batch-size {args.batch_size} must divide over {world} ranks"
    pretrain.print_config("finetune", args, world, args.batch_size // world if args.protocol == "full" else None,
                          start=args.pretrained, protocol=f"{args.protocol}, split {args.split}",
                          schedule=f"{args.epochs} epochs, lr {args.lr} x0.1 every {args.lr_every}"
                          + (f", backbone at {args.backbone_lr}x" if args.protocol == "full" else ""))
    if args.split != "all":
        run_split(argparse.Namespace(**vars(args) | {"split": int(args.split)}), rank, world, device)
    else:  # Table 1: the mean over the three splits
        splits = [run_split(argparse.Namespace(**vars(args) | {"split": k, "out": os.path.join(args.out, f"split{k}")}),
                            rank, world, device) for k in (1, 2, 3)]
        keys = ("clip_top1", "clip_top5", "video_top1", "video_top5")
        summary = {**{k: float(np.mean([s[k] for s in splits])) for k in keys},
                   "per_split": {str(i + 1): {k: s[k] for k in keys} for i, s in enumerate(splits)}, "args": vars(args)}
        if is_main():
            write_json(os.path.join(args.out, "results.json"), summary)
            print(f"mean of splits 1-3: video top-1 {summary['video_top1']:.1f}% -> {args.out}/results.json")
    pretrain.teardown_distributed()


if __name__ == "__main__":
    main()
