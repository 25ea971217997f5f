"""Action recognition downstream of DSM: fine-tuning and the linear probe.

Implements the paper's "Fine-tuning Settings" (45 epochs, lr 0.1, x0.1 every 10 epochs),
"Evaluation Settings" (a video's prediction is the mean of its 10 uniformly spaced clips'
softmaxes), "Test with Limited Labeled Data" (Fig. 4: class-balanced 1% / 10% subsets) and
the static-clip diagnostic of Fig. 1 (a model trained on one frame repeated: how much does
motion add, per class?). Table 1 averages over the three splits: `--split all`.

    --protocol full     every weight trains, starting from the pretrained backbone (Table 1)
    --protocol linear   the backbone is frozen, BatchNorm included; only the classifier trains

Run:
    python pretrain.py && python finetune.py      # synthetic videos, `mini`, CPU: a few minutes after pretraining
    python finetune.py --pretrained none --out runs/finetune_scratch          # supervised from scratch
    python finetune.py --static --out runs/finetune_static                    # Fig. 1's scene-only model
    python finetune.py --compare runs/finetune runs/finetune_static           # Fig. 1: motion's gain per class
    torchrun --nproc_per_node=8 finetune.py --dataset hmdb51 --root HMDB51 --split-dir HMDB51/splits \\
        --arch i3d --pretrained runs/k400_i3d/checkpoint.pth --split all --amp --out runs/hmdb_i3d

OUT/results.json holds clip_top1, clip_top5, video_top1, video_top5 (percent), per_class_top1
(video top-1 by class name) and the arguments; OUT/log.jsonl one line per epoch.
"""
import argparse
import json
import math
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import augment
import data
import models
import pretrain
from pretrain import concat_all_gather, is_main

# The CPU demo on the built-in synthetic videos: the paper's 45 epochs at 128 clips a batch do not
# fit in minutes on 2 cores; 12 epochs of the 800 videos do, the lr dropping every 4 (as 10 of 45).
SYNTHETIC_DEFAULTS = dict(arch="mini", epochs=12, batch_size=16, lr=0.05, lr_every=4)
PAPER_DEFAULTS = dict(arch="i3d", epochs=45, batch_size=128, lr=0.1, lr_every=10)
# The linear probe follows MoCo's: no weight decay, no dropout, on features that do not move.
PROTOCOL_DEFAULTS = {"full": dict(wd=5e-4, dropout=0.5), "linear": dict(wd=0.0, dropout=0.0)}


# ---- which training videos: class-balanced label fractions (Fig. 4) ------------------------

def balanced_subset(labels: Sequence[int], fraction: float, seed: int) -> list[int]:
    """Indices of a class-balanced `fraction` of the videos, as SimCLR's 1% / 10% ImageNet subsets.

    Every class keeps the same number, round(fraction * N / C) (the paper: ~6 and ~57 on Kinetics),
    at least 1, at most all it has; which ones is drawn from `seed`. Returned sorted.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    per_class = max(1, round(fraction * len(labels) / len(classes)))
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return sorted(int(i) for i in np.concatenate(kept))


class EpochSubset(torch.utils.data.Subset):
    """A Subset of a ClipDataset that passes set_epoch on, so its clips change every epoch."""

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def training_set(args: argparse.Namespace, source) -> torch.utils.data.Dataset:
    """Train-split clips with the basic augmentation; --static: one frame repeated (Fig. 1)."""
    transform = augment.ClipTransform(args.size, train=True, flip=args.flip == "on", crop_scale=args.crop_scale)
    dataset = data.ClipDataset(source, args.clip_len, args.stride, transform, mode="train", static=args.static,
                               seed=args.seed)
    if args.label_fraction == 1:
        return dataset
    kept = balanced_subset([source.label(i) for i in range(len(source))], args.label_fraction, args.seed)
    if is_main():
        print(f"--label-fraction {args.label_fraction}: {len(kept)} of {len(source)} training videos")
    return EpochSubset(dataset, kept)


def test_set(args: argparse.Namespace, source) -> data.ClipDataset:
    """--test-clips centre-cropped clips per video, spaced uniformly (Evaluation Settings)."""
    return data.ClipDataset(source, args.clip_len, args.stride, augment.ClipTransform(args.size, train=False),
                            mode="test", test_clips=args.test_clips, seed=args.seed)


def class_names(args: argparse.Namespace, sources: Sequence) -> list[str]:
    """Names of the classes, position = label: the synthetic motions or the split files' classes."""
    if args.dataset == "synthetic":
        return list(data.CLASSES)
    num_classes = 1 + max(src.label(i) for src in sources for i in range(len(src)))
    if args.dataset == "list":
        return [str(k) for k in range(num_classes)]
    names = data.build_records(args.dataset, args.root, args.split_dir, args.split, train=False)[1]
    assert num_classes <= len(names), (num_classes, len(names))
    return names


# ---- the model: Classifier and its frozen-backbone variant -------------------------------

class LinearProbe(models.Classifier):
    """A Classifier whose backbone is frozen: no gradients, and BatchNorm keeps the pretrained
    running statistics because the backbone stays in eval mode whatever model.train() says."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.0):
        super().__init__(backbone, num_classes, dropout)
        for param in self.backbone.parameters():
            param.requires_grad = False

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()
        return self


def build_model(args: argparse.Namespace, num_classes: int) -> models.Classifier:
    """The pretrained query backbone f (or a random one) under a new fc for the classes."""
    if args.pretrained == "none":
        backbone = models.build_backbone(args.arch)
    else:
        backbone = models.load_backbone(args.pretrained, args.arch)
    head = LinearProbe if args.protocol == "linear" else models.Classifier
    return head(backbone, num_classes, args.dropout)


# ---- training ----------------------------------------------------------------------------

def learning_rate(args: argparse.Namespace, epoch: int) -> float:
    return args.lr * 0.1 ** (epoch // args.lr_every)  # paper: x0.1 every 10 epochs


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
                    scaler: torch.amp.GradScaler, args: argparse.Namespace, epoch: int,
                    device: torch.device) -> dict[str, float]:
    """One pass over this rank's shard: mean loss, clip top-1 on the augmented clips, speed, skips."""
    model.train()
    amp_dtype = pretrain.amp_dtype_for(args, device)
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    seen, skipped = 0, 0
    bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{args.epochs}", disable=not is_main(), leave=False)
    t_start = time.perf_counter()
    for step, batch in enumerate(loader, 1):
        clips = pretrain.as_input(batch["views"].to(device, non_blocking=True), args)  # (B, C, T, H, W)
        labels = batch["label"].to(device, non_blocking=True)
        loss, logits = train_step(model, clips, labels, optimizer, scaler, amp_dtype)
        loss_sum += loss
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        skipped += int((batch["skipped"] > 0).sum())  # sample i skips exactly when video i is bad
        if step % args.print_freq == 0 or step == len(loader):
            mean_loss = float(loss_sum) / step  # the only device syncs, every print_freq steps
            pretrain.check_finite({"loss": mean_loss}, epoch, step)
            bar.set_postfix(loss=f"{mean_loss:.4f}", acc=f"{100 * float(correct) / seen:.1f}",
                            lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        bar.update()
    bar.close()
    elapsed = time.perf_counter() - t_start
    totals = torch.stack([loss_sum, correct.float(), *loss_sum.new_tensor([seen, skipped])])
    loss_sum, correct, seen, skipped = concat_all_gather(totals[None]).sum(0).tolist()  # over the ranks
    return {"loss": loss_sum / (len(loader) * pretrain.world_size()), "train_clip_top1": 100 * correct / seen,
            "clips_per_s": seen / elapsed, "skipped_videos": int(skipped)}


# ---- evaluation: 10 clips per video (Evaluation Settings) --------------------------------

@torch.no_grad()
def predict(model: nn.Module, loader: torch.utils.data.DataLoader, args: argparse.Namespace,
            device: torch.device) -> dict[str, torch.Tensor]:
    """Per video of the split, on every rank: "probs" (N, classes) the mean of its test clips'
    softmaxes, "clip_top1"/"clip_top5" how many of its clips are right, "label", and "read",
    False for a bad video that was skipped (its row is otherwise zeros)."""
    model.eval()
    amp_dtype = pretrain.amp_dtype_for(args, device)
    rows = {"probs": [], "clip_top1": [], "clip_top5": [], "label": [], "index": []}
    for batch in tqdm(loader, desc="test", disable=not is_main(), leave=False):
        views = batch["views"].to(device, non_blocking=True)  # (B, num_clips, C, T, H, W)
        labels = batch["label"].to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(pretrain.as_input(views.flatten(0, 1), args))  # (B * num_clips, classes)
        probs = logits.float().softmax(1).view(*views.shape[:2], -1)  # (B, num_clips, classes)
        hits = probs.topk(min(5, probs.shape[2]), dim=2).indices == labels[:, None, None]  # (B, num_clips, 5)
        rows["clip_top1"].append(hits[..., 0].sum(1))
        rows["clip_top5"].append(hits.any(2).sum(1))
        rows["probs"].append(probs.mean(1))  # the video's prediction: the mean of its clips' results
        rows["label"].append(labels)
        rows["index"].append(batch["index"].to(device))
    gathered = {k: concat_all_gather(torch.cat(v)) for k, v in rows.items()}
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
    return {
        "clip_top1": pct(pred["clip_top1"][read], clips_per_video * len(labels)),
        "clip_top5": pct(pred["clip_top5"][read], clips_per_video * len(labels)),
        "video_top1": pct(video_top1, len(labels)), "video_top5": pct(video_top5, len(labels)),
        "per_class_top1": {classes[c]: pct(video_top1[labels == c], int((labels == c).sum()))
                           for c in labels.unique().tolist()},
        "num_videos": len(labels), "skipped_videos": int((~read).sum()),
    }


def evaluate(model: nn.Module, source, classes: Sequence[str], args: argparse.Namespace, rank: int, world: int,
             device: torch.device) -> dict:
    """accuracies() of `model` on every video of `source`."""
    # Without gradients a clip costs about a third of a training clip's memory: 2 x the
    # training batch in clips, i.e. a fifth of it in 10-clip videos, fits where training did.
    videos = max(1, 2 * args.batch_size // world // args.test_clips)
    loader = pretrain.make_loader(test_set(args, source), videos, args, train=False, rank=rank, world=world)
    return accuracies(predict(model, loader, args, device), classes, args.test_clips)


# ---- Fig. 1: what motion adds over a static frame, per class ------------------------------

def relative_improvement(normal: dict[str, float], static: dict[str, float]) -> dict[str, float]:
    """(acc_normal - acc_static) / acc_static per class present in both (Fig. 1's dots).

    acc_static = 0 has no ratio: +inf when the normal model gets any video of the class right
    (motion made all the difference), 0 when neither does (no improvement).
    """
    gains = {}
    for name in sorted(normal.keys() & static.keys()):
        if static[name] > 0:
            gains[name] = (normal[name] - static[name]) / static[name]
        else:
            gains[name] = math.inf if normal[name] > 0 else 0.0
    return gains


def compare(normal_out: str, static_out: str, threshold: float = 0.05) -> dict[str, float]:
    """Print the per-class relative improvement of OUT_NORMAL's model over OUT_STATIC's and the
    share of classes that gain less than 5% (the paper: nearly 24% on HMDB51)."""
    per_class = []
    for out in (normal_out, static_out):
        with open(os.path.join(out, "results.json")) as f:
            per_class.append(json.load(f)["per_class_top1"])
    gains = relative_improvement(*per_class)
    if not gains:
        raise SystemExit(f"{normal_out} and {static_out} share no class")
    print(f"{'class':24s} {'normal':>7s} {'static':>7s} {'relative':>9s}")
    for name, gain in sorted(gains.items(), key=lambda kv: kv[1]):
        print(f"{name:24s} {per_class[0][name]:7.1f} {per_class[1][name]:7.1f} {gain:+9.1%}")
    below = sum(gain < threshold for gain in gains.values())
    print(f"{below} of {len(gains)} classes ({below / len(gains):.0%}) gain less than {threshold:.0%} from motion")
    return gains


# ---- command line and main ---------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     conflict_handler="resolve")  # --split gains "all" below
    data.add_data_args(parser)
    parser.add_argument("--split", choices=("1", "2", "3", "all"), default="1",
                        help="UCF101/HMDB51 split; all = the three, into OUT/split1..3, and their mean in "
                             "OUT/results.json (Table 1); synthetic has split 1 only (default: 1)")
    method = parser.add_argument_group("protocol (paper: Fine-tuning and Evaluation Settings)")
    method.add_argument("--pretrained", default="runs/pretrain/checkpoint.pth",
                        help="pretraining checkpoint whose query backbone starts the model, or none for a random "
                             "init (default: runs/pretrain/checkpoint.pth, where `python pretrain.py` writes)")
    method.add_argument("--arch", choices=models.ARCHS, default=None, help="backbone (default: mini on synthetic, else i3d)")
    method.add_argument("--protocol", choices=("full", "linear"), default="full",
                        help="full = fine-tune every weight; linear = frozen backbone (BN too), train the fc (default: full)")
    method.add_argument("--label-fraction", type=float, default=1.0,
                        help="train on a class-balanced, seeded subset of this fraction of the train split: Fig. 4 "
                             "uses 0.01 and 0.1 (default: 1.0)")
    method.add_argument("--static", action="store_true",
                        help="train on static clips, one random frame repeated (Fig. 1); test clips stay normal (default: off)")
    method.add_argument("--test-clips", type=int, default=10, help="uniformly spaced clips per test video (default: 10)")
    method.add_argument("--eval-train", action="store_true",
                        help="also test on the whole train split, as train_* in results.json (default: off)")
    method.add_argument("--compare", nargs=2, metavar=("OUT_NORMAL", "OUT_STATIC"), default=None,
                        help="only print Fig. 1's per-class relative improvement of one run over a --static run, "
                             "from their results.json (default: off)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=None, help="default: 12 on synthetic, else 45")
    optim.add_argument("--batch-size", type=int, default=None, help="GLOBAL batch (default: 16 on synthetic, else 128)")
    optim.add_argument("--lr", type=float, default=None, help="SGD learning rate (default: 0.05 on synthetic, else 0.1)")
    optim.add_argument("--lr-every", type=int, default=None,
                       help="multiply lr by 0.1 every N epochs (default: 4 on synthetic, else 10)")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    optim.add_argument("--wd", type=float, default=None, help="weight decay (default: 5e-4 full, 0 linear)")
    optim.add_argument("--dropout", type=float, default=None, help="dropout before the fc (default: 0.5 full, 0 linear)")
    pretrain.add_run_args(parser, "runs/finetune", training=True)
    args = pretrain.resolve_defaults(parser.parse_args(argv), SYNTHETIC_DEFAULTS, PAPER_DEFAULTS)
    for key, value in PROTOCOL_DEFAULTS[args.protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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
    with open(path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(path + ".tmp", path)


def run_split(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> dict:
    """Train on args.split's train list into args.out, then test; returns the results."""
    torch.manual_seed(args.seed)
    train_source, test_source = data.build_source(args, train=True), data.build_source(args, train=False)
    loader = pretrain.make_loader(training_set(args, train_source), args.batch_size // world, args, train=True,
                                  rank=rank, world=world)
    if len(loader) == 0:
        raise SystemExit(f"--batch-size {args.batch_size} is larger than the {len(loader.dataset)} training videos "
                         f"({world} ranks): pass a smaller --batch-size")
    classes = class_names(args, [train_source, test_source])
    model = pretrain.place(build_model(args, len(classes)), args, device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                momentum=args.momentum, weight_decay=args.wd)
    scaler = torch.amp.GradScaler(device.type, enabled=pretrain.amp_dtype_for(args, device) == torch.float16)
    if is_main():
        os.makedirs(args.out, exist_ok=True)
    start = pretrain.resume(args.out, model, optimizer, scaler, args.arch) if args.resume else 0
    ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world > 1 else model
    for epoch in range(start, args.epochs):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, epoch)
        pretrain.set_epoch(loader, epoch)
        stats = train_one_epoch(ddp_model, loader, optimizer, scaler, args, epoch, device)
        if is_main():
            record = {"epoch": epoch + 1, "lr": optimizer.param_groups[0]["lr"], **stats}
            print(json.dumps(record))
            pretrain.log_epoch(args.out, record)
        pretrain.save_resumable(args.out, model, optimizer, scaler, args, epoch + 1)
    results = evaluate(model, test_source, classes, args, rank, world, device)
    if args.eval_train:
        train = evaluate(model, train_source, classes, args, rank, world, device)
        results.update({f"train_{k}": v for k, v in train.items()})
    results.update(num_train_videos=len(loader.dataset), args=vars(args))
    if is_main():
        write_json(os.path.join(args.out, "results.json"), results)
        print(f"split {args.split}: video top-1 {results['video_top1']:.1f}% | clip top-1 {results['clip_top1']:.1f}% "
              f"| {results['num_videos']} test videos -> {args.out}/results.json")
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compare:
        compare(*args.compare)
        return
    rank, world, device = pretrain.setup_distributed(args.workers)
    assert args.batch_size % world == 0, f"--batch-size {args.batch_size} must divide over {world} ranks"
    pretrain.print_config("finetune", args, world, args.batch_size // world if args.protocol == "full" else None,
                          start=args.pretrained, protocol=f"{args.protocol}, split {args.split}",
                          schedule=f"{args.epochs} epochs, lr {args.lr} x0.1 every {args.lr_every}")
    if args.split != "all":
        run_split(argparse.Namespace(**{**vars(args), "split": int(args.split)}), rank, world, device)
    else:  # Table 1: the mean over the three splits
        splits = [run_split(argparse.Namespace(**{**vars(args), "split": k, "out": os.path.join(args.out, f"split{k}")}),
                            rank, world, device) for k in (1, 2, 3)]
        keys = ("clip_top1", "clip_top5", "video_top1", "video_top5")
        summary = {**{k: float(np.mean([s[k] for s in splits])) for k in keys},
                   "per_split": {str(i + 1): {k: s[k] for k in keys} for i, s in enumerate(splits)}, "args": vars(args)}
        if is_main():
            write_json(os.path.join(args.out, "results.json"), summary)
            print(f"mean of splits 1-3: video top-1 {summary['video_top1']:.1f}% -> {args.out}/results.json")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
