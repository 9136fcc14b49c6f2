"""Checks of schedule settings (a cron line, a time zone) at load time.

Prefect checks a schedule only when a deployment is registered, long after
`mqi config check` said the file was valid; these checks say it at once, with
the key. Nothing here imports Prefect: the configuration is loaded before the
commands set Prefect's own settings.
"""

from __future__ import annotations

import re
import zoneinfo

# (name, lowest, highest, names allowed in place of numbers)
_FIELDS = (
    ("minute", 0, 59, ()),
    ("hour", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct",
                      "nov", "dec")),
    ("day of week", 0, 7, ("sun", "mon", "tue", "wed", "thu", "fri", "sat")),
)
_ITEM = re.compile(r"^(\*|[a-z0-9]+(?:-[a-z0-9]+)?)(?:/(\d+))?$")


def check_cron(line: str) -> str:
    """``line`` when it is a five-field cron line (minute hour day month weekday).

    Lists, ranges, steps and month/weekday names are allowed; Prefect's random and
    hashed forms (``H``, ``R``) and the ``@daily`` shorthands are not.

    Raises:
        ValueError: Saying which field is wrong.
    """
    fields = line.split()
    if len(fields) != len(_FIELDS):
        raise ValueError(f"a cron line has 5 fields (minute hour day month weekday); "
                         f"{line!r} has {len(fields)}")
    for text, (name, low, high, names) in zip(fields, _FIELDS, strict=True):
        for item in text.lower().split(","):
            match = _ITEM.match(item)
            if match is None or match.group(2) == "0":
                raise ValueError(f"bad {name} field {text!r} in {line!r}")
            if match.group(1) == "*":
                continue
            for part in match.group(1).split("-"):
                value = names.index(part) + low if part in names else \
                    int(part) if part.isdigit() else None
                if value is None or not low <= value <= high:
                    raise ValueError(f"bad {name} field {text!r} in {line!r} "
                                     f"({name} is {low}-{high})")
    return line


def check_timezone(name: str) -> str:
    """``name`` when it is an IANA time zone (``UTC``, ``Europe/Zurich``).

    Raises:
        ValueError: No such zone.
    """
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not an IANA time zone (such as UTC or "
                         f"Europe/Zurich)") from None
    return name
