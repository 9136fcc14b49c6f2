"""When a stage counts as done already: its identity, as a Prefect cache policy.

A stage is the same work — safe to take from the result store instead of
running again — when its task name and its inputs are the same: the case id,
the case content's digest, the flow run's id (which names the run's own remote
work folder, flows/layout.py: a retry of the same flow run finds its earlier
stages, another run of the same case finds none), the beam, and the command it
would run. Tasks take
names, digests and rendered commands (never live clients), so every input is
hashable and the policy never silently turns caching off. Work whose exact
command is only known at run time (a simulation's GPU index) adds a *recipe*:
the command and input file rendered with a placeholder where the GPU goes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext


@dataclass
class StageIdentity(CachePolicy):
    """Cache key = task name + every input not excluded + the recipe, if any.

    Attributes:
        exclude: Inputs that do not change what the stage does (e.g. the local
            folder a case is read from: its content digest is an input already).
        recipe: Renders what the stage will run from its inputs, for stages whose
            command is completed only at run time.
    """

    exclude: tuple[str, ...] = ()
    recipe: Callable[[Mapping[str, Any]], str] | None = None

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any],
                    flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        parts = [task_ctx.task.name]
        parts += [f"{name}={inputs[name]!r}" for name in sorted(inputs)
                  if name not in self.exclude]
        if self.recipe is not None:
            parts.append(self.recipe(inputs))
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()
