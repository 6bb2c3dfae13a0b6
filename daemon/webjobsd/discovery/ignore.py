"""Which files are noise: editor swap files, FTP partial uploads, VCS folders.

They never count toward a job's fingerprint and their events never wake anyone, so saving a file
in vim or an FTP upload in progress does not restart a job. `settings.job` and `disable.job` are
never noise, whatever pattern they might match.
"""

from __future__ import annotations

import fnmatch

ALWAYS_RELEVANT = frozenset({"settings.job", "disable.job"})
IGNORED_DIRECTORIES = frozenset({".git", ".hg", ".svn", "__pycache__"})
_IGNORED_PATTERNS = (
    "*.swp",
    "*.swo",
    "*.swx",
    "*~",
    ".#*",
    "#*#",
    "*.tmp",
    "*.temp",
    "*.part",
    "*.partial",
    "*.filepart",
    "*.crdownload",
    ".~lock.*",
    ".goutputstream-*",
    "4913",  # vim's probe file
    ".DS_Store",
    "*.pyc",
)


def is_ignored_name(name: str) -> bool:
    if name in ALWAYS_RELEVANT:
        return False
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in _IGNORED_PATTERNS)


def is_ignored_relative_path(parts: tuple[str, ...]) -> bool:
    """A path inside a job folder, as its parts: ignored if any folder or the name is noise."""
    if not parts:
        return False
    if any(part in IGNORED_DIRECTORIES for part in parts[:-1]):
        return True
    return is_ignored_name(parts[-1])
