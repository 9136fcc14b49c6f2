"""Command and input-file templates: ``{name}`` placeholders, checked at load time.

A template may use only plain ``{name}`` fields (no attribute access, indexing,
conversions or format specs), so that what a template can reach is exactly the
set of values the code offers. Shell command templates have every value passed
through ``shlex.quote``; nothing substituted is ever interpreted by the shell.
"""

from __future__ import annotations

import shlex
import string
from collections.abc import Iterable, Mapping

from config.errors import MqiError

_FORMATTER = string.Formatter()


class TemplateError(MqiError, ValueError):
    """A template is malformed, uses an unknown placeholder, or lacks a value."""


def placeholders(template: str) -> list[str]:
    """Return the placeholder names a template uses, in order of first use.

    Raises:
        TemplateError: Unbalanced braces, or a field that is not a plain name.
    """
    try:
        parsed = list(_FORMATTER.parse(template))
    except ValueError as exc:
        raise TemplateError(f"malformed template ({exc}); write a literal brace as {{{{ or }}}}")\
            from exc
    names: list[str] = []
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + \
                (f":{spec}" if spec else "") + "}"
            raise TemplateError(f"placeholder {shown} is not a plain {{name}}")
        if field not in names:
            names.append(field)
    return names


def check_placeholders(template: str, known: Iterable[str]) -> None:
    """Raise TemplateError naming the first placeholder not in ``known``."""
    known = set(known)
    for name in placeholders(template):
        if name not in known:
            raise TemplateError(
                f"unknown placeholder {{{name}}} (known: {', '.join(sorted(known))})")


def render(template: str, values: Mapping[str, object], *, quote: bool) -> str:
    """Fill a template's placeholders.

    Args:
        template: The template text.
        values: A value for each placeholder the template uses (extra values are fine).
        quote: Shell-quote every value (for command templates).

    Raises:
        TemplateError: A placeholder has no value.
    """
    needed = placeholders(template)
    missing = [n for n in needed if n not in values]
    if missing:
        raise TemplateError(f"no value for placeholder(s) {', '.join(missing)}")
    filled = {n: shlex.quote(str(values[n])) if quote else str(values[n]) for n in needed}
    return template.format_map(filled)
