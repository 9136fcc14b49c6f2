"""Simulated log interpreter (``main_cli.py --logdir <case> --outputdir <out>``).

Writes ``out/plan/RP*.dcm`` and ``out/log/<beam>/<NN>_<E.EE>MeV.csv`` (one CSV
per energy layer, decoded from the big-endian uint16 .ptn spot log); exits 1
with a message on a bad case, as the real one does.
"""

from __future__ import annotations

import csv
import shutil
import struct
import sys
from pathlib import Path

from demo.simulators import _simctl

COLUMNS = ["SPOT", "X_POS", "Y_POS", "X_SIZE", "Y_SIZE", "LAYER", "ENERGY_X10", "FLAGS"]


def fail(message: str) -> int:
    print(f"ERROR: {message}", flush=True)
    return 1


def main() -> int:
    parser = _simctl.arguments("main_cli.py")
    parser.add_argument("--logdir", required=True)
    parser.add_argument("--outputdir", required=True)
    args = parser.parse_args()
    control = _simctl.start(args.control, "interpreter", "Log interpreter (SIMULATED by MQI "
                            "Communicator's test simulator)", logdir=args.logdir)
    case, out = Path(args.logdir), Path(args.outputdir)
    plans = sorted(case.glob("RP*.dcm"))
    if len(plans) != 1:
        return fail(f"expected one RT plan in {case}, found {len(plans)}")
    try:
        import pydicom

        plan = pydicom.dcmread(plans[0])
        beams = {int(b.BeamNumber) for b in plan.IonBeamSequence
                 if b.TreatmentDeliveryType == "TREATMENT"}
    except Exception as exc:  # noqa: BLE001 - the real tool reports and exits 1
        return fail(f"cannot read plan {plans[0].name}: {exc}")
    (out / "plan").mkdir(parents=True, exist_ok=True)
    shutil.copy2(plans[0], out / "plan" / plans[0].name)
    for folder in sorted(p for p in case.iterdir() if p.is_dir()):
        info = dict(line.split(",", 1) for line in
                    (folder / "PlanInfo.txt").read_text().splitlines() if "," in line)
        beam = int(info["DICOM_BEAM_NUMBER"])
        if beam not in beams:
            return fail(f"{folder.name}: beam {beam} is not in the plan")
        target = out / "log" / str(beam)
        target.mkdir(parents=True, exist_ok=True)
        with open(folder / "PlanRange.txt", newline="") as fh:
            layers = list(csv.DictReader(fh))
        for layer in layers:
            # As the real tool does: the files it reads are named (and their names
            # carry the patient ids: what MQI's redaction must catch).
            print(f"reading {folder.name}/{layer['SCAN_OUT_FL_NM']} and "
                  f"{layer.get('PLAN_SCAN_OUT_FL_NM', '')}", flush=True)
            data = (folder / layer["SCAN_OUT_FL_NM"]).read_bytes()
            if not data or len(data) % 16 or control.get("fail", {}).get("interpreter"):
                return fail(f"{folder.name}/{layer['SCAN_OUT_FL_NM']}: bad spot log")
            name = f"{int(layer['LAYER_NO']):02d}_{float(layer['LAYER_ENERGY']):.2f}MeV.csv"
            with open(target / name, "w", newline="") as fh:
                writer = csv.writer(fh)
                writer.writerow(COLUMNS)
                writer.writerows(struct.iter_unpack(">8H", data))
        print(f"beam {beam}: {len(layers)} layers interpreted", flush=True)
    _simctl.record(control, "interpreter", "end", logdir=args.logdir)
    print("Interpretation finished (SIMULATED)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
