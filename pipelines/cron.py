"""Validate the cron expressions KFP recurring runs accept: 6 fields, seconds first.

KFP's scheduler uses robfig/cron with a seconds field, so standard 5-field cron is off by one field:
`0 3 * * *` would be read as "second 0, minute 3, every hour...". A 5-field expression is refused with
the 6-field form that was most likely meant.
"""

from __future__ import annotations

import re

from vembed.errors import ConfigError

FIELDS = (
    ("seconds", 0, 59),
    ("minutes", 0, 59),
    ("hours", 0, 23),
    ("day of month", 1, 31),
    ("month", 1, 12),
    ("day of week", 0, 6),
)
MONTHS = "JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split()
WEEKDAYS = "SUN MON TUE WED THU FRI SAT".split()
DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_EVERY = re.compile(r"^@every\s+(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")


def _value(text: str, index: int) -> int:
    name, low, high = FIELDS[index]
    upper = text.upper()
    if index == 4 and upper in MONTHS:
        return MONTHS.index(upper) + 1
    if index == 5 and upper in WEEKDAYS:
        return WEEKDAYS.index(upper)
    if not text.isdigit():
        raise ValueError(f"{name}: {text!r} is not a number")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{name}: {value} is outside {low}-{high}")
    return value


def _check_field(field: str, index: int) -> None:
    name = FIELDS[index][0]
    for part in field.split(","):
        if not part:
            raise ValueError(f"{name}: empty list item in {field!r}")
        base, _, step = part.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"{name}: step {step!r} must be a positive integer")
        if base in ("*", "?"):
            if base == "?" and index not in (3, 5):
                raise ValueError(f"{name}: '?' is only allowed in day of month and day of week")
            continue
        low_text, dash, high_text = base.partition("-")
        low = _value(low_text, index)
        if dash and _value(high_text, index) < low:
            raise ValueError(f"{name}: range {base!r} runs backwards")


def validate_cron(expression: str) -> str:
    """Return the normalised expression, or raise ConfigError explaining what is wrong."""
    expr = " ".join(expression.split())
    if expr.startswith("@"):
        if expr in DESCRIPTORS or _EVERY.match(expr):
            return expr
        raise ConfigError(f"--cron {expression!r}: unknown descriptor; use one of {', '.join(DESCRIPTORS)} or '@every 6h'")
    fields = expr.split(" ")
    if len(fields) == 5:
        raise ConfigError(
            f"--cron {expression!r} has 5 fields (standard cron), but KFP cron has 6 with seconds first; "
            f"for the same schedule write '0 {expr}'"
        )
    if len(fields) != 6:
        raise ConfigError(
            f"--cron {expression!r} has {len(fields)} fields; KFP cron needs 6: "
            "seconds minutes hours day-of-month month day-of-week, e.g. '0 0 3 * * *' for 03:00 every day"
        )
    for i, field in enumerate(fields):
        try:
            _check_field(field, i)
        except ValueError as e:
            raise ConfigError(f"--cron {expression!r}: {e}") from None
    return expr
