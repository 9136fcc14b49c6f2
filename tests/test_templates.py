"""Templates and command rendering: every value quoted, nothing a case brings is executed."""

from __future__ import annotations

import subprocess

import pytest

from config import DEFAULT_PATH, DEMO_PATH, load_config
from config.templates import TemplateError, check_placeholders, placeholders, render
from flows.commands import CaseIdError, render_step_command, validate_case_id

NASTY = [
    "a b",
    "$(touch /tmp/mqi-pwned)",
    "`id`",
    "x; rm -rf /",
    "it's",
    '"double"',
    "new\nline",
    "back\\slash",
    "*",
    "-n",
    "ünïcødé",
    "",
]


def test_placeholders_in_order_without_duplicates():
    assert placeholders("{a} {b} {a} {{literal}}") == ["a", "b"]


@pytest.mark.parametrize("template", ["{a.b}", "{a[0]}", "{a!r}", "{a:>10}", "{}", "{0}"])
def test_only_plain_names_are_allowed(template):
    with pytest.raises(TemplateError, match="not a plain"):
        placeholders(template)


def test_unbalanced_braces():
    with pytest.raises(TemplateError, match="malformed"):
        placeholders("{a")


def test_unknown_placeholder_lists_the_known_ones():
    with pytest.raises(TemplateError, match=r"unknown placeholder \{c\} \(known: a, b\)"):
        check_placeholders("{a} {c}", {"a", "b"})


def test_missing_value():
    with pytest.raises(TemplateError, match="no value for placeholder"):
        render("{a} {b}", {"a": 1}, quote=True)


@pytest.mark.parametrize("value", NASTY)
def test_quoted_values_reach_the_command_literally(value):
    command = render("printf '%s' {v}", {"v": value}, quote=True)
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    assert out.stdout == value


def test_render_step_command_quotes_values_and_tool_words():
    cfg = load_config(DEMO_PATH)
    command = render_step_command(cfg, "run_moqui_sim", {
        "case_id": "1.2.840.1", "input_file": "/work/case 1/beam;1.in", "gpu_id": 1})
    assert command == "python3 -m demo.simulators.tps_env '/work/case 1/beam;1.in'"


def test_render_step_command_runs_exactly_the_intended_argv(tmp_path):
    cfg = load_config(DEFAULT_PATH)
    values = {"case_id": "case-1", "case_dir": "/x/$(id) dir", "output_dir": "/o/`id`",
              "work_dir": "/w", "log_dir": "/l"}
    command = render_step_command(cfg, "run_interpreter", values)
    argv = subprocess.run(["sh", "-c", "printf '%s\\n' " + command.split(" ", 1)[1]],
                          capture_output=True, text=True, check=True).stdout.splitlines()
    assert argv == ["/opt/mqi/interpreter/main_cli.py", "--logdir", "/x/$(id) dir",
                    "--outputdir", "/o/`id`"]


def test_render_step_command_refuses_values_the_step_does_not_take():
    cfg = load_config(DEFAULT_PATH)
    with pytest.raises(TemplateError, match="takes no value for gpu_id"):
        render_step_command(cfg, "run_interpreter", {"case_id": "c1", "gpu_id": 0})


@pytest.mark.parametrize("case_id", ["..", ".", "a/b", "../etc", "a b", "x\n", "", "-rf",
                                     "a" * 129, "$(id)"])
def test_bad_case_ids_are_refused_before_use(case_id):
    cfg = load_config(DEFAULT_PATH)
    with pytest.raises(CaseIdError, match="does not match cases.id_pattern"):
        render_step_command(cfg, "run_interpreter", {"case_id": case_id})


@pytest.mark.parametrize("case_id", ["1.2.840.113619.2.55", "PAT_0001", "case-7"])
def test_good_case_ids_pass(case_id):
    assert validate_case_id(case_id, load_config(DEFAULT_PATH).cases.id_pattern) == case_id
