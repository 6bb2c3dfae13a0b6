"""Which files are noise: editor swap files, upload temp files, VCS folders.

Noise never counts toward a job's fingerprint, is never copied into a working copy, and its events
never wake anyone, so saving a file in vim or an upload in progress does not restart a job and
half-uploaded bytes never run. `settings.job` and `disable.job` are never noise, whatever pattern
they might match.

Upload temp names are noise for the content, but a temp file being written still counts toward
"the folder is settling" (see `is_upload_temp_name`): a tool writing `.big.bin.Xy12Ab` before
renaming it into place is in the middle of a deployment.

Decisions:
* rsync's temp name is `.` + the file's name + `.` + exactly six random characters from
  [A-Za-z0-9] (mkstemp's alphabet). The pattern is that exact shape, so `.env`, `.config` or
  `.npmrc` are job files; the price is that a hidden job file of that very shape (`.x.backup`)
  is taken for an rsync temp file and ignored.
* lftp's `xfer:use-temp-file` writes `.in.NAME` (its `xfer:temp-file-name` is `.in.*` as of 4.9;
  older docs say `.in.*.`), proftpd's `HiddenStores` `.in.NAME.`: one pattern, `.in.*`; pure-ftpd
  writes `.pureftpd-upload.*`; WinSCP `NAME.filepart`; browsers `*.part`, `*.partial`,
  `*.crdownload`. vsftpd, curl and scp write the real name in place: nothing to match, the quiet
  period is what protects those.
* NFS silly-renamed files (`.nfs` + 24 hex digits) and FUSE's `.fuse_hidden*` are deleted files
  still held open: never job content.
"""

from __future__ import annotations

import fnmatch
import re

ALWAYS_RELEVANT = frozenset({"settings.job", "disable.job"})
IGNORED_DIRECTORIES = frozenset({".git", ".hg", ".svn", "__pycache__", ".rsync-partial"})

_UPLOAD_TEMP_PATTERNS = (
    "*.part",
    "*.partial",
    "*.filepart",  # WinSCP
    "*.crdownload",
    ".in.*",  # lftp (xfer:use-temp-file, `.in.NAME`), proftpd (HiddenStores, `.in.NAME.`)
    ".pureftpd-upload.*",
)
_UPLOAD_TEMP_REGEXES = (
    r"\..+\.[A-Za-z0-9]{6}",  # rsync: .NAME.XXXXXX
)
_OTHER_PATTERNS = (
    "*.swp",
    "*.swo",
    "*.swx",
    "*~",
    ".#*",
    "#*#",
    "*.tmp",
    "*.temp",
    ".~lock.*",
    ".goutputstream-*",
    "4913",  # vim's probe file
    ".DS_Store",
    "*.pyc",
    ".fuse_hidden*",
)
_OTHER_REGEXES = (r"\.nfs[0-9a-f]{24}",)


def _compile(patterns: tuple[str, ...], regexes: tuple[str, ...]) -> re.Pattern[str]:
    # One regex for all: the scan asks this for every file of every job at every rescan.
    alternatives = [fnmatch.translate(pattern) for pattern in patterns]
    alternatives += [rf"(?s:{regex})\Z" for regex in regexes]
    return re.compile("|".join(f"(?:{alternative})" for alternative in alternatives))


_UPLOAD_TEMP = _compile(_UPLOAD_TEMP_PATTERNS, _UPLOAD_TEMP_REGEXES)
_NOISE = _compile(_UPLOAD_TEMP_PATTERNS + _OTHER_PATTERNS, _UPLOAD_TEMP_REGEXES + _OTHER_REGEXES)


def is_ignored_name(name: str) -> bool:
    if name in ALWAYS_RELEVANT:
        return False
    return _NOISE.match(name) is not None


def is_upload_temp_name(name: str) -> bool:
    """A name an upload tool writes before renaming the file to its real name."""
    if name in ALWAYS_RELEVANT:
        return False
    return _UPLOAD_TEMP.match(name) is not None


def is_ignored_relative_path(parts: tuple[str, ...]) -> bool:
    """A path inside a job folder, as its parts: ignored if any folder or the name is noise."""
    if not parts:
        return False
    if any(part in IGNORED_DIRECTORIES for part in parts[:-1]):
        return True
    return is_ignored_name(parts[-1])
