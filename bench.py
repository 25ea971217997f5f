"""Speed and memory of the hot paths, as ratios against their references (DESIGN section 7).

Every number is measured side by side in one run on this machine, so the ratios hold on
a noisy shared machine where absolute times do not.

    python bench.py augment     # TPS warp, flow-scaled negative, one triplet from a file
    python bench.py model       # forward+backward per clip and GFLOP/s for every arch
"""
import argparse
import time
from collections.abc import Callable


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


# ---- augment ---------------------------------------------------------------
# (bench_augment goes here)

# ---- model -----------------------------------------------------------------
# (bench_model goes here)


BENCHES: dict[str, Callable[[argparse.Namespace], None]] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("which", choices=sorted(BENCHES), help="which hot path to measure")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions, median reported (default: 5)")
    args = parser.parse_args()
    BENCHES[args.which](args)


if __name__ == "__main__":
    main()
