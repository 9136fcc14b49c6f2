"""Simulated raw → DICOM RT Dose converter (``moqui_raw2dicom.py --input <raw> --output <dir>``).

Reads the dose grids the simulated MOQUI wrote (``Dose_beam<N>.raw`` plus its
``.json`` geometry) and writes one real RT Dose per beam with pydicom, labelled
SIMULATED in its series description and manufacturer.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from demo.simulators import _simctl


def write_dose(raw: Path, geometry: dict, out: Path, padding_mb: float = 0) -> Path:
    import numpy as np

    from demo.dose_model import Grid, rt_dose

    shape = (geometry["frames"], geometry["rows"], geometry["columns"])
    dose = np.frombuffer(raw.read_bytes(), dtype="<f4").reshape(shape).astype(np.float64)
    grid = Grid(shape=shape, spacing=tuple(geometry["spacing_mm"]),
                origin=tuple(geometry.get("origin_mm", (0.0, 0.0, 0.0))))
    ds = rt_dose(dose, grid, description=f"SIMULATED MOQUI dose, beam {geometry['beam']}")
    if padding_mb:
        # A dose file as big as a real one (tens of MB), for tests of long downloads.
        block = ds.private_block(0x0009, "MQI SIMULATED PADDING", create=True)
        block.add_new(0x01, "OB", os.urandom(int(padding_mb * 1024 * 1024)))
    target = out / f"RTDOSE_beam{geometry['beam']}.dcm"
    ds.save_as(target, enforce_file_format=True)
    return target


def main() -> int:
    parser = _simctl.arguments("moqui_raw2dicom.py")
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    control = _simctl.start(args.control, "raw2dicom",
                            "raw2dicom (SIMULATED by MQI Communicator's test simulator)",
                            input=args.input)
    src = Path(args.input)
    raws = sorted(src.glob("*.raw")) if src.is_dir() else [src]
    raws = [r for r in raws if r.is_file()]
    if not raws:
        print(f"ERROR: no raw dose in {src}", flush=True)
        return 1
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for raw in raws:
        geometry = json.loads(raw.with_suffix(".json").read_text())
        dose = write_dose(raw, geometry, out, float(control.get("dose_padding_mb", 0)))
        print(f"wrote {dose.name}", flush=True)
    _simctl.record(control, "raw2dicom", "end", input=args.input)
    return 0


if __name__ == "__main__":
    sys.exit(main())
