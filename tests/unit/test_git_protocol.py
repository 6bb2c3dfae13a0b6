"""The few pieces of git's protocol we write ourselves (pkt-lines, side-band progress, the
client's capabilities), the deployment branch rules and the repository's creation, as tables
and with the real `git`."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from webjobsd.deploy.git import (
    Repository,
    advertisement_header,
    deployment_branch,
    parse_first_command,
    pkt_line,
    progress_packets,
    server_root_name,
)
from webjobsd.site import SiteLayout

ZERO = "0" * 40
SHA = "1" * 40


def test_pkt_lines_and_the_service_header() -> None:
    assert pkt_line(b"") == b"0004"
    assert pkt_line(b"a\n") == b"0006a\n"
    assert advertisement_header("git-upload-pack") == b"001e# service=git-upload-pack\n0000"
    with pytest.raises(ValueError):
        pkt_line(b"x" * 65517)


def test_progress_is_band_two_one_packet_per_line_split_to_the_band_size() -> None:
    assert progress_packets("one\ntwo", 65520) == b"0009\x02one\n0009\x02two\n"
    long = progress_packets("x" * 2000, 1000)
    packets = []
    while long:
        size = int(long[:4], 16)
        packets.append(long[:size])
        long = long[size:]
    assert [len(p) for p in packets] == [1000, 1000, 16]
    assert all(p[4:5] == b"\x02" for p in packets)
    assert b"".join(p[5:] for p in packets) == b"x" * 2000 + b"\n"


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        ("report-status side-band-64k quiet agent=git/2.39", 65520),
        ("report-status side-band", 1000),
        ("report-status", 0),
    ],
)
def test_the_side_band_the_client_asked_for(caps: str, expected: int) -> None:
    first = pkt_line(f"{ZERO} {SHA} refs/heads/master\0{caps}".encode())
    assert parse_first_command(first[:10]) is None  # not a whole packet yet
    commands = parse_first_command(first + b"0000PACK...")
    assert commands is not None
    assert commands.side_band_max == expected
    empty = parse_first_command(b"0000")
    assert empty is not None
    assert empty.side_band_max == 0


@pytest.mark.parametrize(
    ("setting", "branches", "expected"),
    [
        (None, [], "master"),
        (None, ["master"], "master"),
        (None, ["main"], "main"),  # master never pushed, main was
        (None, ["main", "master"], "master"),
        ("", ["main"], "main"),
        ("main", ["master"], "main"),  # set: no fallback
        ("release ", ["main", "release"], "release"),
        ("master", ["main"], "master"),
    ],
)
def test_deployment_branch(setting: str | None, branches: list[str], expected: str) -> None:
    refs = {f"refs/heads/{name}": SHA for name in branches}
    assert deployment_branch(setting, refs) == expected


def test_server_root_name(tmp_path: Path) -> None:
    layout = SiteLayout.build(tmp_path / "mysite", instance_id="i", temp_root=tmp_path / "t")
    assert server_root_name(None, layout) == "mysite"
    assert server_root_name("", layout) == "mysite"
    assert server_root_name("shop", layout) == "shop"
    assert server_root_name("shop_staging", layout) == "shop"


def _config(repo: Path, key: str) -> str:
    result = subprocess.run(
        ["git", "config", key], cwd=repo, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_the_repository_is_created_complete_and_once(tmp_path: Path) -> None:
    repository = Repository(tmp_path / "site" / "repository")
    assert not repository.exists
    assert repository.refs() == {}
    repository.ensure()
    assert repository.exists
    assert _config(repository.path, "receive.denyCurrentBranch") == "ignore"
    assert _config(repository.path, "core.autocrlf") == "false"
    assert _config(repository.path, "core.bare") == "false"
    repository.ensure()  # idempotent
    assert [p.name for p in repository.path.parent.iterdir()] == ["repository"]


def test_a_folder_without_git_becomes_the_repository_and_keeps_its_files(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "repository"
    folder.mkdir()
    (folder / "index.html").write_text("old\n")
    repository = Repository(folder)
    repository.ensure()
    assert repository.exists
    assert (folder / "index.html").read_text() == "old\n"
    assert _config(folder, "receive.denyCurrentBranch") == "ignore"
