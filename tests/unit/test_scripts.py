"""Which file runs: the single-sub-folder descent, the Linux host table and Kudu's priority."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from webjobsd.discovery.scripts import HOSTS, find_script_dir, select_command
from webjobsd.model import ScriptCommand

ELF = b"\x7fELF\x02\x01\x01\x00" + bytes(8) + b"\x02\x00\x3e\x00"  # x86-64 ET_EXEC header start
EVERY_INTERPRETER = frozenset({"pwsh", "bash", "python3", "php", "node", "java"})


def fake_which(available: Iterable[str] = EVERY_INTERPRETER) -> Callable[[str], str | None]:
    names = frozenset(available)

    def which(name: str) -> str | None:
        return f"/opt/bin/{name}" if name in names else None

    return which


def make_files(folder: Path, names: Iterable[str]) -> None:
    """`name` is a plain text file; `name*` (trailing star) is an executable ELF file."""
    for spec in names:
        native = spec.endswith("*")
        path = folder / spec.removesuffix("*")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(ELF if native else b"echo hi\n")
        if native:
            path.chmod(0o755)


def select(job: Path, available: Iterable[str] = EVERY_INTERPRETER) -> ScriptCommand | None:
    return select_command(job, which=fake_which(available))


def chosen(job: Path, available: Iterable[str] = EVERY_INTERPRETER) -> tuple[str, str] | None:
    command = select(job, available)
    return None if command is None else (command.run_command, command.host)


# --- priority -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # Every run.* of any type beats every non-run file.
        (["a.py", "run.sh"], ("run.sh", "bash")),
        (["a.sh", "run.js"], ("run.js", "node")),
        (["a.ps1", "b.sh", "run.jar"], ("run.jar", "java")),
        (["worker*", "run.py"], ("run.py", "python")),
        # Among run files, the host order decides.
        (["run.sh", "run.py", "run.js", "run.ps1", "run.php"], ("run.ps1", "pwsh")),
        (["run.js", "run.php", "run.py"], ("run.py", "python")),
        (["run.js", "run.php"], ("run.php", "php")),
        (["run.jar", "run.js"], ("run.js", "node")),
        (["run.sh", "run*"], ("run", "native")),
        (["run.ps1", "run.exe*"], ("run.exe", "native")),
        (["run.exe*", "run*"], ("run", "native")),
        # Without a run file, the first host (then first file) with a match is the fallback.
        (["a.php", "b.py"], ("b.py", "python")),
        (["z.sh", "a.py"], ("z.sh", "bash")),
        (["a.js", "b.jar"], ("a.js", "node")),
        (["job.sh", "worker*"], ("worker", "native")),
        (["b.sh", "a.sh", "c.sh"], ("a.sh", "bash")),
        (["b.sh", "A.sh"], ("A.sh", "bash")),
        (["_x.sh", "a.sh"], ("a.sh", "bash")),  # NTFS order: upper-case form, "A" < "_"
        # Case-insensitive names and extensions.
        (["RUN.SH", "a.py"], ("RUN.SH", "bash")),
        (["Run.Py", "run.js"], ("Run.Py", "python")),
        (["job.SH"], ("job.SH", "bash")),
        (
            ["Job file with long name and accents àéè.sh"],
            ("Job file with long name and accents àéè.sh", "bash"),
        ),
        (["my job.py", "other.txt"], ("my job.py", "python")),
        # Not runnable on Linux, or not scripts at all.
        (["run.cmd", "run.bat", "x.sh"], ("x.sh", "bash")),
        (["run.cmd"], None),
        (["run.bat", "job.cmd"], None),
        (["settings.job", "README.md", "run.txt"], None),
        ([], None),
        (["run.sh.swp", "run.sh~"], None),
        # .NET extension rules: from the last dot, dot-files included.
        (["archive.tar.sh"], ("archive.tar.sh", "bash")),
        ([".sh"], (".sh", "bash")),
        # A leading dash would be read as an interpreter option.
        (["-x.sh", "y.sh"], ("y.sh", "bash")),
        (["-run.sh"], None),
        (["-tool*"], ("-tool", "native")),
    ],
)
def test_priority(tmp_path: Path, files: list[str], expected: tuple[str, str] | None) -> None:
    make_files(tmp_path, files)
    assert chosen(tmp_path) == expected


def test_only_the_top_level_is_scanned(tmp_path: Path) -> None:
    make_files(tmp_path, ["lib/run.sh", "lib/helper.py", "notes.txt"])
    assert chosen(tmp_path) is None


def test_host_table_order_matches_kudu() -> None:
    assert [host.name for host in HOSTS] == [
        "native",
        "pwsh",
        "bash",
        "python",
        "php",
        "node",
        "java",
    ]


# --- interpreters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "available", "expected"),
    [
        (["run.sh", "a.py"], EVERY_INTERPRETER - {"bash"}, ("a.py", "python")),
        (["run.ps1", "run.sh"], EVERY_INTERPRETER - {"pwsh"}, ("run.sh", "bash")),
        (["a.py", "b.php"], {"php"}, ("b.php", "php")),
        (["run.js"], {"nodejs"}, ("run.js", "node")),
        (["run.js"], {"node", "nodejs"}, ("run.js", "node")),
        (["run.sh", "run.py"], set(), None),
        (["run*", "run.sh"], set(), ("run", "native")),  # native needs no interpreter
    ],
)
def test_missing_interpreter_skips_the_host(
    tmp_path: Path,
    files: list[str],
    available: set[str],
    expected: tuple[str, str] | None,
) -> None:
    make_files(tmp_path, files)
    assert chosen(tmp_path, available) == expected


@pytest.mark.parametrize(
    ("script", "available", "argv_prefix", "in_place"),
    [
        ("run.sh", {"bash"}, ("/opt/bin/bash",), False),
        ("run.py", {"python3"}, ("/opt/bin/python3",), False),
        ("run.php", {"php"}, ("/opt/bin/php",), False),
        ("run.js", {"node"}, ("/opt/bin/node",), True),
        ("run.js", {"nodejs"}, ("/opt/bin/nodejs",), True),
        ("run.jar", {"java"}, ("/opt/bin/java", "-jar"), False),
        ("run.ps1", {"pwsh"}, ("/opt/bin/pwsh", "-NoLogo", "-NonInteractive", "-File"), False),
        ("run*", set(), (), False),
    ],
)
def test_command_line(
    tmp_path: Path,
    script: str,
    available: set[str],
    argv_prefix: tuple[str, ...],
    in_place: bool,
) -> None:
    make_files(tmp_path, [script])
    command = select(tmp_path, available)
    assert command is not None
    name = script.removesuffix("*")
    assert command.argv_prefix == argv_prefix
    assert command.in_place_by_default is in_place
    expected_target = name if argv_prefix else f"./{name}"
    assert command.argv(("x",)) == (*argv_prefix, expected_target, "x")


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")
def test_default_which_resolves_the_interpreter(tmp_path: Path) -> None:
    make_files(tmp_path, ["run.sh"])
    command = select_command(tmp_path)
    assert command is not None
    assert command.argv_prefix == (shutil.which("bash"),)


# --- native executables ---------------------------------------------------------------------


def write(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    path.chmod(mode)


@pytest.mark.parametrize(
    ("name", "data", "mode", "native"),
    [
        ("run", ELF, 0o755, True),
        ("run", ELF, 0o700, True),
        ("run", ELF, 0o701, True),  # any exec bit counts
        ("run", b"\x7fELF", 0o755, True),  # only the magic is checked
        ("run", ELF, 0o644, False),  # no exec bit
        ("run", b"#!/bin/sh\necho hi\n", 0o755, False),  # a script with a shebang
        ("run.exe", b"MZ\x90\x00", 0o755, False),  # a Windows executable
        ("run", b"\x7fEL", 0o755, False),  # too short
        ("run", b"", 0o755, False),
        ("libworker.so", ELF, 0o755, False),  # shared libraries often carry the exec bit
        ("libworker.so.1.2", ELF, 0o755, False),
        ("worker", ELF, 0o755, True),
        ("worker.bin", ELF, 0o755, True),
    ],
)
def test_native_detection(tmp_path: Path, name: str, data: bytes, mode: int, native: bool) -> None:
    write(tmp_path / name, data, mode)
    command = select(tmp_path)
    assert (command is not None and command.host == "native") is native


@pytest.mark.skipif(not Path("/bin/true").is_file(), reason="no /bin/true")
def test_a_real_executable_is_native(tmp_path: Path) -> None:
    shutil.copy2(Path("/bin/true").resolve(), tmp_path / "run")
    (tmp_path / "run").chmod(0o755)
    command = select(tmp_path)
    assert command == ScriptCommand(script_dir="", script_name="run", host="native", argv_prefix=())


def test_shared_library_does_not_shadow_a_script(tmp_path: Path) -> None:
    write(tmp_path / "libdep.so", ELF, 0o755)
    make_files(tmp_path, ["job.py"])
    assert chosen(tmp_path) == ("job.py", "python")


# --- the script folder ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "script_dir", "run_command"),
    [
        (["inner/run.sh", "inner/test.sh"], "inner", "inner/run.sh"),
        (["a/b/c/job.py"], "a/b/c", "a/b/c/job.py"),
        (["a/b/run.sh", "a/b/sub/x.py"], "a/b", "a/b/run.sh"),
        (["dossier à/run.sh"], "dossier à", "dossier à/run.sh"),
        (["run.sh", "inner/run.py"], "", "run.sh"),
        (["inner/run.sh", "other/run.py"], "", None),  # two folders: no descent, no top file
        (["inner/run.sh", ".DS_Store"], "", None),  # every entry counts, hidden ones too
        (["inner/run.sh", "inner~"], "", None),  # editor temp files count too
    ],
)
def test_single_sub_folder_descent(
    tmp_path: Path, files: list[str], script_dir: str, run_command: str | None
) -> None:
    make_files(tmp_path, files)
    assert find_script_dir(tmp_path) == (tmp_path / script_dir if script_dir else tmp_path)
    command = select(tmp_path)
    if run_command is None:
        assert command is None
    else:
        assert command is not None
        assert (command.script_dir, command.run_command) == (script_dir, run_command)


def test_descent_stops_at_an_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert find_script_dir(tmp_path) == tmp_path / "a" / "b"
    assert select(tmp_path) is None


def test_descent_does_not_follow_a_directory_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    make_files(outside, ["run.sh"])
    job = tmp_path / "job"
    job.mkdir()
    (job / "linked").symlink_to(outside, target_is_directory=True)
    assert find_script_dir(job) == job
    assert select(job) is None


def test_descent_does_not_loop_on_a_link_to_an_ancestor(tmp_path: Path) -> None:
    job = tmp_path / "job"
    (job / "inner").mkdir(parents=True)
    (job / "inner" / "again").symlink_to(job, target_is_directory=True)
    assert find_script_dir(job) == job / "inner"


def test_missing_job_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        find_script_dir(tmp_path / "gone")
    with pytest.raises(FileNotFoundError):
        select(tmp_path / "gone")


# --- links and special files ----------------------------------------------------------------


def test_link_outside_the_job_folder_is_skipped(tmp_path: Path) -> None:
    make_files(tmp_path, ["elsewhere/run.sh"])
    job = tmp_path / "job"
    make_files(job, ["other.sh"])
    (job / "run.sh").symlink_to(tmp_path / "elsewhere" / "run.sh")
    assert chosen(job) == ("other.sh", "bash")


def test_link_inside_the_job_folder_is_used(tmp_path: Path) -> None:
    job = tmp_path / "job"
    make_files(job, ["scripts/real.sh", "other.sh"])
    (job / "run.sh").symlink_to(Path("scripts") / "real.sh")
    assert chosen(job) == ("run.sh", "bash")


def test_link_in_a_descended_folder_to_a_sibling_is_used(tmp_path: Path) -> None:
    job = tmp_path / "job"
    make_files(job, ["inner/lib/real.py"])
    (job / "inner" / "run.py").symlink_to(Path("lib") / "real.py")
    command = select(job)
    assert command is not None
    assert command.run_command == "inner/run.py"


def test_job_folder_reached_through_a_link_works(tmp_path: Path) -> None:
    real = tmp_path / "real"
    make_files(real, ["job.sh"])
    (real / "run.sh").symlink_to("job.sh")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert chosen(link) == ("run.sh", "bash")


def test_dangling_link_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "run.sh").symlink_to(tmp_path / "missing.sh")
    make_files(tmp_path, ["b.sh"])
    assert chosen(tmp_path) == ("b.sh", "bash")


def test_link_to_an_outside_native_executable_is_skipped(tmp_path: Path) -> None:
    make_files(tmp_path, ["bin/tool*"])
    job = tmp_path / "job"
    make_files(job, ["job.py"])
    (job / "run").symlink_to(tmp_path / "bin" / "tool")
    assert chosen(job) == ("job.py", "python")


def test_non_regular_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "run.sh").mkdir()
    os.mkfifo(tmp_path / "run.py")
    make_files(tmp_path, ["z.php"])
    assert stat.S_ISFIFO((tmp_path / "run.py").lstat().st_mode)
    assert chosen(tmp_path) == ("z.php", "php")
