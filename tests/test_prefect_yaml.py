"""prefect.yaml names flows that exist, with parameters they take."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import yaml
from prefect.flows import Flow

REPO = Path(__file__).resolve().parents[1]


def test_every_deployment_entrypoint_is_a_flow_with_those_parameters():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["deployments"], "no deployments"
    for deployment in spec["deployments"]:
        path, _, name = deployment["entrypoint"].partition(":")
        assert (REPO / path).exists(), path
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, name)
        assert isinstance(flow, Flow), deployment["entrypoint"]
        accepted = inspect.signature(flow.fn).parameters
        assert set(deployment.get("parameters", {})) <= set(accepted)
        assert deployment["work_pool"]["name"]
