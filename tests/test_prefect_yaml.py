"""prefect.yaml mirrors deployments/definitions.py: one description of each deployment."""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml
from prefect.flows import Flow

from deployments.definitions import DEPLOYMENTS, WORK_POOL

REPO = Path(__file__).resolve().parents[1]


def test_prefect_yaml_mirrors_the_definitions():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["pull"] == [], "null adds a pull step into the deployer's folder"
    in_yaml = {d["name"]: d for d in spec["deployments"]}
    assert set(in_yaml) == {d.name for d in DEPLOYMENTS}
    for d in DEPLOYMENTS:
        entry = in_yaml[d.name]
        assert entry["entrypoint"] == d.entrypoint
        assert " ".join(entry["description"].split()) == d.description
        assert entry.get("parameters", {}) == d.parameters
        assert tuple(entry.get("tags", ())) == d.tags
        assert entry["work_pool"]["name"] == WORK_POOL
        assert entry["work_pool"]["work_queue_name"] == d.work_queue
        assert not d.schedule or entry.get("schedules"), d.name


def test_every_entrypoint_is_a_module_path_to_a_flow_taking_those_parameters():
    for d in DEPLOYMENTS:
        assert ".py" not in d.entrypoint, "a file path would depend on the worker's folder"
        flow = d.load()
        assert isinstance(flow, Flow), d.entrypoint
        assert set(d.parameters) <= set(inspect.signature(flow.fn).parameters)
