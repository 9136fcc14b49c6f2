"""The picture of one dose comparison: profiles through the maximum and the gamma histogram.

matplotlib with its Agg backend (no display), one PNG per comparison, written
beside the results so that the report links it and the archive keeps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class PlotData:
    """What a comparison hands to its picture (arrays; never leaves the process)."""

    title: str
    profiles: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    """(axis name, reference coords, reference dose, recomputed coords, recomputed dose)"""
    gammas: dict[str, np.ndarray]
    """criterion label → the gamma values evaluated"""
    max_gamma: float | None
    units: str


def save_plot(data: PlotData, target: Path) -> Path:
    """Write the PNG of a comparison to ``target``; returns it."""
    import matplotlib

    matplotlib.use("Agg")  # no display, whatever the environment says
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.4), dpi=90)
    axes = fig.subplots(1, 4)
    for ax, (name, rx, rd, ex, ed) in zip(axes[:3], data.profiles, strict=False):
        ax.plot(rx, rd, "-", color="tab:blue", label="reference")
        ax.plot(ex, ed, "--", color="tab:red", label="recomputed")
        ax.set_xlabel(f"{name} (mm)")
        ax.set_ylabel(f"dose ({data.units})")
        ax.set_title(f"profile along {name} through the maximum", fontsize=8)
        ax.legend(fontsize=7)
    hist = axes[3]
    top = data.max_gamma if data.max_gamma is not None else max(
        [2.0, *(float(np.max(g)) for g in data.gammas.values() if len(g))])
    for label, values in data.gammas.items():
        if len(values):
            hist.hist(values, bins=40, range=(0, top), histtype="step", label=label)
    hist.axvline(1.0, color="black", linewidth=0.8)
    hist.set_xlabel("gamma")
    hist.set_ylabel("voxels")
    hist.set_title("gamma histogram", fontsize=8)
    hist.legend(fontsize=7)
    fig.suptitle(data.title, fontsize=10)
    fig.tight_layout()
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png")
    return target
