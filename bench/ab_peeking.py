"""A/B peeking: how often an experiment checked after every 50 ratings and stopped at the first
significant look declares a difference that is not there, with the fixed-horizon test and with the
sequential (always-valid) test the verdict rests on; then how many ratings each needs for a real lift.

    .venv/bin/python bench/ab_peeking.py [--runs 10000] [--ratings 5000] [--every 50] [--rate 0.5]
                                         [--lift 0.05] [--alpha 0.05] [--tau TAU] [--seed 0]

Simulated experiments of thumbs up/down ratings arriving one by one, each sent to the control or the
candidate with probability 1/2, looked at after every ``--every`` ratings up to ``--ratings``.

(a) A/A, ``--runs`` experiments with no true difference (thumbs up at ``--rate`` on both sides): the
    share stopped at some look with p < ``--alpha`` (a false positive), for the fixed-horizon test
    and for the sequential one, and the fixed-horizon test's share at the final look alone (what it
    promises: about ``--alpha``). The fixed-horizon test here is the pooled two-proportion z-test,
    the normal approximation of the Fisher's exact test the report uses: scipy's Fisher takes about
    2 ms a table, 200,000 tables a run. Goal: the sequential test at most ``--alpha``.
(b) A/B, ``--runs`` experiments with a true lift (``--rate`` against ``--rate`` + ``--lift``): for
    each test, the share that found it (p < ``--alpha`` with the candidate ahead) by ``--ratings`` and
    the median number of ratings that took among those; the fixed-horizon test also read once at
    ``--ratings``, and the ratings it needs planned in advance for 80% power.

The sequential p is the report's own: ``sequential`` from ``adapterdeck.registry.experiments.sequential``
(the mSPRT over every prefix of the ratings, as ``compare`` computes it), on arrays of experiments;
``--tau`` other than the report's ``TAU`` shows what the mixing prior trades.
The exit code is 0 whatever the figures.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
from scipy import stats as sps

from adapterdeck.registry.experiments.sequential import MIN_SAMPLES, TAU, sequential

CHUNK = 200  # experiments simulated at once (memory: ~30 arrays of CHUNK x ratings floats)


def fixed_horizon_p(arm: np.ndarray, values: np.ndarray, every: int) -> tuple[np.ndarray, np.ndarray]:
    """The pooled two-proportion z-test at every look: (two-sided p, z), p 1 below MIN_SAMPLES a side."""
    n_b = np.cumsum(arm, axis=1)[:, every - 1 :: every].astype(float)
    n = np.arange(every, arm.shape[1] + 1, every, dtype=float)[None, :]
    n_a = n - n_b
    up_b = np.cumsum(values * arm, axis=1)[:, every - 1 :: every]
    up = np.cumsum(values, axis=1)[:, every - 1 :: every]
    pooled = up / n
    with np.errstate(divide="ignore", invalid="ignore"):
        se = np.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
        z = (up_b / n_b - (up - up_b) / n_a) / se
    p = 2 * sps.norm.sf(np.abs(z))
    ok = (n_a >= MIN_SAMPLES) & (n_b >= MIN_SAMPLES) & (se > 0)
    return np.where(ok, p, 1.0), np.where(ok, z, 0.0)


def simulate(args: argparse.Namespace, lift: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per experiment: the first look (1-based, 0 for none) each test finds a difference, and
    whether the fixed-horizon test finds it at the final look alone; with a lift, only a
    difference in its direction counts."""
    first_fixed, first_seq, final_fixed = [], [], []
    for start in range(0, args.runs, CHUNK):
        runs = min(CHUNK, args.runs - start)
        arm = rng.random((runs, args.ratings)) < 0.5
        values = (rng.random((runs, args.ratings)) < np.where(arm, args.rate + lift, args.rate)).astype(float)
        p_fixed, z = fixed_horizon_p(arm, values, args.every)
        run = sequential(arm, values, binary=True, tau=args.tau, alpha=args.alpha)
        looks = slice(args.every - 1, None, args.every)
        p_seq, low = run["p"][:, looks], run["low"][:, looks]
        hit_fixed = (p_fixed < args.alpha) & ((z > 0) if lift else True)
        hit_seq = (p_seq < args.alpha) & ((low > 0) if lift else True)
        for hits, out in ((hit_fixed, first_fixed), (hit_seq, first_seq)):
            out.append(np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0))
        final_fixed.append(hit_fixed[:, -1])
    return {
        "fixed": np.concatenate(first_fixed),
        "sequential": np.concatenate(first_seq),
        "final": np.concatenate(final_fixed),
    }


def line(label: str, value: str) -> None:
    print(f"  {label:<54} {value}")


def share(flags: np.ndarray) -> str:
    rate = float(np.mean(flags))
    half = 1.96 * math.sqrt(max(rate * (1 - rate), 1e-12) / len(flags))
    return f"{rate:5.1%} (+-{half:.1%})"


def ratings_needed(first: np.ndarray, every: int) -> str:
    found = first[first > 0]
    return f"median {int(np.median(found) * every)} ratings" if len(found) else "never found"


def planned(args: argparse.Namespace) -> int:
    """Ratings (both sides) a fixed-horizon test needs for 80% power at ``--alpha`` (two-sided)."""
    p1, p2 = args.rate, args.rate + args.lift
    z = sps.norm.ppf(1 - args.alpha / 2) + sps.norm.ppf(0.8)
    return 2 * math.ceil(z**2 * (p1 * (1 - p1) + p2 * (1 - p2)) / args.lift**2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000, help="simulated experiments per scenario")
    parser.add_argument("--ratings", type=int, default=5000, help="ratings at the last look")
    parser.add_argument("--every", type=int, default=50, help="ratings between two looks")
    parser.add_argument("--rate", type=float, default=0.5, help="the control's thumbs-up rate")
    parser.add_argument("--lift", type=float, default=0.05, help="the candidate's true lift in (b)")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--tau", type=float, default=TAU, help="the mixing prior's sd (the report uses TAU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    looks = args.ratings // args.every
    started = time.monotonic()
    print(
        f"{args.runs} experiments per scenario, {looks} looks: every {args.every} ratings to {args.ratings}"
    )
    print(f"sequential: mSPRT, tau {args.tau:g} sd, min over every prefix; alpha {args.alpha:g}")

    aa = simulate(args, 0.0, rng)
    print(f"\n(a) A/A at {args.rate:.0%} thumbs up: false positives")
    line(f"fixed-horizon, stopped at the first look with p < {args.alpha:g}", share(aa["fixed"] > 0))
    line("fixed-horizon, final look only", share(aa["final"]))
    line(f"sequential, stopped at the first look with p < {args.alpha:g}", share(aa["sequential"] > 0))
    rate = float(np.mean(aa["sequential"] > 0))
    line(
        f"goal: sequential <= {args.alpha:.0%}", f"{'met' if rate <= args.alpha else 'NOT MET'} ({rate:.1%})"
    )

    ab = simulate(args, args.lift, rng)
    print(f"\n(b) A/B {args.rate:.0%} against {args.rate + args.lift:.0%}: found by {args.ratings} ratings")
    for label, key in (("sequential", "sequential"), ("fixed-horizon, first look (not valid)", "fixed")):
        line(label, f"{share(ab[key] > 0)}, {ratings_needed(ab[key], args.every)}")
    line("fixed-horizon, final look only", share(ab["final"]))
    line("fixed-horizon planned for 80% power, read once", f"{planned(args)} ratings")
    print(f"\n{time.monotonic() - started:.1f} s")


if __name__ == "__main__":
    main()
