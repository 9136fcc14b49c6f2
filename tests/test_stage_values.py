"""Template values come from one place, and every placeholder `mqi config check`
accepts for a step is one the pipeline supplies for that step."""

from __future__ import annotations

import inspect
import pickle
import shlex
import subprocess
from pathlib import Path
from types import SimpleNamespace
from uuid import UUID

import pytest
import yaml

from config import DEFAULT_PATH, ENV_VAR, load_config
from config.models import (
    BEAM_STEPS,
    CASE_PLACEHOLDERS,
    GPU_STEP,
    MOQUI_PLACEHOLDERS,
    STEP_PLACEHOLDERS,
    step_placeholders,
)
from flows.case_inspection import Beam
from flows.commands import render_step_command
from flows.layout import RemoteLayout, remote_layout
from flows.moqui_input import render_simulation
from flows.outcomes import CaseFailed, SimulationOutcome, StageFailed

BEAM = Beam(number=3, name="Field 2", machine="G2", gantry_num=2, control_points=60,
            delivery_dir="2024010112000001", layers=30)
LAYOUT = RemoteLayout("/work/mqi", "case-7", "0123abcd")


def values_for(step: str) -> dict[str, object]:
    beam = BEAM if step in BEAM_STEPS else None
    return LAYOUT.step_values(step, beam, 1 if step == GPU_STEP else None)


@pytest.mark.parametrize("step", [*STEP_PLACEHOLDERS, "a_custom_step"])
def test_each_step_is_offered_exactly_the_placeholders_the_validator_accepts(step):
    assert set(values_for(step)) == STEP_PLACEHOLDERS.get(step, CASE_PLACEHOLDERS)


def config_using_every_placeholder(tmp_path: Path) -> Path:
    """The default config with each step's template using every placeholder it may."""
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    tools = data["tools"]
    for step in STEP_PLACEHOLDERS:
        names = sorted(step_placeholders(step, tools) - set(tools))
        data["remote_commands"][step] = "echo " + " ".join(f"{{{n}}}" for n in names)
    path = tmp_path / "every-placeholder.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_every_accepted_placeholder_renders_for_its_step(tmp_path):
    cfg = load_config(config_using_every_placeholder(tmp_path))  # the validator accepts it
    for step in STEP_PLACEHOLDERS:
        words = shlex.split(render_step_command(cfg, step, values_for(step)))
        assert words[0] == "echo" and len(words) == len(STEP_PLACEHOLDERS[step]) + 1, step


def test_beam_dir_reaches_the_simulation_command(tmp_path):
    """A config that `mqi config check` accepts with {beam_dir} in run_moqui_sim used to
    fail with a TemplateError only after upload and the interpreter had run."""
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    data["remote_commands"][GPU_STEP] = "{moqui} {input_file} --logs {beam_dir}"
    path = tmp_path / "beam-dir.yaml"
    path.write_text(yaml.safe_dump(data))
    sim = render_simulation(load_config(path), LAYOUT, BEAM, 1)
    assert shlex.split(sim.command)[-1] == \
        "/work/mqi/case-7/run-0123abcd/case/2024010112000001"


def test_moqui_values_with_the_moqui_section_fill_every_moqui_placeholder():
    assert set(LAYOUT.moqui_values(BEAM, 0)) | {"output_format", "random_seed"} \
        == MOQUI_PLACEHOLDERS


def test_the_simulation_recipe_leaves_the_gpu_open_and_nothing_else():
    cfg = load_config(DEFAULT_PATH)
    on_0, on_1 = (render_simulation(cfg, LAYOUT, BEAM, g) for g in (0, 1))
    probe = render_simulation(cfg, LAYOUT, BEAM, "{gpu}")
    assert on_0.recipe != on_1.recipe
    assert on_0.recipe.replace("GPUID 0", "GPUID {gpu}") == probe.recipe
    other = render_simulation(cfg, LAYOUT, BEAM.model_copy(update={"number": 4}), "{gpu}")
    assert other.recipe != probe.recipe


def test_a_beam_step_without_a_beam_is_refused_before_anything_runs():
    with pytest.raises(ValueError, match="beam_number"):
        LAYOUT.step_values("convert_to_dicom")


def test_stage_failed_carries_its_fields_across_pickling():
    exc = StageFailed("run_moqui_sim", "exit code 75: busy", beam=2, exit_code=75,
                      log_path="/r/logs/run_moqui_sim-beam2.log", detail="tail line")
    back = pickle.loads(pickle.dumps(exc))
    assert (back.step, back.beam, back.exit_code, back.log_path, back.detail) == \
        ("run_moqui_sim", 2, 75, "/r/logs/run_moqui_sim-beam2.log", "tail line")
    assert back.summary == "run_moqui_sim [beam 2] failed: exit code 75: busy; full log: " \
                           "/r/logs/run_moqui_sim-beam2.log"
    assert str(back) == back.summary + "\ntail line"
    failed = pickle.loads(pickle.dumps(CaseFailed("c1", [back.summary])))
    assert failed.failures == [back.summary] and str(failed).startswith("case c1: ")


def test_outcomes_are_plain_pickleable_values():
    sim = SimulationOutcome(beam=2, gpu=1, seconds=3.5, waited=0.1)
    assert pickle.loads(pickle.dumps(sim)) == sim


def test_stage_identity_is_the_task_name_the_inputs_and_the_recipe():
    from types import SimpleNamespace

    from flows.caching import StageIdentity

    def key(policy, task_name, **inputs):
        ctx = SimpleNamespace(task=SimpleNamespace(name=task_name))
        return policy.compute_key(ctx, inputs, {})

    plain = StageIdentity()
    assert key(plain, "upload", case_id="c1", digest="d") == \
        key(plain, "upload", case_id="c1", digest="d")
    assert key(plain, "upload", case_id="c1", digest="d") != \
        key(plain, "download", case_id="c1", digest="d")
    assert key(plain, "upload", case_id="c1", digest="d") != \
        key(plain, "upload", case_id="c1", digest="e")
    local = StageIdentity(exclude=("case_dir",))
    assert key(local, "upload", case_dir="/a", digest="d") == \
        key(local, "upload", case_dir="/b", digest="d")
    recipes = iter(["one", "two"])
    with_recipe = StageIdentity(recipe=lambda inputs: next(recipes))
    assert key(with_recipe, "simulate", beam=2) != key(with_recipe, "simulate", beam=2)


# ------------------------------------------------------- one remote folder per flow run
RUN_A = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"
RUN_B = "7c6d5e4f-3a2b-4c1d-8e0f-123456789abc"


def test_the_short_run_id_is_the_flow_run_ids_first_8_hex_digits_and_nothing_else():
    from flows.naming import short_run_id

    assert short_run_id(RUN_A) == short_run_id(UUID(RUN_A)) == "0f1e2d3c"
    with pytest.raises(ValueError):
        short_run_id("../../etc")
    with pytest.raises(ValueError, match="short flow run id"):
        RemoteLayout("/work/mqi", "case-7", "../x")  # never a path that widens rm -rf


def test_each_flow_run_of_a_case_works_in_its_own_folder_and_the_same_run_in_the_same():
    cfg = load_config(DEFAULT_PATH)
    root = cfg.paths.remote_work_root.rstrip("/")
    a, b = remote_layout(cfg, "case-7", RUN_A), remote_layout(cfg, "case-7", RUN_B)
    assert a.work_dir == f"{root}/case-7/run-0f1e2d3c" and a.case_root == f"{root}/case-7"
    assert b.work_dir == f"{root}/case-7/run-7c6d5e4f" and b.case_root == a.case_root
    assert remote_layout(cfg, "case-7", UUID(RUN_A)) == a  # the hook gets a UUID
    # every path a stage or a template uses is inside the run's own folder
    for layout in (a, b):
        paths = [*layout.step_values(GPU_STEP, BEAM, 0).values(),
                 *layout.moqui_values(BEAM, 0).values(), layout.pid_file("upload"),
                 layout.dicom_root, layout.pid_dir]
        inside = [p for p in paths if isinstance(p, str) and p.startswith("/")]
        assert inside and all(p.startswith(layout.work_dir) for p in inside), inside


def stage_keys(flow_run_id: str) -> dict[str, str]:
    """The cache key of every cached remote stage of flow run ``flow_run_id``, for one
    case content, step and beam, with the inputs process_case gives them."""
    from flows import stages

    cfg = load_config(DEFAULT_PATH)
    layout = remote_layout(cfg, "case-7", flow_run_id)
    common = {"case_id": "case-7", "digest": "d" * 64, "flow_run_id": flow_run_id}

    def command(step: str) -> str:
        return render_step_command(cfg, step, layout.step_values(
            step, BEAM if step in BEAM_STEPS else None))

    calls = {
        stages.upload_stage: {"case_dir": "/scan/case-7", "remote_dir": layout.case_dir},
        stages.case_step: {"step": "run_interpreter", "command": command("run_interpreter")},
        stages.beam_step: {"step": "convert_to_dicom", "beam_number": BEAM.number,
                           "command": command("convert_to_dicom")},
        stages.simulate_beam: {"beam": BEAM},
        stages.download_stage: {"steps": ("run_interpreter", GPU_STEP, "convert_to_dicom"),
                                "beams": (BEAM.number,)},
    }
    keys = {}
    for task, own in calls.items():
        inputs = {**common, **own}
        inspect.signature(task.fn).bind(**inputs)  # exactly the task's parameters
        ctx = SimpleNamespace(task=task)
        keys[task.name] = task.cache_policy.compute_key(ctx, inputs, {})
    return keys


def test_another_flow_run_of_the_same_case_takes_no_cached_stage_and_a_retry_takes_all(
        monkeypatch):
    """A retry of the same flow run (`mqi rerun`) resumes from the result store; a new
    flow run of the same content starts in an empty folder, so it must not."""
    from flows.stages import simulation_recipe

    monkeypatch.setenv(ENV_VAR, str(DEFAULT_PATH))  # what simulation_recipe loads
    first, again, other = stage_keys(RUN_A), stage_keys(RUN_A), stage_keys(RUN_B)
    assert set(first) == {"upload", "case-step", "beam-step", "simulate", "download"}
    assert first == again
    assert all(first[name] != other[name] for name in first), \
        [name for name in first if first[name] == other[name]]
    # the simulation's recipe itself (command and input file) is the run's own too
    recipes = {run: simulation_recipe({"case_id": "case-7", "flow_run_id": run, "beam": BEAM})
               for run in (RUN_A, RUN_B)}
    assert "/run-0f1e2d3c/" in recipes[RUN_A] and "/run-7c6d5e4f/" in recipes[RUN_B]
    assert recipes[RUN_A].replace("run-0f1e2d3c", "run-7c6d5e4f") == recipes[RUN_B]


def test_cleaning_a_run_removes_its_folder_and_the_cases_only_once_no_run_is_left(tmp_path):
    a = RemoteLayout(str(tmp_path), "case-7", "0f1e2d3c")
    b = RemoteLayout(str(tmp_path), "case-7", "7c6d5e4f")
    for layout in (a, b):
        Path(layout.dicom_dir(3)).mkdir(parents=True)
        Path(layout.pid_file("upload")).parent.mkdir()
        Path(layout.pid_file("upload")).write_text("123")
    first = subprocess.run(["sh", "-c", a.removal_command()], check=False)
    assert first.returncode != 0  # the case's folder stays: b is still in it
    assert not Path(a.work_dir).exists() and Path(b.dicom_dir(3)).is_dir()
    subprocess.run(["sh", "-c", b.removal_command()], check=True)
    assert list(tmp_path.iterdir()) == []
