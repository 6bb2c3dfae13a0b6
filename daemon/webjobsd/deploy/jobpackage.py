"""Deploying one job from a package: a zip, or a single script (KUDU-DEPLOY.md Part B §1.2, §8.2).

Used by `PUT /api/{type}webjobs/{name}` and by a `NAME.zip` dropped into a kind folder
(`deploy.drops`), so that both deploy a job exactly alike.

The package is extracted (or the single file placed) into a staging folder beside the jobs root's
kind folders, checked for a runnable script, and only then swapped into place with renames on
the same file system (`deploy.staging`), so the watcher never sees half a job and a refused
package leaves the existing job untouched. Like Kudu, a successful deploy replaces the whole
folder (an old `settings.job` or `disable.job` goes too).

Nothing here tells the jobs side: the new folder is renamed into place in whole, which discovery
takes as an arrival. The API asks discovery to look at once as well (its answer shows the job);
a dropped zip needs no answer and leaves it to the watcher.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Final

from webjobsd.deploy.staging import Staging
from webjobsd.discovery.catalog import NO_RUNNABLE_SCRIPT
from webjobsd.discovery.scripts import select_command
from webjobsd.limits import UploadLimits
from webjobsd.model import JobKey
from webjobsd.refusal import Refusal
from webjobsd.site import SiteLayout

_SCRIPT_SUFFIXES: Final = (".sh", ".py", ".php", ".js", ".ps1", ".jar")


def _place_single_file(package: Path, folder: Path, filename: str) -> None:
    target = folder / filename
    # A copy, not a rename: the upload folder may be on another file system (tmpfs, a volume).
    shutil.copyfile(package, target)
    with open(target, "rb") as handle:
        head = handle.read(4)
    executable = filename.lower().endswith(_SCRIPT_SUFFIXES) or head == b"\x7fELF"
    target.chmod(0o755 if executable else 0o644)


def deploy_job_package(
    layout: SiteLayout,
    limits: UploadLimits,
    key: JobKey,
    package_path: Path,
    is_zip: bool,
    filename: str,
) -> None:
    """Make the package job `key`'s folder, whole, or raise a `Refusal` and change nothing.

    `is_zip`: extract the archive; otherwise the package is the one file `filename`. Blocking:
    run it in a thread. An `OSError` (disk full, the folder not writable) changes nothing either.
    """
    staging = Staging.of(layout)
    new = staging.new_folder()
    try:
        if is_zip:
            # Imported on first use (zipfile with it): see http/lazy.py's rule.
            from webjobsd.deploy.archive import extract_zip

            extract_zip(package_path, new, limits)
        else:
            _place_single_file(package_path, new, filename)
        if select_command(new) is None:
            raise Refusal(400, NO_RUNNABLE_SCRIPT)
        staging.swap_into_place(new, layout.job_dir(key))
    finally:
        if new.exists():
            shutil.rmtree(new, ignore_errors=True)
        staging.release()
