"""Summaries of py-spy's raw (collapsed-stack) profiles of the daemon, from `--profile`.

python3 -m bench.profiles FILE...   # prints the hottest functions of each profile
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

_LINE_NUMBER = re.compile(r":\d+\)$")


def _frame(raw: str) -> str:
    """`func (path/to/module.py:123)` -> `func (module.py)`: one entry per function."""
    name, _, where = raw.partition(" (")
    where = _LINE_NUMBER.sub(")", "(" + where) if where else ""
    return f"{name} {Path(where.strip('()')).name}".strip() if where else name


def parse(path: Path) -> tuple[Counter[str], Counter[str], int]:
    """Self samples and inclusive samples per function, and the total number of samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(raw) for raw in stack.split(";") if not raw.startswith("thread (")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return own, inclusive, total


def summary(path: Path, top: int = 12) -> str:
    own, inclusive, total = parse(path)
    if not total:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples (busy time only)", "  self%  function"]
    lines += [f"  {100 * n / total:5.1f}  {name}" for name, n in own.most_common(top)]
    lines.append("  incl%  function")
    lines += [f"  {100 * n / total:5.1f}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(summary(Path(argument)))
