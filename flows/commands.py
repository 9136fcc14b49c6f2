"""Rendering a workflow step's remote command for one case (and beam).

Every value that goes into a command — case id, paths, beam number, GPU index,
each word of a tool — is shell-quoted, so no case folder name or plan content
can ever be read by the remote shell as code. The case id is checked against
``cases.id_pattern`` before it is used for anything.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping

from config import MqiConfig, MqiError
from config.models import step_placeholders
from config.templates import TemplateError, render


class CaseIdError(MqiError, ValueError):
    """A case id that does not match the configured pattern."""


def validate_case_id(case_id: str, pattern: str) -> str:
    """Return ``case_id`` if the whole of it matches ``pattern``.

    Raises:
        CaseIdError: Naming the id (repr'd, so control characters show) and the pattern.
    """
    if not isinstance(case_id, str) or not re.fullmatch(pattern, case_id):
        raise CaseIdError(f"case id {case_id!r} does not match cases.id_pattern {pattern!r}")
    return case_id


def render_step_command(cfg: MqiConfig, step: str, values: Mapping[str, object]) -> str:
    """The shell command of ``step`` with ``values`` and the configured tools filled in.

    Args:
        cfg: The configuration.
        step: A key of ``remote_commands``.
        values: Runtime values; must include ``case_id``.

    Raises:
        KeyError: No command for ``step``.
        CaseIdError: ``values["case_id"]`` fails the pattern.
        TemplateError: A value the template needs is missing, or a value is offered
            for a placeholder this step may not use.
    """
    template = cfg.remote_commands[step]
    validate_case_id(str(values.get("case_id", "")), cfg.cases.id_pattern)
    allowed = step_placeholders(step, cfg.tools)
    stray = sorted(set(values) - allowed)
    if stray:
        raise TemplateError(f"step {step!r} takes no value for {', '.join(stray)}")
    quoted: dict[str, str] = {k: shlex.quote(str(v)) for k, v in values.items()}
    for name, tool in cfg.tools.items():
        words = tool if isinstance(tool, list) else [tool]
        quoted[name] = " ".join(shlex.quote(w) for w in words)
    return render(template, quoted, quote=False)
