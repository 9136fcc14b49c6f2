"""Dose QA without services: RT Dose geometry, the gamma comparison and its verdicts,
finding and refusing references, the PNGs and the report's headline."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from pydicom.dataset import Dataset

from config import DEFAULT_PATH
from config.loader import parse_config
from demo.dicom import new_file
from demo.dose_model import OTHER_GRID, RT_DOSE, SIMULATOR_GRID, Grid, beam_dose, simulated_dose
from demo.simulators.raw2dicom import write_dose
from demo.synthetic_case import write_case
from flows.case_inspection import inspect_case
from flows.dose_geometry import DoseGrid, DoseReadError, dose_from_dataset, read_dose
from flows.dose_qa import find_references, must_fail, report_section, run_dose_qa
from flows.gamma_compare import compare


def config(tmp_path, **dose_qa):
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["paths"]["results_root"] = str(tmp_path / "results")
    data["paths"]["data_dir"] = str(tmp_path / "data")
    data["dose_qa"].update(dose_qa)
    return parse_config(data, tmp_path / "mqi.yaml")


# ------------------------------------------------------------------------ geometry
def hand_made(offsets, position=(-10.5, 20.0, -30.0)):
    """3 frames × 2 rows × 4 columns; pixel value 100*frame + 10*row + column."""
    ds = new_file(RT_DOSE, "RTDOSE")
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.NumberOfFrames, ds.Rows, ds.Columns = 3, 2, 4
    ds.ImagePositionPatient = list(position)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [3.0, 2.0]  # between rows (y) 3 mm, between columns (x) 2 mm
    ds.GridFrameOffsetVector = list(offsets)
    ds.DoseGridScaling = "0.001"
    ds.DoseUnits = "GY"
    pixels = np.array([[[100 * f + 10 * r + c for c in range(4)] for r in range(2)]
                       for f in range(3)], dtype="<u2")
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.mark.parametrize("offsets", [[0.0, 2.5, 5.0], [-30.0, -27.5, -25.0]],
                         ids=["relative offsets", "absolute offsets"])
def test_voxel_coordinates_of_a_hand_made_rt_dose(offsets):
    grid = dose_from_dataset(hand_made(offsets))
    assert np.allclose(grid.x, [-10.5, -8.5, -6.5, -4.5])
    assert np.allclose(grid.y, [20.0, 23.0])
    assert np.allclose(grid.z, [-30.0, -27.5, -25.0])
    assert grid.dose.shape == (3, 2, 4)
    assert grid.dose[2, 1, 3] == pytest.approx(0.213)  # frame 2, row 1, column 3
    assert grid.dose[0, 0, 0] == 0 and grid.units == "Gy"


def test_frames_stored_backwards_come_out_ascending_with_their_dose():
    grid = dose_from_dataset(hand_made([0.0, -2.5, -5.0]))
    assert np.allclose(grid.z, [-35.0, -32.5, -30.0])
    assert grid.dose[0, 0, 0] == pytest.approx(0.2)  # the last frame stored, at z = -35
    assert grid.dose[2, 0, 0] == 0


def test_what_is_not_a_usable_rt_dose_is_said_with_the_file(tmp_path):
    ds = hand_made([0.0, 2.5, 5.0])
    ds.Modality = "CT"
    with pytest.raises(DoseReadError, match="not an RT Dose"):
        dose_from_dataset(ds, tmp_path / "RD.x.dcm")
    ds = hand_made([0.0, 2.5])
    with pytest.raises(DoseReadError, match="2 values for 3 frames"):
        dose_from_dataset(ds)
    (tmp_path / "RD.bad.dcm").write_bytes(b"nope")
    with pytest.raises(DoseReadError, match=r"RD\.bad\.dcm: unreadable"):
        read_dose(tmp_path / "RD.bad.dcm")


# --------------------------------------------------------------------- comparison
def recomputed(beam=2):
    return DoseGrid(*SIMULATOR_GRID.axes(), dose=simulated_dose(beam).astype(float))


def reference(grid=SIMULATOR_GRID, beam=2, **change):
    return DoseGrid(*grid.axes(), dose=beam_dose(beam, *grid.axes(), **change))


@pytest.mark.parametrize(("ref", "verdict"), [
    (reference(), "PASS"),
    (reference(OTHER_GRID), "PASS"),  # another spacing and origin, read as such
    (reference(scale=1.05), "REVIEW"),
    (reference(shift_mm=(3.0, 0.0, 0.0)), "FAIL"),
    (reference(scale=1.08), "FAIL"),
], ids=["match", "other grid", "5 % more", "3 mm shift", "8 % more"])
def test_gamma_verdicts(tmp_path, ref, verdict):
    qa = config(tmp_path).dose_qa
    comparison, picture = compare(ref, recomputed(), qa, label="beam 2")
    assert comparison.verdict == verdict, comparison.why
    first, second = comparison.criteria
    assert (first.dose_percent, first.distance_mm, first.decides) == (3, 2, True)
    assert (second.dose_percent, second.distance_mm, second.decides) == (2, 2, False)
    assert second.pass_rate <= first.pass_rate
    assert 0 < first.evaluated <= comparison.above_cutoff
    assert comparison.outside == 0
    assert [p[0] for p in picture.profiles] == ["x", "y", "z"]


def test_the_same_dose_on_a_grid_that_misses_it_is_not_a_pass(tmp_path):
    qa = config(tmp_path).dose_qa
    # the recomputed grid covers only the left half of the reference dose
    half = Grid(shape=(20, 24, 12), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
    evaluation = DoseGrid(*half.axes(), dose=beam_dose(2, *half.axes()))
    comparison, _ = compare(reference(), evaluation, qa, label="beam 2")
    assert comparison.outside > 0
    assert comparison.verdict == "FAIL"
    far = Grid(shape=(4, 4, 4), spacing=(2.0, 2.0, 2.0), origin=(500.0, 500.0, 500.0))
    comparison, _ = compare(reference(), DoseGrid(*far.axes(), dose=np.ones((4, 4, 4))), qa,
                            label="beam 2")
    assert comparison.verdict == "FAIL" and "does not overlap" in comparison.why


# ------------------------------------------------------------- references, results
def case_with_results(tmp_path, cfg, reference, case_id="qa-unit"):
    case = write_case(tmp_path / "scan", case_id, beams=3, layers=1, spots_per_layer=5,
                      seed=3, reference=reference)
    info = inspect_case(case, id_pattern=cfg.cases.id_pattern)
    files = {}
    for beam in info.beams:
        folder = tmp_path / "raw" / str(beam.number)
        folder.mkdir(parents=True)
        (folder / "d.raw").write_bytes(simulated_dose(beam.number).astype("<f4").tobytes())
        nz, ny, nx = SIMULATOR_GRID.shape
        geometry = {"beam": beam.number, "frames": nz, "rows": ny, "columns": nx,
                    "spacing_mm": list(SIMULATOR_GRID.spacing)}
        out = cfg.paths.results_root / case_id / "dicom" / f"beam_{beam.number}"
        out.mkdir(parents=True)
        dose = write_dose(folder / "d.raw", geometry, out)
        files[str(beam.number)] = {dose.relative_to(cfg.paths.results_root / case_id)
                                   .as_posix(): "sha"}
    return info, files


def test_a_case_with_beam_plan_and_refused_references(tmp_path):
    cfg = config(tmp_path, reference_root=str(tmp_path / "refs"))
    info, files = case_with_results(
        tmp_path, cfg, {2: "match", 3: "scaled", 4: "other_plan", "plan": "other_grid"})
    # one more reference, from the reference root, for beam 4 of another patient
    plan = pydicom.dcmread(next((tmp_path / "scan" / "qa-unit").glob("RP*.dcm")))
    from demo.dose_model import rt_dose

    stranger = rt_dose(beam_dose(4, *SIMULATOR_GRID.axes()), SIMULATOR_GRID, plan=plan, beam=4,
                       description="SIMULATED")
    stranger.PatientID = "SOMEONE-ELSE"
    (tmp_path / "refs" / "qa-unit").mkdir(parents=True)
    stranger.save_as(tmp_path / "refs" / "qa-unit" / "RD.stranger.dcm", enforce_file_format=True)

    found, refused = find_references(cfg, info)
    assert sorted(found, key=str) == [2, 3, "plan"]
    assert any("for another plan (ReferencedSOPInstanceUID" in r
               and plan.SOPInstanceUID in r for r in refused), refused
    assert any(r.startswith("RD.stranger.dcm: for another patient") for r in refused)
    assert not any("SOMEONE-ELSE" in r for r in refused)

    outcome = run_dose_qa(cfg, info, files)
    verdicts = {c.label: c.verdict for c in outcome.comparisons}
    assert verdicts == {"beam 2": "PASS", "beam 3": "REVIEW", "plan": "PASS"}
    assert outcome.verdict == "REVIEW" and outcome.tag == "qa:review"
    assert outcome.not_compared == [4] and outcome.missing is None  # the plan covers it
    results = cfg.paths.results_root / "qa-unit"
    for c in outcome.comparisons:
        with Image.open(results / c.plot) as png:
            assert png.format == "PNG" and png.size[0] > 500
    saved = json.loads((results / "qa" / "dose_qa.json").read_text())
    assert saved["verdict"] == "REVIEW"
    lines = report_section(outcome)
    assert lines[0].startswith("## Dose QA: REVIEW — beam 2 PASS (3%/2mm 100.0 %); beam 3 REVIEW")
    assert "(qa/beam_3.png)" in "\n".join(lines) and "References not used:" in lines
    # the archiver checks the QA files like the result files (flows/archive_files.py)
    from flows.archive_files import report_checksums

    listed = report_checksums("\n".join(lines))
    assert set(listed) == {"qa/beam_2.png", "qa/beam_3.png", "qa/plan.png", "qa/dose_qa.json"}


def test_the_qa_column_reads_the_runs_tag():
    from deployments.status import qa_from_tags

    assert qa_from_tags(["case:x", "qa:review"]) == "REVIEW"
    assert qa_from_tags(["qa:not-assessed"]) == "NOT ASSESSED"
    assert qa_from_tags(["case:x"]) is None


@pytest.mark.parametrize("required", [False, True])
def test_no_reference_is_not_assessed_and_fails_only_when_required(tmp_path, required):
    cfg = config(tmp_path, required=required)
    info, files = case_with_results(tmp_path, cfg, None)
    outcome = run_dose_qa(cfg, info, files)
    assert outcome.verdict == "NOT ASSESSED" and outcome.tag == "qa:not-assessed"
    assert outcome.headline == "Dose QA: NOT ASSESSED — no reference dose"
    failure = must_fail(outcome)
    if required:
        assert failure is not None
        assert failure.summary == ("compare_dose failed: no reference dose "
                                   "(dose_qa.required is true)")
    else:
        assert failure is None


def test_required_needs_every_beam_or_the_plan(tmp_path):
    cfg = config(tmp_path, required=True)
    info, files = case_with_results(tmp_path, cfg, {2: "match"})
    outcome = run_dose_qa(cfg, info, files)
    assert outcome.verdict == "PASS"
    assert outcome.missing == "no reference dose for beam(s) 3, 4 and none for the plan"
    assert must_fail(outcome) is not None


def test_compare_dose_must_be_the_last_step(tmp_path):
    from config import ConfigError

    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["workflows"]["default_qa"] = ["run_interpreter", "compare_dose", "run_moqui_sim"]
    with pytest.raises(ConfigError, match=r"workflows\.default_qa\[1\]: compare_dose"):
        parse_config(data, tmp_path / "mqi.yaml")
    data["workflows"]["default_qa"] = ["run_interpreter", "run_moqui_sim", "convert_to_dicom"]
    data["dose_qa"]["action_percent"] = 97
    with pytest.raises(ConfigError, match=r"dose_qa\.action_percent"):
        parse_config(data, tmp_path / "mqi.yaml")


def test_rt_dose_model_writes_what_it_says(tmp_path):
    ds = new_file(RT_DOSE, "RTDOSE")
    assert isinstance(ds, Dataset)
    from demo.dose_model import rt_dose

    dose = beam_dose(3, *OTHER_GRID.axes())
    rt_dose(dose, OTHER_GRID, description="SIMULATED").save_as(tmp_path / "RD.dcm",
                                                                 enforce_file_format=True)
    back = read_dose(tmp_path / "RD.dcm")
    assert np.allclose(back.x, OTHER_GRID.axes()[2]) and np.allclose(back.z, OTHER_GRID.axes()[0])
    assert np.allclose(back.dose, dose, atol=1e-6 * dose.max())


def test_a_target_can_be_told_of_a_qa_fail_or_review(tmp_path):
    from uuid import uuid4

    from deployments.notifications import automations, templates

    cfg = parse_config({**yaml.safe_load(DEFAULT_PATH.read_text()), "notifications": {
        "targets": [{"name": "physics", "kind": "webhook", "url": "https://x.example.org/h",
                     "events": ["case_qa"]}]}}, tmp_path / "mqi.yaml")
    (made,) = automations(cfg, {"physics": uuid4()})
    assert made.name == "mqi: case QA -> physics"
    assert made.trigger.expect == {"mqi.case.qa"}
    assert "event.payload.summary" in templates("http://ui")["case_qa"].body
