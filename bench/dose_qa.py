"""Dose QA benchmark: 3D gamma on a realistic grid, with the settings of config vs all voxels.

    python -m bench.dose_qa [--no-baseline] [--subset 20000]

A reference dose of 150 x 150 x 100 voxels at 2 mm (a box-shaped field with soft
edges and a depth gradient: about a quarter of the voxels above the 10 % cutoff)
and a recomputed dose on another grid of the same size, its origin moved 1 mm on
every axis. Two recomputed doses: a near match (0.5 mm shift, +1 %), which passes,
and a 3 mm shift, which fails (a failing dose costs most: its voxels search
furthest). Each is compared as compare_dose does (flows/gamma_compare.py, the
default dose_qa settings: 3 %/2 mm and 2 %/2 mm, max_gamma 1.5, interp_fraction 5,
a random subset of 20,000 voxels) and, as the baseline measured in the same run, with
every voxel above the cutoff evaluated (random_subset null). Prints the seconds,
pass rates and evaluated voxels of each, the speed-up and how far the subset's pass
rate is from the full one. CPU time is printed beside the wall time: on a shared
machine the wall time moves with the load, the CPU time much less.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from scipy.special import erf

from config.models import DoseQaSettings
from flows.dose_geometry import DoseGrid
from flows.gamma_compare import compare

SHAPE = (100, 150, 150)  # z, y, x
SPACING = 2.0


def _edge(a: np.ndarray, centre: float, half: float, sigma: float) -> np.ndarray:
    return 0.5 * (erf((a - centre + half) / sigma) - erf((a - centre - half) / sigma))


def dose_on(origin: tuple[float, float, float], shift_x: float = 0.0,
            scale: float = 1.0) -> DoseGrid:
    z, y, x = (origin[2] + SPACING * np.arange(SHAPE[0]),
               origin[1] + SPACING * np.arange(SHAPE[1]),
               origin[0] + SPACING * np.arange(SHAPE[2]))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    dose = (_edge(xx, 150 + shift_x, 90, 6) * _edge(yy, 150, 80, 6) * _edge(zz, 100, 70, 6)
            * (0.8 + 0.2 * yy / 300) * 2.0 * scale)
    return DoseGrid(z=z, y=y, x=x, dose=dose)


def timed(reference: DoseGrid, evaluation: DoseGrid, qa: DoseQaSettings, label: str):
    wall, cpu = time.perf_counter(), time.process_time()
    comparison, _ = compare(reference, evaluation, qa, label=label)
    return comparison, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the baseline (every voxel): it takes minutes")
    parser.add_argument("--subset", type=int, default=DoseQaSettings().random_subset)
    args = parser.parse_args()
    fast = DoseQaSettings(random_subset=args.subset)
    full = fast.model_copy(update={"random_subset": None})
    reference = dose_on((0.0, 0.0, 0.0))
    above = int(np.count_nonzero(reference.dose >= 0.1 * reference.dose.max()))
    print(f"grid {SHAPE[2]}x{SHAPE[1]}x{SHAPE[0]} voxels at {SPACING:g} mm "
          f"({reference.dose.size:,} voxels, {above:,} above the 10 % cutoff); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"settings: {fast.max_gamma=}, {fast.interp_fraction=}, random_subset "
          f"{args.subset} vs baseline: every voxel above the cutoff")
    cases = {"near match (0.5 mm, +1 %)": dose_on((1.0, 1.0, 1.0), 0.5, 1.01),
             "3 mm shift": dose_on((1.0, 1.0, 1.0), 3.0)}
    for name, evaluation in cases.items():
        ours, wall, cpu = timed(reference, evaluation, fast, name)
        rates = ", ".join(f"{c.label} {c.pass_rate:.2f} %" for c in ours.criteria)
        print(f"{name:<28} subset: {wall:6.1f} s wall {cpu:6.1f} s CPU  {ours.verdict:<6} "
              f"{rates} ({ours.criteria[0].evaluated:,} voxels)")
        if args.no_baseline:
            continue
        base, base_wall, base_cpu = timed(reference, evaluation, full, name)
        rates = ", ".join(f"{c.label} {c.pass_rate:.2f} %" for c in base.criteria)
        gap = max(abs(a.pass_rate - b.pass_rate)
                  for a, b in zip(ours.criteria, base.criteria, strict=True))
        print(f"{'':<28} all:    {base_wall:6.1f} s wall {base_cpu:6.1f} s CPU  "
              f"{base.verdict:<6} {rates} ({base.criteria[0].evaluated:,} voxels)")
        print(f"{'':<28} speed-up x{base_wall / wall:.1f} (CPU x{base_cpu / cpu:.1f}); "
              f"pass rates within {gap:.2f} points of the full evaluation")


if __name__ == "__main__":
    main()
