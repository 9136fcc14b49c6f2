"""MOQUI input rendering: every key the real tool reads, and no way to inject a line."""

from __future__ import annotations

import pytest

from config import DEFAULT_PATH, load_config
from config.templates import TemplateError
from flows.moqui_input import render_moqui_input

VALUES = {"case_id": "c1", "gpu_id": 1, "parent_dir": "/w/c1", "dicom_dir": "/w/c1/plan",
          "log_dir": "/w/c1/log/2", "output_dir": "/w/c1/raw/beam_2", "beam_number": 2,
          "gantry_num": 1}


def parse(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(" ")
            out[key] = value
    return out


def test_default_template_has_the_keys_moqui_needs():
    keys = parse(render_moqui_input(load_config(DEFAULT_PATH), VALUES))
    assert keys["GPUID"] == "1" and keys["BeamNumbers"] == "2" and keys["GantryNum"] == "1"
    assert keys["OutputDir"] == "/w/c1/raw/beam_2" and keys["OutputFormat"] == "raw"
    assert keys["RandomSeed"] == "-1932780356" and keys["Scorer"] == "Dose"
    assert keys["DicomDir"] == "/w/c1/plan" and keys["logFilePath"] == "/w/c1/log/2"
    assert keys["ParentDir"] == "/w/c1" and keys["ParticlesPerHistory"] == "1"


@pytest.mark.parametrize("bad", ["/w/x\nGPUID 0", "/w/x\rGPUID 0", "/w/\0x"])
def test_a_value_with_a_line_break_is_refused(bad):
    with pytest.raises(TemplateError, match="line break"):
        render_moqui_input(load_config(DEFAULT_PATH), {**VALUES, "output_dir": bad})
