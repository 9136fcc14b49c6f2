"""The compare_dose step: each recomputed RT Dose against the plan's reference RT Dose.

Where a reference is looked for: ``RD*.dcm`` in the case folder, and every RT Dose
in ``dose_qa.reference_root/<case_id>/`` when configured. A reference is used
only when its ReferencedRTPlanSequence names this case's plan (its SOP Instance
UID); one for another plan, another patient, an unknown beam or of a summation
other than BEAM or PLAN is refused, with the reason, in the report. A BEAM dose
is compared with that beam's recomputed dose (ReferencedBeamNumber), a PLAN dose
with the sum of all recomputed beams. The comparison is flows/gamma_compare.py;
the verdict of the case is the worst of its comparisons.

No reference at all: QA "not assessed", and the case COMPLETES — or FAILS when
``dose_qa.required`` (then every beam, or the plan, needs one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
from prefect import get_run_logger, task
from pydantic import BaseModel

from blocks.manifest import sha256_file
from config import MqiConfig
from config.models import QA_STEP
from flows.case_inspection import CaseInfo
from flows.dose_geometry import DoseGrid, DoseReadError, read_dose, resampled
from flows.gamma_compare import SEVERITY, Comparison, compare
from flows.layout import results_dir
from flows.outcomes import StageFailed

QaVerdict = Literal["PASS", "REVIEW", "FAIL", "NOT ASSESSED"]
QA_EVENT = "mqi.case.qa"
QA_FOLDER = "qa"
"""Inside the case's results folder: the PNGs and dose_qa.json."""
PLAN = "plan"


class DoseQaOutcome(BaseModel):
    """What compare_dose found for a case."""

    verdict: QaVerdict
    headline: str
    comparisons: list[Comparison]
    refused: list[str]
    """references not used, each with the reason"""
    not_compared: list[int]
    """treatment beams without a reference of their own"""
    missing: str | None = None
    """set when the case has no usable reference: why (for the report and, when
    required, the failure)"""
    required: bool = False
    simulated: bool = False
    files: dict[str, str] = {}
    """the QA's files in the results folder (PNGs, dose_qa.json) → SHA-256"""

    @property
    def tag(self) -> str:
        return "qa:" + self.verdict.lower().replace(" ", "-")


def qa_tag(verdict: str) -> str:
    """``qa:pass``, ``qa:review``, ``qa:fail`` or ``qa:not-assessed``."""
    return "qa:" + verdict.lower().replace(" ", "-")


def _plan_identity(info: CaseInfo) -> tuple[str, str]:
    import pydicom

    plan = pydicom.dcmread(Path(info.case_dir) / info.plan_file, stop_before_pixels=True,
                           specific_tags=["SOPInstanceUID", "PatientID"])
    return str(plan.get("SOPInstanceUID", "")), str(plan.get("PatientID", ""))


def _referenced_beam(ds: Any) -> int | None:
    for ref in ds.ReferencedRTPlanSequence:
        for group in ref.get("ReferencedFractionGroupSequence", []):
            for beam in group.get("ReferencedBeamSequence", []):
                if "ReferencedBeamNumber" in beam:
                    return int(beam.ReferencedBeamNumber)
    return None


def candidates(cfg: MqiConfig, info: CaseInfo) -> list[Path]:
    """Every file that may be a reference dose, the case folder's first."""
    found = sorted(p for p in Path(info.case_dir).glob("RD*.dcm") if p.is_file())
    if cfg.dose_qa.reference_root is not None:
        folder = Path(cfg.dose_qa.reference_root) / info.case_id
        if folder.is_dir():
            found += sorted(p for p in folder.glob("*.dcm") if p.is_file())
    return found


def find_references(cfg: MqiConfig, info: CaseInfo) -> tuple[dict[int | str, Path], list[str]]:
    """The reference of each beam (by number) and of the plan (``"plan"``), and the
    files refused, each as ``<name>: <reason>``."""
    import pydicom

    plan_uid, patient_id = _plan_identity(info)
    beams = {b.number for b in info.beams}
    found: dict[int | str, Path] = {}
    refused: list[str] = []
    for path in candidates(cfg, info):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file: said, not used
            refused.append(f"{path.name}: unreadable ({type(exc).__name__})")
            continue
        if ds.get("Modality") != "RTDOSE":
            refused.append(f"{path.name}: not an RT Dose (Modality {ds.get('Modality')})")
            continue
        refs = ds.get("ReferencedRTPlanSequence") or []
        uids = [str(r.get("ReferencedSOPInstanceUID", "")) for r in refs]
        if not uids:
            refused.append(f"{path.name}: names no plan (no ReferencedRTPlanSequence)")
            continue
        if plan_uid not in uids:
            refused.append(f"{path.name}: for another plan (ReferencedSOPInstanceUID "
                           f"{uids[0]}; this case's plan is {plan_uid})")
            continue
        other = str(ds.get("PatientID", "") or "")
        if other and patient_id and other != patient_id:
            refused.append(f"{path.name}: for another patient (PatientID differs from the "
                           f"plan's)")
            continue
        summation = str(ds.get("DoseSummationType", "")).upper()
        key: int | str
        if summation == "BEAM":
            number = _referenced_beam(ds)
            if number is None:
                refused.append(f"{path.name}: a BEAM dose without a ReferencedBeamNumber")
                continue
            if number not in beams:
                refused.append(f"{path.name}: for beam {number}, not a treatment beam of this "
                               f"case ({', '.join(map(str, sorted(beams)))})")
                continue
            key = number
        elif summation == "PLAN":
            key = PLAN
        else:
            refused.append(f"{path.name}: DoseSummationType {summation or '(none)'} is not "
                           f"compared (BEAM or PLAN)")
            continue
        if key in found:
            refused.append(f"{path.name}: another reference for {_label(key)} was found first "
                           f"({found[key].name})")
            continue
        found[key] = path
    return found, refused


def _label(key: int | str) -> str:
    return PLAN if key == PLAN else f"beam {key}"


def _recomputed(cfg: MqiConfig, case_id: str, files: dict[str, dict[str, str]]
                ) -> dict[int, Path]:
    root = results_dir(cfg, case_id)
    return {int(beam): root / sorted(entries)[0] for beam, entries in files.items() if entries}


def run_dose_qa(cfg: MqiConfig, info: CaseInfo, files: dict[str, dict[str, str]]
                ) -> DoseQaOutcome:
    """Compare every beam (and the plan) that has a reference; write PNGs and
    ``qa/dose_qa.json`` into the results folder."""
    from flows.dose_plots import save_plot

    qa = cfg.dose_qa
    refs, refused = find_references(cfg, info)
    recomputed = _recomputed(cfg, info.case_id, files)
    out_dir = results_dir(cfg, info.case_id) / QA_FOLDER
    comparisons: list[Comparison] = []
    grids: dict[int, DoseGrid] = {}

    def grid_of(beam: int) -> DoseGrid:
        if beam not in grids:
            grids[beam] = read_dose(recomputed[beam])
        return grids[beam]

    for key in sorted(refs, key=lambda k: (k == PLAN, k if isinstance(k, int) else 0)):
        path = refs[key]
        try:
            reference = read_dose(path)
            if key == PLAN:
                numbers = sorted(recomputed)
                first = grid_of(numbers[0])
                total = np.sum([resampled(grid_of(n), first) for n in numbers], axis=0)
                evaluation = DoseGrid(first.z, first.y, first.x, dose=total, units=first.units)
                recomputed_name = f"sum of beams {', '.join(map(str, numbers))}"
            else:
                evaluation = grid_of(int(key))
                recomputed_name = recomputed[int(key)].name
        except DoseReadError as exc:
            refused.append(str(exc))
            continue
        comparison, picture = compare(reference, evaluation, qa, label=_label(key),
                                      reference_file=path.name,
                                      recomputed_file=recomputed_name)
        if qa.plots and picture.profiles:
            name = f"{_label(key).replace(' ', '_')}.png"
            save_plot(picture, out_dir / name)
            comparison = comparison.model_copy(update={"plot": f"{QA_FOLDER}/{name}"})
        comparisons.append(comparison)

    beams = [b.number for b in info.beams]
    compared = {c.label for c in comparisons}
    not_compared = [b for b in beams if f"beam {b}" not in compared]
    covered = PLAN in compared or not not_compared
    missing = None
    if not comparisons:
        missing = "no reference dose" + (f" ({len(refused)} refused)" if refused else "")
    elif not covered:
        missing = (f"no reference dose for beam(s) {', '.join(map(str, not_compared))} "
                   f"and none for the plan")
    if comparisons:
        verdict: QaVerdict = max((c.verdict for c in comparisons), key=SEVERITY.__getitem__)
    else:
        verdict = "NOT ASSESSED"
    outcome = DoseQaOutcome(verdict=verdict, headline="", comparisons=comparisons,
                            refused=refused, not_compared=not_compared, missing=missing,
                            required=qa.required, simulated=cfg.simulated)
    outcome = outcome.model_copy(update={"headline": headline(outcome)})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "dose_qa.json").write_text(outcome.model_dump_json(indent=2))
    root = results_dir(cfg, info.case_id)
    written = [root / c.plot for c in comparisons if c.plot] + [out_dir / "dose_qa.json"]
    return outcome.model_copy(update={"files": {
        p.relative_to(root).as_posix(): sha256_file(p) for p in written}})


def headline(outcome: DoseQaOutcome) -> str:
    """One line: the case's QA verdict and, per comparison, its verdict and pass rate."""
    sim = " (SIMULATED)" if outcome.simulated else ""
    if not outcome.comparisons:
        return f"Dose QA: NOT ASSESSED{sim} — {outcome.missing or 'no reference dose'}"
    parts = []
    for c in outcome.comparisons:
        deciding = [r for r in c.criteria if r.decides] or c.criteria
        rates = ", ".join(f"{r.label} {r.pass_rate:.1f} %" for r in deciding)
        parts.append(f"{c.label} {c.verdict} ({rates})")
    more = f"; {outcome.missing}" if outcome.missing else ""
    return f"Dose QA: {outcome.verdict}{sim} — " + "; ".join(parts) + more


def report_section(outcome: DoseQaOutcome | None) -> list[str]:
    """The report's first lines (markdown): the verdict, then a table per comparison."""
    if outcome is None:
        return []
    lines = [f"## {outcome.headline}", ""]
    if outcome.comparisons:
        lines += ["| | verdict | why | " + " | ".join(
            f"γ {r.label} pass (evaluated)" for r in outcome.comparisons[0].criteria)
            + " | mean / max γ (first) | max dose ref / recomputed | mean diff (≥90 % max) "
              "| plot |",
            "|---|---|---|" + "---|" * len(outcome.comparisons[0].criteria) + "---|---|---|---|"]
        for c in outcome.comparisons:
            first = c.criteria[0]
            gam = (f"{first.mean_gamma:.2f} / {'≥' if first.capped else ''}"
                   f"{first.max_gamma:.2f}" if first.mean_gamma is not None
                   and first.max_gamma is not None else "—")
            diff = (f"{c.mean_difference_percent:+.1f} % ({c.mean_difference:+.3g} {c.units})"
                    if c.mean_difference_percent is not None and c.mean_difference is not None
                    else "—")
            plot = f"[{Path(c.plot).name}]({c.plot})" if c.plot else "—"
            lines.append(
                f"| **{c.label}** | **{c.verdict}** | {c.why} | "
                + " | ".join(f"{r.pass_rate:.1f} % ({r.evaluated})" for r in c.criteria)
                + f" | {gam} | {c.reference_max:.3g} / {c.recomputed_max:.3g} {c.units} | "
                  f"{diff} | {plot} |")
        lines.append("")
        for c in outcome.comparisons:
            outside = (f"; {c.outside} voxel(s) above the cutoff outside the recomputed grid "
                       f"count as failing" if c.outside else "")
            lines.append(f"- {c.label}: reference `{c.reference_file}` ({c.reference_grid}) vs "
                         f"recomputed `{c.recomputed_file}` ({c.recomputed_grid}); "
                         f"{c.above_cutoff} reference voxels above the cutoff{outside}; "
                         f"{c.seconds:.1f} s")
        lines += ["", f"Gamma: {outcome.comparisons[0].settings}.", ""]
    if outcome.not_compared and outcome.comparisons:
        lines += [f"Beams without a reference of their own: "
                  f"{', '.join(map(str, outcome.not_compared))}.", ""]
    if outcome.refused:
        lines += ["References not used:", ""] + [f"- {r}" for r in outcome.refused] + [""]
    if outcome.files:
        # The same row shape as the result files: the archiver checks these too.
        lines += ["| QA | file | SHA-256 |", "|---|---|---|"]
        lines += [f"| qa | `{name}` | `{digest}` |" for name, digest in outcome.files.items()]
        lines.append("")
    return lines


# ----------------------------------------------------------------- Prefect glue
@task(name=QA_STEP, task_run_name=QA_STEP)
def compare_dose_stage(info: CaseInfo, files: dict[str, dict[str, str]]) -> DoseQaOutcome:
    """The dose QA of a case's verified results (runs here, not on the GPU host)."""
    from flows.settings import flow_config

    cfg = flow_config()
    outcome = run_dose_qa(cfg, info, files)
    logger = get_run_logger()
    logger.info("case %s: %s", info.case_id, outcome.headline)
    for line in outcome.refused:
        logger.warning("reference not used: %s", line)
    return outcome


def announce(info: CaseInfo, outcome: DoseQaOutcome) -> None:
    """Tag the flow run with the verdict; a FAIL or REVIEW becomes a ``mqi.case.qa`` event.

    The event carries the case id, the verdicts and pass rates: no patient id, no
    file name (those can carry one)."""
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        tags = {t for t in run.tags if not t.startswith("qa:")} | {outcome.tag}
        client.update_flow_run(flow_run.id, tags=sorted(tags))
    if outcome.verdict in ("FAIL", "REVIEW"):
        emit_event(event=QA_EVENT, resource={
            "prefect.resource.id": f"mqi.case.{info.case_id}",
            "prefect.resource.name": info.case_id,
        }, related=[{"prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
                     "prefect.resource.role": "flow-run"}],
            payload={"verdict": outcome.verdict, "simulated": outcome.simulated,
                     "summary": outcome.headline,
                     "comparisons": {c.label: {"verdict": c.verdict, "why": c.why}
                                     for c in outcome.comparisons}})


def must_fail(outcome: DoseQaOutcome) -> StageFailed | None:
    """The case's failure when a reference is required and missing; else None."""
    if outcome.required and outcome.missing:
        return StageFailed(QA_STEP, f"{outcome.missing} (dose_qa.required is true)")
    return None

