"""Hostile uploads and paths against the real daemon (in-process, with auth, on a loopback port,
driven by a real client).

test_api_deploy.py and test_http_files.py already cover the zip route's archive checks and the
basic refusals on the deploy route; this adds what they do not: every archive attack on the job
deploy route (`PUT /api/{type}webjobs/NAME`), hostile job names in the URL, hostile file names
in `Content-Disposition`, bodies over the cap or cut short on that route, encoded traversal on
the vfs and zip routes of the daemon as shipped, and symbolic links leading out of the site.

Every refusal is checked from the disk as well as from the answer: the whole temporary tree
(site, temp folder and a folder outside both) is the same before and after, apart from the
daemon's own bookkeeping (`Guard`), the staging and upload folders are empty, and the job that
was deployed before still runs, in the same process.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import stat
import struct
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.helpers import Site, leaders, wait_for
from tests.test_api_jobs import CREDENTIALS, api, basic
from tests.test_http_files import duplicate_zip

LIMITS = {
    "max_upload_bytes": 2 * 1024 * 1024,
    "max_extracted_bytes": 4 * 1024 * 1024,
    "max_archive_entries": 1000,
}
KEEP = {"run.sh": "echo original\nexec sleep 600\n"}
ZIP_HEADERS = {
    "Content-Type": "application/zip",
    "Content-Disposition": "attachment; filename=job.zip",
}


def make_zip(entries: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_with_info(info: zipfile.ZipInfo, data: bytes = b"x") -> bytes:
    """A runnable job plus one entry with hand-made metadata."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("run.sh", b"echo ok\n")
        archive.writestr(info, data)
    return buffer.getvalue()


RUN = {"run.sh": b"echo ok\n"}


class Guard:
    """The tree under the test's tmp_path, to tell what a request wrote and where.

    The daemon's own bookkeeping changes on its own (the running job's log and status under
    `data/`, its working copy under `temp/jobs/`): there only names are compared, and the
    temporary files of its atomic writes are skipped. The staging folder and the upload folder
    may appear on the first upload; they must be empty.
    """

    def __init__(self, site: Site) -> None:
        self.site = site
        self.root = site.root.parent
        self.outside = self.root / "outside"
        self.outside.mkdir(exist_ok=True)
        (self.outside / "secret.txt").write_text("secret")
        self.staging = site.jobs / ".webjobsd-staging"
        self.uploads = site.temp / "uploads"
        self.volatile = (site.root / "data", site.temp / "jobs")

    def snapshot(self) -> dict[str, str]:
        found: dict[str, str] = {}
        for folder, dirs, files in os.walk(self.root):
            for name in dirs + files:
                path = Path(folder) / name
                if path in (self.staging, self.uploads):
                    continue
                volatile = any(v in path.parents for v in self.volatile)
                if volatile and name.startswith(".") and name.endswith(".tmp"):
                    continue  # an atomic write of the daemon's in progress
                rel = str(path.relative_to(self.root))
                if path.is_symlink():
                    found[rel] = "link -> " + os.readlink(path)
                elif path.is_dir():
                    found[rel] = "folder"
                elif volatile:
                    found[rel] = "file"
                else:
                    found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        return found

    def leftovers(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.root))
            for folder in (self.staging, self.uploads)
            if folder.exists()
            for p in folder.iterdir()
        )

    def changes(self, before: dict[str, str]) -> dict[str, tuple[str | None, str | None]]:
        after = self.snapshot()
        return {
            key: (before.get(key), after.get(key))
            for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)
        }


@pytest.fixture
async def deployed(site: Site) -> AsyncIterator[tuple[Guard, aiohttp.ClientSession, str, int]]:
    """A daemon with a running continuous job `keep` and a triggered job `task`."""
    site.write_job("continuous", "keep", KEEP)
    site.write_job("triggered", "task", {"run.sh": "echo task\n"})
    guard = Guard(site)
    async with api(site, **LIMITS) as (_daemon, session, base):
        [pid] = await wait_for(lambda: leaders(site, "keep"), what="keep running")
        # Settled: the daemon's own files about the job are all written.
        record = site.root / "data" / "webjobsd" / "processes" / "test01" / "continuous.keep.json"
        await wait_for(
            lambda: (
                site.status("keep") == "Running"
                and "INFO] original" in site.job_log("keep")
                and record.exists()
            ),
            what="keep Running and recorded",
        )
        yield guard, session, base, pid


async def refused(
    session: aiohttp.ClientSession, method: str, url: str | URL, **kwargs: Any
) -> tuple[int, str]:
    """Status and JSON message of an answer that must be a refusal."""
    async with session.request(method, url, allow_redirects=False, **kwargs) as response:
        body = await response.read()
        assert 400 <= response.status < 500, (response.status, body[:300])
        assert response.content_type == "application/json", body[:300]
        message = (await response.json())["message"]
        assert isinstance(message, str) and message
        return response.status, message


def assert_untouched(guard: Guard, before: dict[str, str], pid: int) -> None:
    assert guard.changes(before) == {}
    assert guard.leftovers() == []
    assert leaders(guard.site, "keep") == [pid], "the deployed job was restarted or stopped"
    assert guard.site.status("keep") == "Running"
    assert (guard.outside / "secret.txt").read_text() == "secret"


# --- archives on the deploy route --------------------------------------------------------------


def bomb() -> bytes:
    """8 KiB that inflate to 8 MiB, twice the extraction limit."""
    return make_zip({"run.sh": b"echo bomb\n", "zeros.bin": bytes(8 * 1024 * 1024)})


def lying_bomb() -> bytes:
    """Headers claim 100 bytes; the data inflate to 8 MiB."""
    data = bytearray(make_zip({"run.sh": b"echo\n", "big.bin": bytes(8 * 1024 * 1024)}))
    local = data.index(b"big.bin") - 30  # the local header's name follows its 30 fixed bytes
    central = data.rindex(b"big.bin") - 46  # the central record's follows its 46
    assert data[local : local + 4] == b"PK\x03\x04" and data[central : central + 4] == b"PK\x01\x02"
    struct.pack_into("<I", data, local + 22, 100)
    struct.pack_into("<I", data, central + 24, 100)
    return bytes(data)


def thousands_of_entries() -> bytes:
    return make_zip({"run.sh": b"echo\n", **{f"d/{i:05d}.txt": b"" for i in range(5000)}})


def nul_name() -> bytes:
    return make_zip({**RUN, "evilXname.sh": b"x"}).replace(b"evilXname.sh", b"evil\x00name.sh")


def special_entry(kind: int, name: str = "node") -> bytes:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (kind | 0o644) << 16
    return zip_with_info(info, b"")


def symlink_entry(name: str, target: str) -> bytes:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_with_info(info, target.encode())


def overlapping(copies: int = 20) -> bytes:
    """CVE-2024-0450's shape: many central records sharing one local entry's data."""
    data = make_zip({"e00.bin": bytes(150 * 1024)})
    central_at = data.index(b"PK\x01\x02")
    end_at = data.index(b"PK\x05\x06")
    record = data[central_at:end_at]
    records = b"".join(record.replace(b"e00.bin", f"e{i:02d}.bin".encode()) for i in range(copies))
    end = bytearray(data[end_at:])
    struct.pack_into("<HHII", end, 8, copies, copies, len(records), central_at)
    return data[:central_at] + records + bytes(end)


ARCHIVES = [
    pytest.param(bomb, 413, "bytes", id="zip-bomb"),
    pytest.param(lying_bomb, 400, "Not a valid zip archive", id="lying-size-bomb"),
    pytest.param(overlapping, 400, "overlaps", id="overlapping-entries"),
    pytest.param(thousands_of_entries, 413, "entries", id="thousands-of-entries"),
    pytest.param(nul_name, 400, "NUL", id="nul-in-entry-name"),
    pytest.param(lambda: make_zip({**RUN, "a/../../escape.sh": b"x"}), 400, "..", id="nested-slip"),
    pytest.param(lambda: make_zip({**RUN, "..\\escape.sh": b"x"}), 400, "..", id="backslash-slip"),
    pytest.param(lambda: make_zip({**RUN, "./../escape.sh": b"x"}), 400, "..", id="dot-slip"),
    pytest.param(lambda: make_zip({**RUN, "C:/escape.sh": b"x"}), 400, "drive", id="drive-letter"),
    pytest.param(
        lambda: make_zip({**RUN, "\\\\server\\share\\escape.sh": b"x"}),
        400,
        "absolute",
        id="unc-path",
    ),
    pytest.param(
        lambda: symlink_entry("lib", str(Path("/tmp"))), 400, "symbolic link", id="link-to-folder"
    ),
    pytest.param(lambda: special_entry(stat.S_IFIFO), 400, "FIFO", id="fifo"),
    pytest.param(lambda: special_entry(stat.S_IFCHR), 400, "device", id="char-device"),
    pytest.param(duplicate_zip, 400, "more than once", id="duplicate-run-sh"),
    pytest.param(lambda: make_zip({**RUN, "x" * 256: b"x"}), 400, "longer", id="long-name"),
    pytest.param(lambda: make_zip({"readme.txt": b"no script"}), 400, "runnable", id="no-script"),
]


@pytest.mark.parametrize(("archive", "status", "fragment"), ARCHIVES)
async def test_hostile_archive_on_the_deploy_route_is_refused_and_changes_nothing(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int],
    archive: Any,
    status: int,
    fragment: str,
) -> None:
    guard, session, base, pid = deployed
    body = archive()
    assert len(body) < LIMITS["max_upload_bytes"]  # the archive itself is refused, not its size
    before = guard.snapshot()
    for kind, name in (("continuous", "keep"), ("triggered", "task"), ("continuous", "fresh")):
        got, message = await refused(
            session, "PUT", f"{base}/api/{kind}webjobs/{name}", data=body, headers=ZIP_HEADERS
        )
        assert (got, fragment in message) == (status, True), (kind, name, message)
        assert_untouched(guard, before, pid)
    assert not guard.site.job_dir("continuous", "fresh").exists()


async def test_entry_names_are_never_url_decoded(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int],
) -> None:
    """`%2F` in an entry name is three characters of a file name, not a separator: the job
    gets files by those odd names, in its own folder, and nothing lands anywhere else."""
    guard, session, base, pid = deployed
    before = guard.snapshot()
    names = ["..%2F..%2Fescape.sh", "%2e%2e%2fescape.sh", "a%5C..%5Cb.sh"]
    body = make_zip({"run.sh": b"echo ok\n", **dict.fromkeys(names, b"echo x\n")})
    async with session.put(
        f"{base}/api/triggeredwebjobs/odd", data=body, headers=ZIP_HEADERS
    ) as response:
        assert response.status == 200, await response.text()
    folder = guard.site.job_dir("triggered", "odd")
    assert sorted(p.name for p in folder.iterdir()) == sorted([*names, "run.sh"])
    new = [key for key, (old, _new) in guard.changes(before).items() if old is None]
    allowed = (
        str(folder.relative_to(guard.root)),
        str(guard.site.data_dir("triggered", "odd").relative_to(guard.root)),
    )
    assert [key for key in new if not key.startswith(allowed)] == []
    assert guard.leftovers() == []
    assert leaders(guard.site, "keep") == [pid]


# --- hostile job names in the URL ---------------------------------------------------------------

HOSTILE_NAMES = [
    "..",
    "%2e%2e",
    "%2E%2E",
    ".%2e",
    "a%2F..%2Fb",
    "..%2F..%2Fescape",
    "%2e%2e%2fescape",
    "%2E%2E%2F%2E%2E%2Fsite",
    "%252e%252e",
    "%252e%252e%252fescape",
    "a%00b",
    "%00",
    ".hidden",
    "a%5C..%5Cb",
    "a%2Fb",
    "x" * 65,
    "%C3%A9t%C3%A9",
    "%EF%BC%8E%EF%BC%8E",
    "job%20",
    "../triggeredwebjobs/escape",
    "%2e%2e/escape",
]


async def test_hostile_job_names_in_the_url_are_refused(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int],
) -> None:
    """A valid upload under a name that is not a job name: refused, nothing written. The URL
    is sent as written (`..`, `%2F`, `%00` and double encoding reach the daemon verbatim)."""
    guard, session, base, pid = deployed
    body = make_zip({"run.sh": b"echo planted\n"})
    before = guard.snapshot()
    for kind in ("continuous", "triggered"):
        for name in HOSTILE_NAMES:
            job = f"{base}/api/{kind}webjobs/{name}"
            for method, url, kwargs in (
                ("PUT", job, {"data": body, "headers": ZIP_HEADERS}),
                ("DELETE", job, {}),
                ("PUT", f"{job}/settings", {"json": {"stopping_wait_time": 1}}),
            ):
                status, message = await refused(session, method, URL(url, encoded=True), **kwargs)
                assert status in (400, 404), (method, url, status, message)
            assert_untouched(guard, before, pid)
    for kind in ("continuous", "triggered"):
        assert sorted(p.name for p in (guard.site.jobs / kind).iterdir()) == (
            ["keep"] if kind == "continuous" else ["task"]
        )


# --- hostile file names in Content-Disposition -------------------------------------------------


@pytest.mark.parametrize(
    ("disposition", "placed"),
    [
        ('attachment; filename="../../escape.sh"', "escape.sh"),
        ("attachment; filename=..\\..\\escape.sh", "escape.sh"),
        ('attachment; filename="..\\\\..\\\\escape.sh"', "escape.sh"),
        ('attachment; filename="/etc/cron.d/escape.sh"', "escape.sh"),
        ("attachment; filename=..%2F..%2Fescape.sh", "..%2F..%2Fescape.sh"),
        ('attachment; filename="%2e%2e%2fescape.sh"', "%2e%2e%2fescape.sh"),
    ],
)
async def test_file_names_are_reduced_to_a_name_inside_the_job_folder(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int], disposition: str, placed: str
) -> None:
    """Kudu drops the directory part of the file name and never decodes it; whatever the name
    says, the one file lands in the new job's folder and nowhere else."""
    guard, session, base, pid = deployed
    before = guard.snapshot()
    async with session.put(
        f"{base}/api/triggeredwebjobs/other",
        data=b"echo single\n",
        headers={"Content-Disposition": disposition},
    ) as response:
        assert response.status == 200, await response.text()
    folder = guard.site.job_dir("triggered", "other")
    assert [p.name for p in folder.iterdir()] == [placed]
    new = [key for key, (old, _new) in guard.changes(before).items() if old is None]
    allowed = (
        str(folder.relative_to(guard.root)),
        str(guard.site.data_dir("triggered", "other").relative_to(guard.root)),
    )
    assert [key for key in new if not key.startswith(allowed)] == []
    assert guard.leftovers() == []
    assert leaders(guard.site, "keep") == [pid]


@pytest.mark.parametrize(
    "disposition",
    [
        'attachment; filename=".."',
        'attachment; filename="."',
        'attachment; filename="../"',
        "attachment; filename*=UTF-8''..%2F..%2Fescape.sh",
        'attachment; filename="' + "x" * 300 + '.sh"',
        "attachment",
    ],
)
async def test_file_names_that_name_nothing_are_refused(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int], disposition: str
) -> None:
    guard, session, base, pid = deployed
    before = guard.snapshot()
    for name in ("keep", "other"):
        status, _message = await refused(
            session,
            "PUT",
            f"{base}/api/continuouswebjobs/{name}",
            data=b"echo single\n",
            headers={"Content-Disposition": disposition},
        )
        assert status == 400
        assert_untouched(guard, before, pid)


async def test_nul_in_the_file_name_is_refused(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int],
) -> None:
    """No client library sends a NUL in a header: a raw socket. The HTTP parser refuses it."""
    guard, _session, base, pid = deployed
    before = guard.snapshot()
    url = URL(base)
    assert url.host is not None and url.port is not None
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        auth = basic(CREDENTIALS["WEBJOBSD_USERNAME"], CREDENTIALS["WEBJOBSD_PASSWORD"])
        writer.write(
            b"PUT /api/continuouswebjobs/keep HTTP/1.1\r\nHost: x\r\n"
            + f"Authorization: {auth}\r\n".encode()
            + b'Content-Disposition: attachment; filename="run\x00.sh"\r\n'
            + b"Content-Length: 5\r\nConnection: close\r\n\r\necho\n"
        )
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    assert reply.startswith(b"HTTP/1.1 400") or reply.startswith(b"HTTP/1.0 400"), reply[:200]
    assert_untouched(guard, before, pid)


# --- bodies over the cap, or cut short ---------------------------------------------------------


async def chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield b"\0" * size
        sent += size


async def test_bodies_over_the_cap_are_refused_on_every_deploy_form(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int],
) -> None:
    guard, session, base, pid = deployed
    cap = LIMITS["max_upload_bytes"]
    before = guard.snapshot()
    single = {"Content-Disposition": "attachment; filename=run.sh"}
    for url in (f"{base}/api/continuouswebjobs/keep", f"{base}/api/triggeredwebjobs/task"):
        for headers in (ZIP_HEADERS, single):
            # Chunked: no Content-Length, the cap is counted on the bytes as they come. (Just
            # over the cap: aiohttp drains the rest of a refused body for up to 10 s, and a
            # client still sending megabytes would keep that server task alive past the test.)
            status, message = await refused(
                session, "PUT", url, data=chunks(cap + 256 * 1024), headers=headers
            )
            assert status == 413 and "limit" in message
            assert_untouched(guard, before, pid)
            # Declared: refused from the header, before the body is read.
            status, message = await refused(
                session, "PUT", url, data=io.BytesIO(bytes(cap + 1)), headers=headers
            )
            assert status == 413 and "limit" in message
            assert_untouched(guard, before, pid)


async def test_a_client_hanging_up_mid_upload_leaves_no_temp_file(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int],
) -> None:
    guard, session, base, pid = deployed
    before = guard.snapshot()
    url = URL(base)
    assert url.host is not None and url.port is not None
    auth = basic(CREDENTIALS["WEBJOBSD_USERNAME"], CREDENTIALS["WEBJOBSD_PASSWORD"])
    for path in ("/api/continuouswebjobs/keep", "/api/triggeredwebjobs/new"):
        _reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\n".encode()
            + b"Content-Type: application/zip\r\n"
            + b"Content-Disposition: attachment; filename=job.zip\r\n"
            + b"Content-Length: 1000000\r\n\r\n"
            + b"PK\x03\x04" * 1000
        )
        await writer.drain()
        await wait_for(
            lambda: guard.uploads.is_dir() and any(guard.uploads.iterdir()),
            what="the daemon to be receiving the upload",
        )
        writer.close()
        await writer.wait_closed()
        await wait_for(lambda: guard.leftovers() == [], what="the half upload to be removed")
        assert_untouched(guard, before, pid)
    async with session.get(f"{base}/api/triggeredwebjobs/new") as response:
        assert response.status == 404


# --- vfs and zip: encoded traversal ------------------------------------------------------------

TRAVERSALS = [
    "%2E%2E%2Foutside%2Fsecret.txt",
    ".%2e/outside/secret.txt",
    "%2e./outside/secret.txt",
    "site/../../outside/secret.txt",
    "site/%2e%2e/%2E%2E/outside/secret.txt",
    "site%2F..%2F..%2Foutside%2Fsecret.txt",
    "%2e%2e%00/outside/secret.txt",
]
# Decoded once, these are odd but legal names inside the site (Kudu's functional tests decode
# `%2520` to a literal `%20`): never a way out.
LITERALS = [
    "%252e%252e/outside/secret.txt",
    "%252e%252e%252foutside%252fsecret.txt",
    "..%5Coutside%5Csecret.txt",
    "%c0%ae%c0%ae/outside/secret.txt",
    "%EF%BC%8E%EF%BC%8E/outside/secret.txt",
    "....//outside/secret.txt",
    "..;/outside/secret.txt",
]


async def test_encoded_traversal_on_vfs_and_zip_stays_in_the_site(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int],
) -> None:
    guard, session, base, pid = deployed
    secret = guard.outside / "secret.txt"
    before = guard.snapshot()
    for prefix in ("/api/vfs/", "/vfs/"):
        for raw in TRAVERSALS:
            url = URL(base + prefix + raw, encoded=True)
            for method, kwargs in (
                ("GET", {}),
                ("HEAD", {}),
                ("PUT", {"data": b"pwned", "headers": {"If-Match": "*"}}),
                ("DELETE", {"headers": {"If-Match": "*"}}),
            ):
                async with session.request(method, url, allow_redirects=False, **kwargs) as r:
                    assert r.status == 400, (method, raw, r.status)
            assert_untouched(guard, before, pid)
    for prefix in ("/api/zip/", "/zip/"):
        for raw in ("%2E%2E%2F", ".%2e/", "site/..%2F..%2F", "%2e%2e%2Foutside%2F"):
            for method, kwargs in (("GET", {}), ("PUT", {"data": make_zip({"pwned.txt": b"x"})})):
                status, message = await refused(
                    session, method, URL(base + prefix + raw, encoded=True), **kwargs
                )
                assert status == 400 and "'..'" in message, (method, raw, message)
            assert_untouched(guard, before, pid)

    for raw in LITERALS:
        url = URL(base + "/api/vfs/" + raw, encoded=True)
        async with session.get(url, allow_redirects=False) as response:
            assert response.status == 404, (raw, response.status)
        async with session.put(url, data=b"pwned", allow_redirects=False) as response:
            assert response.status == 201, (raw, response.status)
        async with session.get(url, allow_redirects=False) as response:
            assert await response.read() == b"pwned"
        zip_url = URL(base + "/api/zip/" + raw.rsplit("/", 1)[0] + "/", encoded=True)
        async with session.get(zip_url, allow_redirects=False) as response:
            if response.status == 200:
                archive = zipfile.ZipFile(io.BytesIO(await response.read()))
                assert all(archive.read(n) != b"secret" for n in archive.namelist()), raw
    assert secret.read_text() == "secret"
    created = [k for k, (old, _new) in guard.changes(before).items() if old is None]
    assert created and all(k.startswith("site-root/") for k in created), created
    assert sorted(p.name for p in guard.outside.iterdir()) == ["secret.txt"]


async def test_names_longer_than_linux_allows_are_a_4xx(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int],
) -> None:
    """A path component over 255 bytes, or a path over 4096, would make `stat` fail with
    ENAMETOOLONG (once a 500 on every method): it is refused (4xx, JSON message), with nothing
    written."""
    guard, session, base, pid = deployed
    before = guard.snapshot()
    long_component = "a" * 300
    long_path = "/".join(["b" * 200] * 25)
    failures = []
    for name in (long_component, f"site/{long_component}/x.txt", long_path):
        for method, path, kwargs in (
            ("GET", f"/api/vfs/{name}", {}),
            ("HEAD", f"/api/vfs/{name}", {}),
            ("PUT", f"/api/vfs/{name}", {"data": b"x"}),
            ("PUT", f"/api/vfs/{name}/", {}),
            ("DELETE", f"/api/vfs/{name}", {"headers": {"If-Match": "*"}}),
            ("GET", f"/api/zip/{name}/", {}),
            ("PUT", f"/api/zip/{name}/", {"data": make_zip({"a.txt": b"x"})}),
        ):
            async with session.request(method, base + path, **kwargs) as response:
                body = await response.read()
            if not 400 <= response.status < 500:
                failures.append(f"{method} {path[:40]}...: {response.status} {body[:80]!r}")
    assert failures == []
    assert_untouched(guard, before, pid)


# --- symbolic links leading out of the site ----------------------------------------------------


async def test_a_dangling_link_out_of_the_site_is_not_written_through(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int],
) -> None:
    """A link whose target does not exist yet: writing through it would create the file
    outside. Refused (403) for a file PUT, a folder PUT and a zip extraction into it."""
    guard, session, base, pid = deployed
    wwwroot = guard.site.root / "site" / "wwwroot"
    (wwwroot / "dangling.txt").symlink_to(guard.outside / "planted.txt")
    (wwwroot / "dangling-dir").symlink_to(guard.outside / "planted-dir")
    before = guard.snapshot()
    for method, path, kwargs in (
        ("PUT", "/api/vfs/site/wwwroot/dangling.txt", {"data": b"x", "headers": {"If-Match": "*"}}),
        ("PUT", "/api/vfs/site/wwwroot/dangling-dir/", {}),
        ("PUT", "/api/vfs/site/wwwroot/dangling-dir/new.txt", {"data": b"x"}),
        ("PUT", "/api/zip/site/wwwroot/dangling-dir/", {"data": make_zip({"a.txt": b"x"})}),
        ("GET", "/api/vfs/site/wwwroot/dangling.txt", {}),
        ("GET", "/api/zip/site/wwwroot/dangling-dir/", {}),
    ):
        status, message = await refused(session, method, base + path, **kwargs)
        assert status == 403 and "outside the site root" in message, (method, path, message)
    assert_untouched(guard, before, pid)
    assert sorted(p.name for p in guard.outside.iterdir()) == ["secret.txt"]


async def test_a_link_in_a_job_folder_is_never_followed_by_deploy_or_delete(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int],
) -> None:
    """A job folder holding a link to a folder outside: replacing the job by an upload and then
    deleting it removes the link, never what it points to; reading through it is refused."""
    guard, session, base, _pid = deployed
    site = guard.site
    link = site.job_dir("triggered", "task") / "outlink"
    link.symlink_to(guard.outside)
    status, message = await refused(
        session, "GET", f"{base}/api/vfs/site/wwwroot/App_Data/jobs/triggered/task/outlink/"
    )
    assert status == 403 and "outside the site root" in message
    async with session.put(
        f"{base}/api/triggeredwebjobs/task",
        data=make_zip({"run.sh": b"echo v2\n"}),
        headers=ZIP_HEADERS,
    ) as response:
        assert response.status == 200, await response.text()
    assert sorted(p.name for p in site.job_dir("triggered", "task").iterdir()) == ["run.sh"]
    assert (guard.outside / "secret.txt").read_text() == "secret"
    (site.job_dir("triggered", "task") / "outlink").symlink_to(guard.outside)
    async with session.delete(f"{base}/api/triggeredwebjobs/task") as response:
        assert response.status == 200
    assert not site.job_dir("triggered", "task").exists()
    assert sorted(p.name for p in guard.outside.iterdir()) == ["secret.txt"]
    assert guard.leftovers() == []


async def test_deploy_over_a_job_folder_that_is_a_link_leaves_nothing_behind(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int],
) -> None:
    """The job folder itself is a link to a folder outside the site. The upload replaces the
    link with a real folder, the outside folder is untouched, and the old link, renamed into
    `.webjobsd-staging/INSTANCE/old.triggered.TOKEN.linked` on the way, is removed
    (`shutil.rmtree` refuses a link)."""
    guard, session, base, pid = deployed
    site = guard.site
    elsewhere = guard.outside / "linked-job"
    elsewhere.mkdir()
    (elsewhere / "run.sh").write_text("echo linked\n")
    site.job_dir("triggered", "linked").symlink_to(elsewhere)
    async with session.get(f"{base}/api/triggeredwebjobs/linked") as response:
        assert response.status in (200, 404)
    async with session.put(
        f"{base}/api/triggeredwebjobs/linked",
        data=make_zip({"run.sh": b"echo v2\n"}),
        headers=ZIP_HEADERS,
    ) as response:
        assert response.status == 200, await response.text()
    assert not site.job_dir("triggered", "linked").is_symlink()
    assert (elsewhere / "run.sh").read_text() == "echo linked\n"
    assert leaders(site, "keep") == [pid]
    assert guard.leftovers() == [], "a link is left in the staging folder"


async def test_delete_of_a_job_folder_that_is_a_link_removes_only_the_link(
    deployed: tuple[Guard, aiohttp.ClientSession, str, int],
) -> None:
    guard, session, base, _pid = deployed
    site = guard.site
    elsewhere = guard.outside / "linked-job"
    elsewhere.mkdir()
    (elsewhere / "run.sh").write_text("echo linked\n")
    site.job_dir("triggered", "linked").symlink_to(elsewhere)
    await wait_for(
        lambda: site.job_dir("triggered", "linked").is_symlink(), what="the link in place"
    )
    async with session.delete(f"{base}/api/triggeredwebjobs/linked") as response:
        assert response.status == 200
    assert not site.job_dir("triggered", "linked").is_symlink()
    assert (elsewhere / "run.sh").read_text() == "echo linked\n"
    assert guard.leftovers() == []
