"""Video retrieval downstream of DSM: nearest neighbours of frozen features (paper: "Video Retrieval", Tables 2-3).

The frozen backbone's last feature map is adaptive-max-pooled to C x 2 x 7 x 7 (--pool avg: the authors' code); gallery
= train split, queries = test split, cosine similarity. The paper's text ranks clips, but the numbers it compares with
(Clip Order, VCP) rank VIDEOS, the mean of 10 uniformly spaced clips' features: our default (--clip-level: clips).

    python pretrain.py && python retrieve.py                         # synthetic, `mini`, CPU
    python retrieve.py --dataset ucf101 --root UCF101/videos --split-dir UCF101/ucfTrainTestlist --arch i3d \\
        --size 224 --pretrained runs/k400_i3d/checkpoint.pth --save-features --out runs/retrieval_ucf
"""
import argparse
import hashlib
import json
import os

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

KS = (1, 5, 10, 20, 50)
SYNTHETIC_DEFAULTS, PAPER_DEFAULTS = dict(arch="mini", batch_size=16), dict(arch="i3d", batch_size=32)


def recall_at_k(query: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor, gallery_labels: torch.Tensor,
                ks: tuple[int, ...] = KS, chunk: int = 1024, gallery_block: int | None = None) -> dict[str, float]:
    """Recall@K (%) of queries (N, D) in a gallery (M, D) by cosine similarity, `chunk` queries x `gallery_block` rows
    (default: all if float32, else 512 MiB) at a time with a running top max(ks): never N x M at once."""
    assert query.dim() == gallery.dim() == 2 and query.shape[1] == gallery.shape[1], (query.shape, gallery.shape)
    assert len(query) == len(query_labels) and len(gallery) == len(gallery_labels) and len(gallery) > 0
    k_max = min(max(ks), len(gallery))
    rows = gallery_block or (len(gallery) if gallery.dtype == torch.float32 else max(1, 2 ** 29 // (4 * gallery.shape[1])))
    g_norm = torch.cat([torch.linalg.vector_norm(gallery[j:j + rows], dim=1, dtype=torch.float32)
                        for j in range(0, len(gallery), rows)]).clamp_min(1e-12)  # (M,), no float32 copy of it all
    # Rank of the first same-class item; none: max(ks), a miss at every K even where k_max is cut to the gallery.
    first_hit = torch.empty(len(query), dtype=torch.long)
    for i in range(0, len(query), chunk):
        q, best_sim, best_idx = query[i:i + chunk].float(), None, None  # q: (n, D)
        for j in range(0, len(gallery), rows):
            sim = (q @ gallery[j:j + rows].float().T).div_(g_norm[j:j + rows])  # (n, rows) cosine x |q|: same ranks
            sim, idx = sim.topk(min(k_max, sim.shape[1]), dim=1)
            idx += j
            if best_sim is not None:  # merge with the best of the blocks before
                sim, top = torch.cat([best_sim, sim], 1).topk(min(k_max, best_sim.shape[1] + sim.shape[1]), dim=1)
                idx = torch.cat([best_idx, idx], 1).gather(1, top)
            best_sim, best_idx = sim, idx
        hits = gallery_labels[best_idx] == query_labels[i:i + chunk, None]  # (n, k_max), most similar first
        first_hit[i:i + chunk] = torch.where(hits.any(1), hits.int().argmax(1), max(ks))
    return {f"recall@{k}": 100 * int((first_hit < k).sum()) / len(query) for k in ks}


@torch.no_grad()
def extract(backbone: nn.Module, loader: torch.utils.data.DataLoader, args: argparse.Namespace,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """On rank 0 (others: empty), L2-normalised items (videos: their clips' mean pooled feature), labels, skips."""
    backbone.eval()
    amp_dtype = pretrain.amp_dtype_for(args, device)
    n, per_video = len(loader.dataset), args.clips_per_video if args.clip_level else 1
    out, labels, read = torch.empty(0), torch.zeros(n, dtype=torch.long), torch.zeros(n, dtype=torch.bool)
    for batch in tqdm(loader, desc="features", disable=not is_main(), leave=False):
        views = batch["views"].to(device, non_blocking=True)  # (B, num_clips, C, T, H, W)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            feature_map = backbone(pretrain.as_input(views.flatten(0, 1), args))  # (B * num_clips, C, T', H', W')
        f = models.retrieval_features(feature_map.float(), tuple(args.pool_size), args.pool).view(*views.shape[:2], -1)
        f = F.normalize(f if args.clip_level else f.mean(1, keepdim=True), dim=2)  # (B, num_clips or 1, D)
        # The sampler pads the shards with repeated videos: a repeat rewrites its row with the same value.
        index = concat_all_gather(batch["index"].to(device)).cpu()
        f = concat_all_gather(f.to(getattr(torch, args.feature_dtype))).cpu()
        if is_main():
            out = out if len(out) else torch.empty(n, per_video, f.shape[2], dtype=f.dtype)
            out[index] = f
        labels[index], read[index] = concat_all_gather(batch["label"].to(device)).cpu(), True
    if not is_main():
        return out, labels[:0], 0
    out, labels = out.flatten(0, 1), labels.repeat_interleave(per_video)
    if read.all():
        return out, labels, 0
    keep = read.repeat_interleave(per_video)  # a bad video's row was never written: leave it out
    return out[keep], labels[keep], int((~read).sum())


def split_features(backbone: nn.Module, args: argparse.Namespace, train: bool, rank: int, world: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """extract() of the train or test split, or its cache (the last value: True); empty on ranks but 0, as extract.
    Rank 0 alone checks for the cache and tells the others: with a node-local --out they could disagree and hang."""
    # The cache file's name hashes everything the features depend on; a random init is a function of the seed.
    weights = {"pretrained": "none", "seed": args.seed}
    if args.pretrained != "none":
        stat = os.stat(args.pretrained)
        weights = {"pretrained": os.path.abspath(args.pretrained), "bytes": stat.st_size, "mtime": stat.st_mtime_ns}
    flags = ("dataset", "root", "split_dir", "split", "num_train", "num_test", "scene_bias", "data_seed", "arch",
             "size", "clip_len", "stride", "clips_per_video", "clip_level", "pool", "pool_size", "feature_dtype")
    key = json.dumps({**weights, **{k: getattr(args, k) for k in flags}, "train": train}, sort_keys=True)
    path = os.path.join(args.cache_dir, f"{'train' if train else 'test'}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz")
    hit = [os.path.exists(path) if is_main() else None]
    if world > 1:
        dist.broadcast_object_list(hit, src=0)
    if hit[0]:
        if not is_main():
            return torch.empty(0), torch.empty(0, dtype=torch.long), 0, True
        with np.load(path) as cached:
            return torch.from_numpy(cached["features"]), torch.from_numpy(cached["labels"]), int(cached["skipped"]), True
    source = data.build_source(args, train=train)
    dataset = data.ClipDataset(source, args.clip_len, args.stride, augment.ClipTransform(args.size, train=False),
                               mode="test", test_clips=args.clips_per_video, seed=args.seed)
    loader = pretrain.make_loader(dataset, max(1, args.batch_size // world), args, train=False, rank=rank, world=world)
    feats, labels, skipped = extract(backbone, loader, args, device)
    if is_main():
        os.makedirs(args.cache_dir, exist_ok=True)
        with open(path + ".tmp", "wb") as f:  # atomic: a killed run leaves no half-written cache
            np.savez(f, features=feats.numpy(), labels=labels.numpy(), skipped=skipped)
        os.replace(path + ".tmp", path)
    if world > 1:  # the others wait here, not inside the next split's all_gather, while rank 0 writes
        dist.barrier()
    return feats, labels, skipped, False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_data_args(parser)
    method = parser.add_argument_group("protocol (paper: Video Retrieval)")
    method.add_argument("--pretrained", default="runs/pretrain/checkpoint.pth",
                        help="checkpoint whose (query) backbone is frozen, or none (default: %(default)s)")
    method.add_argument("--arch", choices=models.ARCHS, default=None, help="backbone (default: mini on synthetic, else i3d)")
    method.add_argument("--pool", choices=("max", "avg"), default="max", help="the paper's max, or avg (default: max)")
    method.add_argument("--pool-size", type=int, nargs=3, default=[2, 7, 7], metavar=("T", "H", "W"),
                        help="pooled grid, flattened with the channels (default: 2 7 7)")
    method.add_argument("--clips-per-video", type=int, default=10, help="uniformly spaced clips per video (default: 10)")
    method.add_argument("--clip-level", action="store_true", help="rank clips, not videos (default: off)")
    method.add_argument("--ks", type=int, nargs="+", default=list(KS), help="the K of Recall@K (default: 1 5 10 20 50)")
    run = pretrain.add_run_args(parser, "runs/retrieve", training=False)
    run.add_argument("--batch-size", type=int, default=None, help="GLOBAL videos per step (default: 16 on synthetic, else 32)")
    run.add_argument("--feature-dtype", choices=("float32", "float16"), default="float32",
                     help="storage of the features in memory and cache; similarities are float32 (default: float32)")
    run.add_argument("--cache-dir", default=None, help="feature cache (default: OUT/cache)")
    run.add_argument("--save-features", action="store_true", help="write the ranked OUT/features.npz (default: off)")
    args = pretrain.resolve_defaults(parser.parse_args(argv), SYNTHETIC_DEFAULTS, PAPER_DEFAULTS)
    data.resolve_data_args(args)
    args.cache_dir = args.cache_dir or os.path.join(args.out, "cache")
    if args.clips_per_video < 1 or min(args.pool_size) < 1 or min(args.ks) < 1:
        parser.error("need --clips-per-video >= 1, --pool-size >= 1 and --ks >= 1")
    if args.pretrained != "none" and not os.path.isfile(args.pretrained):
        parser.error(f"--pretrained {args.pretrained}: no such file; run `python pretrain.py` first, "
                     "or pass --pretrained none for a randomly initialised backbone")
    return args


def main(argv: list[str] | None = None) -> dict | None:
    """Features of both splits, Recall@K of the test videos among the train videos; rank 0 returns the results."""
    args = parse_args(argv)
    rank, world, device = pretrain.setup_distributed(args.workers)
    pretrain.print_config("retrieve", args, world, None, start=args.pretrained, level="clip" if args.clip_level else "video")
    torch.manual_seed(args.seed)  # --pretrained none: the random init is a function of the seed
    backbone = pretrain.place(models.build_backbone(args.arch) if args.pretrained == "none"
                              else models.load_backbone(args.pretrained, args.arch), args, device)
    gallery, gallery_labels, train_skipped, train_cached = split_features(backbone, args, True, rank, world, device)
    query, query_labels, test_skipped, test_cached = split_features(backbone, args, False, rank, world, device)
    pretrain.teardown_distributed()
    if rank != 0:  # rank 0 alone holds the gathered features
        return None
    results = recall_at_k(query, query_labels, gallery, gallery_labels, tuple(args.ks))
    results.update(level="clip" if args.clip_level else "video", num_queries=len(query), num_gallery=len(gallery),
                   feature_dim=gallery.shape[1], cached={"train": train_cached, "test": test_cached},
                   skipped_videos={"train": train_skipped, "test": test_skipped}, args=vars(args))
    os.makedirs(args.out, exist_ok=True)
    if args.save_features:
        np.savez(os.path.join(args.out, "features.npz"), train=gallery.numpy(), train_labels=gallery_labels.numpy(),
                 test=query.numpy(), test_labels=query_labels.numpy())
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(" | ".join(f"R@{k} {results[f'recall@{k}']:.1f}" for k in args.ks)
          + f"  ({len(query)} queries, {len(gallery)} gallery {results['level']}s, {gallery.shape[1]}-d) -> {args.out}")
    return results


if __name__ == "__main__":
    main()
