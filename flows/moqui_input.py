"""Rendering one beam's simulation: the MOQUI input file and the command that runs it.

MOQUI reads ``Key Value`` lines, so a value containing a line break could add
keys of its own: such values are refused rather than written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from config import MqiConfig
from config.models import GPU_STEP
from config.templates import TemplateError, render
from flows.commands import render_step_command
from flows.layout import GpuId, RemoteLayout

if TYPE_CHECKING:
    from flows.case_inspection import Beam


def render_moqui_input(cfg: MqiConfig, values: Mapping[str, object]) -> str:
    """The input file text for one beam.

    Args:
        cfg: The configuration (template, output format, seed, extra parameters).
        values: ``RemoteLayout.moqui_values``: gpu_id, parent_dir, dicom_dir,
            log_dir, output_dir, beam_number, gantry_num and case_id.

    Raises:
        TemplateError: A value is missing or contains a line break.
    """
    merged: dict[str, object] = {
        **cfg.moqui.parameters,
        "output_format": cfg.moqui.output_format,
        "random_seed": cfg.moqui.random_seed,
        **values,
    }
    for name, value in merged.items():
        if any(ch in str(value) for ch in "\r\n\0"):
            raise TemplateError(f"MOQUI input value {name} contains a line break")
    return render(cfg.moqui.input_template, merged, quote=False)


@dataclass(frozen=True)
class Simulation:
    """One beam's simulation on one GPU: the input file to write and the command."""

    input_file: str
    input_text: str
    command: str

    @property
    def recipe(self) -> str:
        """Everything that decides what the simulation computes, for its cache key."""
        return f"{self.input_file}\0{self.input_text}\0{self.command}"


def render_simulation(cfg: MqiConfig, layout: RemoteLayout, beam: Beam,
                      gpu_id: GpuId) -> Simulation:
    """The input file and the ``run_moqui_sim`` command of ``beam`` on ``gpu_id``."""
    return Simulation(
        input_file=layout.input_file(beam.number),
        input_text=render_moqui_input(cfg, layout.moqui_values(beam, gpu_id)),
        command=render_step_command(cfg, GPU_STEP, layout.step_values(GPU_STEP, beam, gpu_id)),
    )
