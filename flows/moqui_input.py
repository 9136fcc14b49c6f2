"""Rendering the MOQUI input file of one beam from ``moqui.input_template``.

MOQUI reads ``Key Value`` lines, so a value containing a line break could add
keys of its own: such values are refused rather than written.
"""

from __future__ import annotations

from collections.abc import Mapping

from config import MqiConfig
from config.templates import TemplateError, render


def render_moqui_input(cfg: MqiConfig, values: Mapping[str, object]) -> str:
    """The input file text for one beam.

    Args:
        cfg: The configuration (template, output format, seed, extra parameters).
        values: gpu_id, parent_dir, dicom_dir, log_dir, output_dir, beam_number,
            gantry_num and case_id.

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
