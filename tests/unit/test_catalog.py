"""The catalog over real folders: specs, fingerprints, settling, kept settings, bad names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from webjobsd.discovery.catalog import NO_RUNNABLE_SCRIPT, Catalog
from webjobsd.model import JobKey, JobKind

APP = JobKey(JobKind.CONTINUOUS, "app")


def make(root: Path, rel: str, text: str = "echo hi\n", age_s: float = 60.0) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    old = time.time() - age_s
    os.utime(path, (old, old))
    return path


def catalog(root: Path) -> Catalog:
    return Catalog(root, settle_s=1.0, which=lambda name: f"/usr/bin/{name}")


def test_discovers_jobs_of_both_kinds(tmp_path: Path) -> None:
    make(tmp_path, "continuous/app/run.sh")
    make(tmp_path, "triggered/report/run.py")
    cat = catalog(tmp_path)
    result = cat.refresh()
    assert result.changed == {APP, JobKey(JobKind.TRIGGERED, "report")}
    assert cat.specs[APP].command.run_command == "run.sh"
    assert cat.refresh().changed == set()


def test_noise_does_not_change_the_fingerprint_but_code_does(tmp_path: Path) -> None:
    script = make(tmp_path, "continuous/app/run.sh")
    cat = catalog(tmp_path)
    cat.refresh()
    first = cat.specs[APP].fingerprint
    for noise in (".run.sh.swp", "run.sh~", "upload.part", ".git/HEAD", "4913"):
        make(tmp_path, f"continuous/app/{noise}")
    assert cat.refresh().changed == set()
    script.write_text("echo changed\n")
    old = time.time() - 30
    os.utime(script, (old, old))
    assert cat.refresh().changed == {APP}
    assert cat.specs[APP].fingerprint != first


def test_disable_job_toggles_the_flag_not_the_fingerprint(tmp_path: Path) -> None:
    make(tmp_path, "continuous/app/run.sh")
    cat = catalog(tmp_path)
    cat.refresh()
    fingerprint = cat.specs[APP].fingerprint
    make(tmp_path, "continuous/app/disable.job", "")
    assert cat.refresh().changed == {APP}
    assert cat.specs[APP].disabled
    assert cat.specs[APP].fingerprint == fingerprint


def test_settings_change_the_fingerprint_and_broken_settings_keep_the_last_good(
    tmp_path: Path,
) -> None:
    make(tmp_path, "continuous/app/run.sh")
    settings = make(tmp_path, "continuous/app/settings.job", '{"stopping_wait_time": 9}')
    cat = catalog(tmp_path)
    cat.refresh()
    good = cat.specs[APP]
    assert good.settings.stopping_wait_time_s == 9
    settings.write_text("{broken")
    os.utime(settings, (time.time() - 30, time.time() - 30))
    assert cat.refresh().changed == set()
    assert cat.specs[APP] == good


def test_a_folder_being_written_is_settling(tmp_path: Path) -> None:
    make(tmp_path, "continuous/app/run.sh", age_s=0.0)
    cat = catalog(tmp_path)
    result = cat.refresh()
    assert result.settling == {APP}
    assert APP not in cat.specs


def test_no_runnable_script_is_no_job_and_an_error(tmp_path: Path) -> None:
    make(tmp_path, "continuous/app/readme.txt")
    make(tmp_path, "continuous/win/run.cmd")
    cat = catalog(tmp_path)
    cat.refresh()
    assert not cat.specs
    assert cat.errors[APP] == NO_RUNNABLE_SCRIPT


def test_invalid_names_are_skipped(tmp_path: Path) -> None:
    for name in (".hidden", "with space", "x" * 65, "semi;colon"):
        make(tmp_path, f"continuous/{name}/run.sh")
    make(tmp_path, "continuous/ok-name_1.2/run.sh")
    cat = catalog(tmp_path)
    cat.refresh()
    assert [key.name for key in cat.specs] == ["ok-name_1.2"]


def test_a_removed_folder_is_dropped(tmp_path: Path) -> None:
    script = make(tmp_path, "continuous/app/run.sh")
    cat = catalog(tmp_path)
    cat.refresh()
    script.unlink()
    script.parent.rmdir()
    assert cat.refresh({APP}).changed == {APP}
    assert not cat.specs


def test_a_file_being_written_is_hashed_only_once_the_settle_cap_is_reached(
    tmp_path: Path,
) -> None:
    """A growing upload is not read at every look while its folder settles; past the cap the
    folder is taken as it is, hashed in full."""
    make(tmp_path, "continuous/app/run.sh")
    upload = tmp_path / "continuous/app/big.bin"
    upload.write_bytes(b"x" * 100_000)
    clock = [time.time()]
    cat = Catalog(
        tmp_path,
        settle_s=1.0,
        settle_cap_s=5.0,
        which=lambda name: f"/usr/bin/{name}",
        clock=lambda: clock[0],
    )
    start = clock[0]
    for offset in (0.0, 1.5, 3.0, 4.5):  # within the cap
        clock[0] = start + offset
        os.utime(upload, (clock[0], clock[0]))  # still being written
        hashed = cat.hashes.files_hashed
        assert cat.refresh().settling == {APP}
        assert cat.hashes.files_hashed <= hashed + 1, "the upload was read while settling"
    clock[0] = start + 6.0
    os.utime(upload, (clock[0], clock[0]))
    hashed = cat.hashes.files_hashed
    assert cat.refresh().changed == {APP}
    assert cat.hashes.files_hashed == hashed + 2  # run.sh is still racy: read again too


_OUT_OF_DESCRIPTORS = """
import json, os, resource, sys
from pathlib import Path
from webjobsd.discovery.catalog import Catalog

catalog = Catalog(Path(sys.argv[1]), settle_s=0.0, which=lambda name: "/usr/bin/" + name)
catalog.refresh()
before = {str(key): spec.fingerprint for key, spec in catalog.specs.items()}
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
fillers = []
try:
    while True:
        fillers.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
starved = catalog.refresh()
during = {str(key): spec.fingerprint for key, spec in catalog.specs.items()}
for fd in fillers:
    os.close(fd)
after = catalog.refresh()
print(json.dumps({
    "before": before, "during": during, "starved_changed": sorted(map(str, starved.changed)),
    "after": {str(key): spec.fingerprint for key, spec in catalog.specs.items()},
    "after_changed": sorted(map(str, after.changed)),
}))
"""


def test_a_folder_read_failing_for_lack_of_descriptors_keeps_every_job(tmp_path: Path) -> None:
    """1. two jobs known (a script and a native executable)  2. the process runs out of file
    descriptors (a real EMFILE, in a child process) and rescans: nothing is dropped or changed
    3. descriptors back: nothing changed either."""
    make(tmp_path, "continuous/app/run.sh")
    make(tmp_path, "continuous/app/lib/helper.sh")
    native = make(tmp_path, "triggered/native/run")
    native.write_bytes(b"\x7fELF" + b"\0" * 60)
    native.chmod(0o755)
    old = time.time() - 60
    os.utime(native, (old, old))
    done = subprocess.run(
        [sys.executable, "-c", _OUT_OF_DESCRIPTORS, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(report["before"]) == {"continuous/app", "triggered/native"}
    assert report["during"] == report["before"]
    assert report["starved_changed"] == []
    assert report["after"] == report["before"]
    assert report["after_changed"] == []


def stamping_catalog(root: Path, which: dict[str, str]) -> Catalog:
    """A catalog that stamps its looks (poll mode), with a clock 5 s ahead: the files just
    written are past the racy window, so their folders get a stamp at once."""
    cat = Catalog(root, settle_s=1.0, which=which.get, clock=lambda: time.time() + 5)
    cat.stamp_looks = True
    return cat


def test_a_quick_look_takes_an_unchanged_folder_as_it_was_and_sees_any_change(
    tmp_path: Path,
) -> None:
    """1. a quick look at a folder that did not change is the last look itself  2. an edit
    that keeps the size and puts the old mtime back is still seen (its ctime moved) and
    changes the fingerprint."""
    script = make(tmp_path, "continuous/app/run.sh", "echo v1\n")
    cat = stamping_catalog(tmp_path, {"bash": "/bin/bash"})
    cat.refresh()
    first = cat.specs[APP].fingerprint
    [look] = cat.observe([APP])
    assert look.stamp
    [again] = cat.observe([APP], quick=True)
    assert again is look
    assert cat.apply([again], confirm=True).changed == set()
    before = script.stat()
    script.write_text("echo v2\n")
    os.utime(script, ns=(before.st_atime_ns, before.st_mtime_ns))
    # A ctime in the same tick as the write would keep the identity: the stamp is then empty
    # (racy) and the look reads the folder, so either way the change is seen.
    [changed] = cat.observe([APP], quick=True)
    assert changed is not look
    assert cat.apply([changed]).changed == {APP}
    assert cat.specs[APP].fingerprint != first


def test_an_interpreter_installed_later_is_found_by_a_full_look_not_a_quick_one(
    tmp_path: Path,
) -> None:
    """What stat cannot see waits for the next full look (every rescan_s in poll mode)."""
    make(tmp_path, "continuous/app/run.js")
    paths: dict[str, str] = {}
    cat = stamping_catalog(tmp_path, paths)
    cat.refresh()
    assert cat.errors[APP] == NO_RUNNABLE_SCRIPT
    cat.observe([APP])
    paths["node"] = "/usr/bin/node"
    assert cat.apply(cat.observe([APP], quick=True)).changed == set()
    assert cat.apply(cat.observe([APP])).changed == {APP}
    assert cat.specs[APP].command.host == "node"
