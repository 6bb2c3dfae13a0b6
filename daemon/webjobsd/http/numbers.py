"""Whole numbers read from requests (headers, query strings): one parser for every route.

Python refuses to convert a string of more than 4,300 digits to an int (a ValueError that
reached clients as a 500), and `str.isdigit` / `\\d` accept digits from other scripts that
`int` reads too. So a number here is ASCII digits only, and its length is checked before any
conversion: more significant digits than `MAX_DIGITS` is read as `TOO_LARGE`, a value larger
than any file size, offset or count this daemon deals with. Callers compare with their own
bounds, so "too large" gets the answer HTTP asks of that route: an unsatisfiable `Range`
start is a 416, a `Range` end past the file is the end of the file, a `tail=` over its limit
is a 400.
"""

from __future__ import annotations

from typing import Final

MAX_DIGITS: Final = 18  # 10**18 - 1 fits an int64 (2**63 - 1 has 19 digits)
TOO_LARGE: Final = 10**MAX_DIGITS


def whole_number(text: str) -> int | None:
    """`text` (surrounding spaces allowed) as a non-negative int, `TOO_LARGE` when it has more
    than `MAX_DIGITS` significant digits, None when it is not ASCII digits."""
    digits = text.strip()
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    significant = digits.lstrip("0")
    if len(significant) > MAX_DIGITS:
        return TOO_LARGE
    return int(significant or "0")
