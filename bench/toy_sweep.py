"""Wall time of the full default T3 sweep: 3 settings, every default method, n = 2^5|2^6 .. 2^16, 10 seeds.

    .venv/bin/python bench/toy_sweep.py [--seeds 10] [--max-log2n 16]

Goal: under 60 s on 2 cores. Prints the time of each setting, of each method's batched fit, the slopes, and the
total (sampling, fits, reward model and KL included).
"""

from __future__ import annotations

import argparse
import time

import pandas as pd

from studylib.toy import consistency_sweep, fit_slopes, make_problem

FIRST_LOG2N = {"S1": 6, "S2": 6, "S3": 5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--max-log2n", type=int, default=16)
    args = parser.parse_args()
    pd.set_option("display.width", 160)
    total = time.perf_counter()
    for setting, first in FIRST_LOG2N.items():
        start = time.perf_counter()
        sizes = [2**k for k in range(first, args.max_log2n + 1)]
        df = consistency_sweep(make_problem(setting), sizes=sizes, seeds=range(args.seeds))
        elapsed = time.perf_counter() - start
        fits = df.groupby("method", sort=False)["seconds"].apply(lambda s: s.unique().sum())
        print(f"{setting}: {elapsed:.1f} s ({len(sizes)} sizes x {args.seeds} seeds)")
        print("  fit seconds per method:", ", ".join(f"{m} {t:.2f}" for m, t in fits.items()))
        print(fit_slopes(df).drop(columns=["setting"]).to_string(index=False, float_format="%.3g"))
    print(f"TOTAL wall time of the T3 sweep: {time.perf_counter() - total:.1f} s")


if __name__ == "__main__":
    main()
