"""The vfs and zip APIs against a real aiohttp server on a loopback port, driven by a real client.

Every refusal is checked from both sides: the answer (status, JSON message naming the problem)
and the disk (nothing written outside the target, no upload or scratch file left behind).
"""

from __future__ import annotations

import asyncio
import io
import os
import re
import stat
import struct
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestServer
from multidict import CIMultiDict
from yarl import URL

from tests.helpers import wait_for
from webjobsd.deploy import archive as archive_module
from webjobsd.deploy.archive import UnsafeArchive, extract_zip
from webjobsd.http.errors import ApiError, error_middleware
from webjobsd.http.lazy import add_file_routes
from webjobsd.http.uploads import safe_child
from webjobsd.limits import UploadLimits

LIMITS = UploadLimits(
    max_upload_bytes=1024 * 1024, max_extracted_bytes=2 * 1024 * 1024, max_entries=50
)
KUDU_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,7})?\+00:00$")


@dataclass
class Env:
    root: Path  # tmp_path: everything the test may look at
    site: Path
    outside: Path
    temp: Path
    server: BaseTestServer
    session: aiohttp.ClientSession
    changes: list[Path] = field(default_factory=list)

    def url(self, raw: str) -> URL:
        """A URL sent exactly as written: `%2F`, `%2e%2e` and `..` reach the server verbatim."""
        return URL(str(self.server.make_url("")).rstrip("/") + raw, encoded=True)

    def outside_snapshot(self) -> dict[str, bytes]:
        """Every file outside the site and the temp folder, with its content."""
        found: dict[str, bytes] = {}
        for path in sorted(self.root.rglob("*")):
            if self.site in (path, *path.parents) or self.temp in (path, *path.parents):
                continue
            if path.is_file() and not path.is_symlink():
                found[str(path.relative_to(self.root))] = path.read_bytes()
        return found

    def temp_leftovers(self) -> list[str]:
        return (
            sorted(str(p.relative_to(self.temp)) for p in self.temp.rglob("*"))
            if self.temp.exists()
            else []
        )


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    site = tmp_path / "site"
    site.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    temp = tmp_path / "temp"
    changes: list[Path] = []
    app = web.Application(middlewares=[error_middleware])
    add_file_routes(app, site_root=site, limits=LIMITS, temp_dir=temp, on_change=changes.append)
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        yield Env(tmp_path, site, outside, temp, server, session, changes)


async def request(
    env: Env, method: str, raw: str, **kwargs: Any
) -> tuple[int, CIMultiDict[str], bytes]:
    async with env.session.request(method, env.url(raw), allow_redirects=False, **kwargs) as r:
        return r.status, CIMultiDict(r.headers), await r.read()


async def json_error(env: Env, method: str, raw: str, **kwargs: Any) -> tuple[int, str]:
    async with env.session.request(method, env.url(raw), allow_redirects=False, **kwargs) as r:
        assert r.content_type == "application/json", await r.text()
        body = await r.json()
        return r.status, body["message"]


def make_zip(entries: dict[str, bytes], **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data, **kwargs)
    return buffer.getvalue()


def zip_with_info(info: zipfile.ZipInfo, data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(info, data)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# VFS: files


async def test_file_put_get_head_and_conditions(env: Env) -> None:
    status, headers, _ = await request(env, "PUT", "/api/vfs/docs/readme.txt", data=b"hello\n")
    assert status == 201
    etag = headers["ETag"]
    assert etag.startswith('"') and etag.endswith('"')
    assert "Last-Modified" in headers
    assert (env.site / "docs" / "readme.txt").read_bytes() == b"hello\n"
    assert stat.S_IMODE((env.site / "docs" / "readme.txt").stat().st_mode) == 0o644
    assert env.changes[-1] == env.site / "docs" / "readme.txt"

    status, headers, body = await request(env, "GET", "/api/vfs/docs/readme.txt")
    assert (status, body) == (200, b"hello\n")
    assert headers["ETag"] == etag
    assert headers["Content-Type"].startswith("text/plain")
    assert headers["Last-Modified"]

    status, headers, body = await request(env, "HEAD", "/vfs/docs/readme.txt")
    assert (status, body) == (200, b"")
    assert headers["ETag"] == etag and headers["Content-Length"] == "6"

    status, headers, body = await request(
        env, "GET", "/api/vfs/docs/readme.txt", headers={"If-None-Match": etag}
    )
    assert (status, body) == (304, b"")
    assert headers["ETag"] == etag
    status, _, _ = await request(
        env, "GET", "/api/vfs/docs/readme.txt", headers={"If-None-Match": '"other"'}
    )
    assert status == 200

    status, headers, body = await request(
        env, "GET", "/api/vfs/docs/readme.txt", headers={"Range": "bytes=1-3"}
    )
    assert (status, body) == (206, b"ell")
    assert headers["Content-Range"] == "bytes 1-3/6"
    status, headers, _ = await request(
        env, "GET", "/api/vfs/docs/readme.txt", headers={"Range": "bytes=100-"}
    )
    assert status == 416 and headers["Content-Range"] == "bytes */6"

    # A file asked for as a folder is redirected to its file form (Kudu's 307).
    status, headers, _ = await request(env, "GET", "/api/vfs/docs/readme.txt/?x=1")
    assert status == 307
    assert headers["Location"] == str(env.url("/api/vfs/docs/readme.txt?x=1"))

    status, message = await json_error(env, "GET", "/api/vfs/docs/missing.txt")
    assert status == 404 and "missing.txt" in message and "not found" in message


async def test_range_numbers_longer_than_int_accepts(env: Env) -> None:
    """Numbers past Python's 4,300-digit conversion limit were a 500: now they read as larger
    than any file, so HTTP's rules answer (RFC 9110 §14.1.2: an end past the file is its end, a
    start past it is unsatisfiable)."""
    (env.site / "six.txt").write_bytes(b"hello\n")
    huge = "9" * 5000
    for prefix in ("/api/vfs", "/vfs"):
        url = f"{prefix}/six.txt"
        for asked, expected in (
            (f"bytes=1-{huge}", b"ello\n"),
            (f"bytes=-{huge}", b"hello\n"),
            (f"bytes={'0' * 5000}2-3", b"ll"),
        ):
            status, headers, body = await request(env, "GET", url, headers={"Range": asked})
            assert (status, body) == (206, expected), asked[:20]
        status, headers, body = await request(env, "GET", url, headers={"Range": f"bytes={huge}-"})
        assert status == 416 and headers["Content-Range"] == "bytes */6", body
        assert b"message" in body


async def test_unknown_type_is_octet_stream_and_gz_is_not_negotiated(env: Env) -> None:
    (env.site / "data.bin").write_bytes(b"\x00\x01")
    (env.site / "log.txt").write_text("plain")
    (env.site / "log.txt.gz").write_bytes(b"not the same file")
    async with env.session.get(env.url("/api/vfs/data.bin")) as r:
        assert r.headers["Content-Type"] == "application/octet-stream"
    async with env.session.get(
        env.url("/api/vfs/log.txt"), headers={"Accept-Encoding": "gzip"}
    ) as r:
        assert await r.read() == b"plain"
        assert "Content-Encoding" not in r.headers


async def test_update_needs_if_match_like_kudu(env: Env) -> None:
    _, headers, _ = await request(env, "PUT", "/api/vfs/run.sh", data=b"#!/bin/sh\necho 1\n")
    first = headers["ETag"]
    path = env.site / "run.sh"
    assert stat.S_IMODE(path.stat().st_mode) == 0o755  # a script gets the exec bit

    status, message = await json_error(env, "PUT", "/api/vfs/run.sh", data=b"x")
    assert status == 412 and "If-Match" in message

    async with env.session.put(
        env.url("/api/vfs/run.sh"), data=b"x", headers={"If-Match": '"nope"'}
    ) as r:
        assert r.status == 412
        assert (await r.json())["message"] == (
            "ETag does not represent the latest state of the resource."
        )
        assert r.headers["ETag"] == first
    assert path.read_bytes() == b"#!/bin/sh\necho 1\n"

    path.chmod(0o700)  # a replaced file keeps its mode
    status, headers, body = await request(
        env, "PUT", "/api/vfs/run.sh", data=b"#!/bin/sh\necho 2\n", headers={"If-Match": first}
    )
    assert (status, body) == (204, b"")
    second = headers["ETag"]
    assert second != first  # same size, same clock tick: the mtime is moved on anyway
    assert path.read_bytes() == b"#!/bin/sh\necho 2\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700

    status, _ = await json_error(
        env, "PUT", "/api/vfs/run.sh", data=b"late", headers={"If-Match": first}
    )
    assert status == 412
    status, _, _ = await request(
        env, "PUT", "/api/vfs/run.sh", data=b"3", headers={"If-Match": "*"}
    )
    assert status == 204
    assert path.read_bytes() == b"3"
    # If-Match on a new file is ignored (Kudu's client always sends `*`).
    status, _, _ = await request(
        env, "PUT", "/api/vfs/new.txt", data=b"n", headers={"If-Match": "*"}
    )
    assert status == 201
    assert not [p.name for p in env.site.iterdir() if p.name.endswith(".tmp")]


async def test_delete_file(env: Env) -> None:
    (env.site / "a.txt").write_text("a")
    status, message = await json_error(env, "DELETE", "/api/vfs/a.txt")
    assert status == 412 and "If-Match" in message
    assert (env.site / "a.txt").exists()
    status, _, _ = await request(env, "DELETE", "/api/vfs/a.txt", headers={"If-Match": "*"})
    assert status == 200
    assert not (env.site / "a.txt").exists()
    assert env.changes[-1] == env.site / "a.txt"
    status, message = await json_error(env, "DELETE", "/api/vfs/a.txt", headers={"If-Match": "*"})
    assert status == 404 and "a.txt" in message


# ---------------------------------------------------------------------------------------------
# VFS: folders


async def test_folder_listing_is_kudus_shape(env: Env) -> None:
    (env.site / "dir" / "sub").mkdir(parents=True)
    (env.site / "dir" / "b file.json").write_text("{}")
    (env.site / "dir" / "a.txt").write_text("hello")

    status, headers, _ = await request(env, "GET", "/api/vfs/dir")
    assert status == 307 and headers["Location"] == str(env.url("/api/vfs/dir/"))

    async with env.session.get(env.url("/api/vfs/dir/")) as r:
        assert r.status == 200 and r.content_type == "application/json"
        listing = await r.json()
    assert [entry["name"] for entry in listing] == ["a.txt", "b file.json", "sub"]
    for entry in listing:
        assert set(entry) == {"name", "size", "mtime", "crtime", "mime", "href", "path"}
        assert KUDU_TIME.match(entry["mtime"]) and KUDU_TIME.match(entry["crtime"])
    a, b, sub = listing
    assert (a["size"], a["mime"], a["path"]) == (5, "text/plain", str(env.site / "dir" / "a.txt"))
    assert a["href"] == str(env.url("/api/vfs/dir/a.txt"))
    assert b["mime"] == "application/json" and b["href"].endswith("/api/vfs/dir/b%20file.json")
    assert (sub["size"], sub["mime"]) == (0, "inode/directory")
    assert sub["href"] == str(env.url("/api/vfs/dir/sub/"))
    async with env.session.get(a["href"]) as r:  # hrefs lead back to the files
        assert await r.read() == b"hello"

    async with env.session.get(env.url("/api/vfs/")) as r:  # the site root lists too
        assert [entry["name"] for entry in await r.json()] == ["dir"]
    status, headers, _ = await request(env, "GET", "/api/vfs")
    assert status == 307 and headers["Location"].endswith("/api/vfs/")
    status, _, body = await request(env, "HEAD", "/api/vfs/dir/")
    assert (status, body) == (200, b"")


async def test_folder_put_and_delete(env: Env) -> None:
    status, _, _ = await request(env, "PUT", "/api/vfs/new/deep/")
    assert status == 201 and (env.site / "new" / "deep").is_dir()
    status, message = await json_error(env, "PUT", "/api/vfs/new/deep/")
    assert status == 409 and "directory" in message
    status, message = await json_error(env, "PUT", "/api/vfs/new", data=b"x")
    assert (
        status == 409 and message == "The resource represents a directory which can not be updated."
    )

    (env.site / "new" / "deep" / "f.txt").write_text("f")
    status, message = await json_error(env, "DELETE", "/api/vfs/new/")
    assert status == 409 and message.startswith("Cannot delete directory.")
    assert (env.site / "new" / "deep" / "f.txt").exists()
    status, message = await json_error(env, "DELETE", "/api/vfs/new/?recursive=maybe")
    assert status == 400 and "recursive" in message
    status, _, _ = await request(env, "DELETE", "/api/vfs/new/?recursive=true")
    assert status == 200 and not (env.site / "new").exists()
    assert env.changes[-1] == env.site / "new"

    (env.site / "empty").mkdir()
    status, _, _ = await request(env, "DELETE", "/api/vfs/empty")  # empty: no recursive needed
    assert status == 200 and not (env.site / "empty").exists()
    status, message = await json_error(env, "DELETE", "/api/vfs/?recursive=true")
    assert status == 403 and "root" in message
    assert env.site.is_dir()


async def test_percent_encoded_slashes_and_percent_names(env: Env) -> None:
    status, _, _ = await request(env, "PUT", "/api/vfs/a%2Fb%2Fc.txt", data=b"abc")
    assert status == 201
    assert (env.site / "a" / "b" / "c.txt").read_bytes() == b"abc"
    status, _, body = await request(env, "GET", "/api/vfs/a%2fb/c.txt")
    assert (status, body) == (200, b"abc")
    async with env.session.get(env.url("/api/vfs/a%2Fb%2F")) as r:
        listing = await r.json()
    async with env.session.get(listing[0]["href"]) as r:
        assert await r.read() == b"abc"
    # Decoded once only: %2520 is a literal "%20" in the name (Kudu's functional test).
    status, _, _ = await request(env, "PUT", "/api/vfs/x%2520y.txt", data=b"p")
    assert status == 201 and (env.site / "x%20y.txt").read_bytes() == b"p"


# ---------------------------------------------------------------------------------------------
# VFS: containment


@pytest.mark.parametrize(
    "raw",
    [
        "/api/vfs/../outside/secret.txt",
        "/api/vfs/%2e%2e/outside/secret.txt",
        "/api/vfs/..%2Foutside%2Fsecret.txt",
        "/api/vfs/a/%2E%2E/%2E%2E/outside/secret.txt",
        "/vfs/..%2f..%2f..%2fetc%2fpasswd",
        "/api/vfs/a%00b",
        "/api/zip/%2e%2e/outside/",
    ],
)
async def test_traversal_is_refused(env: Env, raw: str) -> None:
    before = env.outside_snapshot()
    for method, kwargs in (
        ("GET", {}),
        ("PUT", {"data": b"pwned", "headers": {"If-Match": "*"}}),
        ("DELETE", {"headers": {"If-Match": "*"}}),
    ):
        if raw.startswith("/api/zip") and method == "DELETE":
            continue
        status, message = await json_error(env, method, raw, **kwargs)
        assert status == 400, (method, status, message)
        assert "Invalid path" in message
    assert env.outside_snapshot() == before
    assert (env.outside / "secret.txt").read_text() == "secret"
    assert not list(env.site.iterdir())


async def test_absolute_looking_paths_stay_in_the_site(env: Env) -> None:
    secret = env.outside / "secret.txt"
    status, message = await json_error(env, "GET", f"/api/vfs/{secret}")  # "//tmp/..."
    assert status == 404 and str(env.site) in message
    status, _, _ = await request(env, "PUT", f"/api/vfs/%2F{secret}", data=b"mine")
    assert status == 201
    assert (env.site / secret.relative_to("/")).read_bytes() == b"mine"
    assert secret.read_text() == "secret"


async def test_symlinks_leading_outside_are_refused(env: Env) -> None:
    (env.site / "escape").symlink_to(env.outside)
    (env.site / "secret-link.txt").symlink_to(env.outside / "secret.txt")
    (env.site / "inner.txt").write_text("inner")
    (env.site / "inner-link.txt").symlink_to(env.site / "inner.txt")
    before = env.outside_snapshot()

    for method, raw, kwargs in (
        ("GET", "/api/vfs/escape/secret.txt", {}),
        ("GET", "/api/vfs/escape/", {}),
        ("GET", "/api/vfs/secret-link.txt", {}),
        ("PUT", "/api/vfs/escape/new.txt", {"data": b"x"}),
        ("PUT", "/api/vfs/secret-link.txt", {"data": b"x", "headers": {"If-Match": "*"}}),
        ("PUT", "/api/vfs/escape/sub/", {}),
        ("DELETE", "/api/vfs/escape/secret.txt", {"headers": {"If-Match": "*"}}),
        ("DELETE", "/api/vfs/escape?recursive=true", {}),
        ("GET", "/api/zip/escape/", {}),
        ("PUT", "/api/zip/escape/", {"data": make_zip({"new.txt": b"x"})}),
    ):
        status, message = await json_error(env, method, raw, **kwargs)
        assert status == 403, (method, raw, status, message)
        assert "outside the site root" in message
    assert env.outside_snapshot() == before
    assert sorted(p.name for p in env.outside.iterdir()) == ["secret.txt"]

    # The listing shows such links with their own metadata, not the target's.
    async with env.session.get(env.url("/api/vfs/")) as r:
        by_name = {entry["name"]: entry for entry in await r.json()}
    assert by_name["secret-link.txt"]["size"] != len("secret")
    # A zip of the site leaves out what leads outside and keeps links that stay in.
    async with env.session.get(env.url("/api/zip/")) as r:
        names = zipfile.ZipFile(io.BytesIO(await r.read())).namelist()
    assert sorted(names) == ["inner-link.txt", "inner.txt"]

    # Links that stay inside work: reading through, and writing through to the real file.
    status, _, body = await request(env, "GET", "/api/vfs/inner-link.txt")
    assert (status, body) == (200, b"inner")
    status, _, _ = await request(
        env, "PUT", "/api/vfs/inner-link.txt", data=b"new", headers={"If-Match": "*"}
    )
    assert status == 204
    assert (env.site / "inner-link.txt").is_symlink()
    assert (env.site / "inner.txt").read_bytes() == b"new"
    # Deleting a link deletes the link, never its target.
    status, _, _ = await request(
        env, "DELETE", "/api/vfs/inner-link.txt", headers={"If-Match": "*"}
    )
    assert status == 200
    assert not (env.site / "inner-link.txt").exists() and (env.site / "inner.txt").exists()


# ---------------------------------------------------------------------------------------------
# ZIP API


async def test_names_that_are_not_utf8_are_listed_served_and_zipped(
    env: Env, tmp_path: Path
) -> None:
    """Linux names are bytes. Listing a folder holding b"caf\xe9.txt" was a 500, and its zip a
    200 whose body was cut: now the listing shows the name with U+FFFD and an href carrying the
    bytes (`caf%E9.txt`) that serves that very file, and the zip stores the bytes as the name,
    so `unzip` recreates it exactly."""
    folder = env.site / "dir"
    folder.mkdir()
    raw = os.fsencode(folder)
    files = {
        b"caf\xe9.txt": b"latin-1 name\n",
        b"caf%E9.txt": b"an ASCII name with a percent sign\n",  # must not be confused with it
        b"ok.txt": b"plain\n",
        b"d\xe8/in.txt": b"inside a non-UTF-8 folder\n",
    }
    # (Not \xff: Info-ZIP's unzip drops that byte from names, whatever the archive holds.)
    os.mkdir(raw + b"/d\xe8")
    os.mkdir(raw + b"/empty\xfe")
    for name, data in files.items():
        with open(raw + b"/" + name, "wb") as handle:
            handle.write(data)

    async with env.session.get(env.url("/api/vfs/dir/")) as r:
        assert r.status == 200, await r.text()
        listing = {entry["name"]: entry for entry in await r.json()}
    assert sorted(listing) == ["caf%E9.txt", "caf\ufffd.txt", "d\ufffd", "empty\ufffd", "ok.txt"]
    assert listing["caf\ufffd.txt"]["href"] == str(env.url("/api/vfs/dir/caf%E9.txt"))
    assert listing["caf%E9.txt"]["href"] == str(env.url("/api/vfs/dir/caf%25E9.txt"))
    assert listing["d\ufffd"]["href"] == str(env.url("/api/vfs/dir/d%E8/"))
    assert listing["caf\ufffd.txt"]["path"] == f"{folder}/caf\ufffd.txt"
    for shown, name in (("caf\ufffd.txt", b"caf\xe9.txt"), ("caf%E9.txt", b"caf%E9.txt")):
        async with env.session.get(URL(str(listing[shown]["href"]), encoded=True)) as r:
            assert r.status == 200
            assert await r.read() == files[name]
    async with env.session.get(URL(str(listing["d\ufffd"]["href"]), encoded=True)) as r:
        assert r.status == 200
        assert [entry["name"] for entry in await r.json()] == ["in.txt"]
    # Written through the API under such a name, and a 404 naming it in valid text.
    status, _, _ = await request(env, "PUT", "/api/vfs/dir/new%E9.txt", data=b"new")
    assert status == 201
    assert Path(os.fsdecode(raw + b"/new\xe9.txt")).read_bytes() == b"new"
    status, message = await json_error(env, "GET", "/api/vfs/dir/gone%E9.txt")
    assert status == 404 and "gone\ufffd.txt" in message

    for prefix in ("/api/zip", "/zip"):
        status, headers, body = await request(env, "GET", f"{prefix}/dir/")
        assert status == 200 and headers["Content-Type"] == "application/zip"
        out = tmp_path / f"unzipped{prefix.replace('/', '-')}"
        out.mkdir()
        (tmp_path / "dir.zip").write_bytes(body)
        done = await asyncio.create_subprocess_exec(
            "unzip", "-q", str(tmp_path / "dir.zip"), "-d", str(out)
        )
        assert await done.wait() == 0
        got = {
            os.fsencode(path.relative_to(out)): path.read_bytes()
            for path in out.rglob("*")
            if path.is_file()
        }
        assert got == {**files, b"new\xe9.txt": b"new"}
        assert os.path.isdir(os.fsencode(out) + b"/empty\xfe")
    # A folder so named, zipped: its download name is text (U+FFFD), the entries are bytes.
    status, headers, body = await request(env, "GET", "/api/zip/dir/d%E8/")
    assert status == 200, body
    assert headers["Content-Disposition"].endswith("filename*=UTF-8''d%EF%BF%BD.zip")
    assert zipfile.ZipFile(io.BytesIO(body)).namelist() == ["in.txt"]


async def test_zip_get_round_trip(env: Env) -> None:
    folder = env.site / "app"
    (folder / "bin").mkdir(parents=True)
    (folder / "empty").mkdir()
    (folder / "bin" / "tool").write_bytes(b"\x7fELF-ish")
    (folder / "bin" / "tool").chmod(0o755)
    (folder / "readme.md").write_text("# app\n")
    (folder / "big.bin").write_bytes(os.urandom(300_000))
    (folder / "out").symlink_to(env.outside)

    status, headers, _ = await request(env, "GET", "/api/zip/app")
    assert status == 307 and headers["Location"].endswith("/api/zip/app/")
    async with env.session.get(env.url("/api/zip/app/")) as r:
        assert r.status == 200 and r.content_type == "application/zip"
        assert r.headers["Content-Disposition"] == 'attachment; filename="app.zip"'
        data = await r.read()
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert sorted(archive.namelist()) == ["big.bin", "bin/tool", "empty/", "readme.md"]
    assert archive.read("big.bin") == (folder / "big.bin").read_bytes()
    assert (archive.getinfo("bin/tool").external_attr >> 16) & 0o111

    async with env.session.get(env.url("/zip/app/?fileName=custom.zip")) as r:
        assert r.headers["Content-Disposition"] == 'attachment; filename="custom.zip"'
        await r.read()
    status, message = await json_error(env, "GET", "/api/zip/app/readme.md")
    assert status == 404 and "folder" in message

    # ... and back in through PUT, into a folder that does not exist yet.
    status, message = await json_error(env, "PUT", "/api/zip/copy", data=data)
    assert status == 404 and "'/'" in message
    status, _, body = await request(env, "PUT", "/api/zip/copy/", data=data)
    assert (status, body) == (200, b"")
    copy = env.site / "copy"
    assert (copy / "big.bin").read_bytes() == (folder / "big.bin").read_bytes()
    assert (copy / "bin" / "tool").read_bytes() == b"\x7fELF-ish"
    assert stat.S_IMODE((copy / "bin" / "tool").stat().st_mode) == 0o755
    assert stat.S_IMODE((copy / "readme.md").stat().st_mode) == 0o644
    assert (copy / "empty").is_dir()
    assert env.changes[-1] == copy
    assert env.temp_leftovers() == []


async def test_zip_put_adds_and_overwrites_without_clearing(env: Env) -> None:
    folder = env.site / "job"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    (folder / "replace.txt").write_text("old")
    info = zipfile.ZipInfo("replace.txt", date_time=(2020, 5, 17, 10, 30, 0))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(info, b"new")
        archive.writestr("lib/run.py", b"print(1)\n")
        archive.writestr("lib/data/", b"")
        archive.writestr("start", b"#!/bin/sh\n")
    status, _, _ = await request(env, "PUT", "/api/zip/job/", data=buffer.getvalue())
    assert status == 200
    assert (folder / "keep.txt").read_text() == "keep"
    assert (folder / "replace.txt").read_text() == "new"
    expected = time.mktime((2020, 5, 17, 10, 30, 0, 0, 0, -1))
    assert (folder / "replace.txt").stat().st_mtime == expected
    assert stat.S_IMODE((folder / "lib" / "run.py").stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "start").stat().st_mode) == 0o755  # a shebang
    assert (folder / "lib" / "data").is_dir()
    assert env.changes == [folder]
    assert env.temp_leftovers() == []

    status, message = await json_error(env, "PUT", "/api/zip/job/keep.txt", data=buffer.getvalue())
    assert status == 409 and "folder" in message
    status, message = await json_error(
        env, "PUT", "/api/zip/job/", json={"packageUri": "http://example.invalid/a.zip"}
    )
    assert status == 400 and "packageUri" in message


async def test_zip_put_ignores_the_content_type_like_kudu(env: Env) -> None:
    """The GitHub deploy action's library (azure-actions-appservice-rest, Kudu.extractZIP)
    sends its zip labelled `application/json; charset=utf-8`: the body is what counts."""
    json_label = {"Content-Type": "application/json; charset=utf-8"}
    archive = make_zip({"App_Data/jobs/triggered/deployed/run.sh": b"echo deployed\n"})
    status, _, body = await request(
        env, "PUT", "/api/zip/site/wwwroot/", data=archive, headers=json_label
    )
    assert (status, body) == (200, b""), body
    deployed = env.site / "site" / "wwwroot" / "App_Data" / "jobs" / "triggered" / "deployed"
    assert (deployed / "run.sh").read_bytes() == b"echo deployed\n"

    # Not a zip, whatever the label: still a 400 with a JSON message, and nothing written.
    for body_bytes, hint in (
        (b'{"packageUri": "https://example.invalid/a.zip"}', True),
        (b"plain text, not a zip", False),
    ):
        for label in (json_label, {"Content-Type": "application/zip"}):
            status, message = await json_error(
                env, "PUT", "/api/zip/other/", data=body_bytes, headers=label
            )
            assert status == 400 and message.startswith("Not a valid zip archive."), message
            assert ("packageUri" in message) == hint, message
    assert not (env.site / "other").exists()
    assert env.temp_leftovers() == []


async def test_zip_put_conflicts_with_destination_move_nothing(env: Env) -> None:
    folder = env.site / "job"
    folder.mkdir()
    (folder / "lib").write_text("a file where the zip has a folder")
    (folder / "escape").symlink_to(env.outside)
    before = env.outside_snapshot()
    for entries, named in (
        ({"a.txt": b"a", "lib/x.txt": b"x"}, "lib"),
        ({"a.txt": b"a", "escape/x.txt": b"x"}, "escape"),
    ):
        status, message = await json_error(env, "PUT", "/api/zip/job/", data=make_zip(entries))
        assert status == 409 and named in message, message
        assert not (folder / "a.txt").exists()  # checked before anything moved
    assert env.outside_snapshot() == before
    assert sorted(p.name for p in env.outside.iterdir()) == ["secret.txt"]
    assert env.temp_leftovers() == []


def nul_name_zip() -> bytes:
    data = make_zip({"evilXname.txt": b"x"})
    return data.replace(b"evilXname.txt", b"evil\x00name.txt")


def lying_size_zip() -> bytes:
    """One entry whose headers claim 100 bytes while its data inflate to 1 MiB."""
    data = bytearray(make_zip({"big.bin": bytes(1024 * 1024)}))
    local = data.index(b"PK\x03\x04")
    struct.pack_into("<I", data, local + 22, 100)
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 100)
    return bytes(data)


def overlapping_zip(copies: int = 10) -> bytes:
    """CVE-2024-0450's shape: many central records sharing one local entry's data."""
    data = make_zip({"e00.bin": bytes(100 * 1024)})  # 10 x 100 KiB: under the declared cap
    central_at = data.index(b"PK\x01\x02")
    end_at = data.index(b"PK\x05\x06")
    record = data[central_at:end_at]
    records = b"".join(record.replace(b"e00.bin", f"e{i:02d}.bin".encode()) for i in range(copies))
    end = bytearray(data[end_at:])
    struct.pack_into("<HHII", end, 8, copies, copies, len(records), central_at)
    return data[:central_at] + records + bytes(end)


def symlink_entry() -> bytes:
    info = zipfile.ZipInfo("link")
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return zip_with_info(info, str(Path("/etc/passwd")).encode())


def fifo_entry() -> bytes:
    info = zipfile.ZipInfo("pipe")
    info.create_system = 3
    info.external_attr = (stat.S_IFIFO | 0o644) << 16
    return zip_with_info(info, b"")


def duplicate_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("run.sh", b"echo benign")
        with pytest.warns(UserWarning, match="Duplicate name"):
            archive.writestr("run.sh", b"echo evil")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("archive", "status", "fragment"),
    [
        pytest.param(
            lambda: make_zip({"ok.txt": b"1", "../evil.txt": b"x"}),
            400,
            "'../evil.txt'",
            id="zip-slip",
        ),
        pytest.param(lambda: make_zip({"a/../../evil.txt": b"x"}), 400, "..", id="nested-slip"),
        pytest.param(lambda: make_zip({"..\\evil.txt": b"x"}), 400, "..", id="backslash-slip"),
        pytest.param(lambda: make_zip({"/tmp/evil.txt": b"x"}), 400, "absolute", id="absolute"),
        pytest.param(lambda: make_zip({"C:/evil.txt": b"x"}), 400, "drive letter", id="drive"),
        pytest.param(symlink_entry, 400, "symbolic link", id="symlink"),
        pytest.param(fifo_entry, 400, "FIFO", id="fifo"),
        pytest.param(nul_name_zip, 400, "NUL", id="nul"),
        pytest.param(duplicate_zip, 400, "more than once", id="duplicate"),
        pytest.param(
            lambda: make_zip({"lib": b"f", "lib/x": b"x"}), 400, "'lib'", id="file-and-folder"
        ),
        pytest.param(
            lambda: make_zip({"zeros.bin": bytes(8 * 1024 * 1024)}), 413, "bytes", id="bomb"
        ),
        pytest.param(lying_size_zip, 400, "Not a valid zip archive", id="lying-size"),
        pytest.param(overlapping_zip, 400, "overlaps", id="overlap"),
        pytest.param(
            lambda: make_zip({f"f{i}": b"" for i in range(51)}), 413, "entries", id="entries"
        ),
        pytest.param(
            lambda: b"PK\x03\x04 certainly not a zip", 400, "Not a valid zip archive.", id="junk"
        ),
    ],
)
async def test_bad_archives_are_refused(env: Env, archive: Any, status: int, fragment: str) -> None:
    folder = env.site / "job"
    folder.mkdir()
    (folder / "existing.txt").write_text("untouched")
    before = env.outside_snapshot()
    got, message = await json_error(env, "PUT", "/api/zip/job/", data=archive())
    assert got == status, message
    assert fragment in message
    assert sorted(p.name for p in folder.iterdir()) == ["existing.txt"]
    assert (folder / "existing.txt").read_text() == "untouched"
    assert env.outside_snapshot() == before
    assert not (env.root / "evil.txt").exists() and not (env.site / "evil.txt").exists()
    assert env.temp_leftovers() == []
    assert env.changes == []


# ---------------------------------------------------------------------------------------------
# uploads over the cap


async def chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        yield b"\0" * size
        sent += size


async def put_refused(env: Env, raw: str, data: Any) -> int:
    """The status of a refused upload, and its message names the limit."""
    async with env.session.put(env.url(raw), data=data) as r:
        if r.status == 413:
            assert "limit" in (await r.json())["message"]
        return r.status


async def test_chunked_upload_over_the_cap_is_refused(env: Env) -> None:
    folder = env.site / "job"
    folder.mkdir()
    status = await put_refused(env, "/api/zip/job/", chunks(4 * LIMITS.max_upload_bytes))
    assert status == 413
    status = await put_refused(env, "/api/vfs/job/big.bin", chunks(4 * LIMITS.max_upload_bytes))
    assert status == 413
    status = await put_refused(env, "/api/vfs/job/new/deeper/big.bin", chunks(2 << 20))
    assert status == 413
    assert list(folder.iterdir()) == []  # no partial file, no temporary, no new folder
    assert env.temp_leftovers() == []
    assert env.changes == []
    # The server is still fine afterwards.
    status, _, _ = await request(env, "PUT", "/api/vfs/job/small.txt", data=b"ok")
    assert status == 201


async def test_declared_length_over_the_cap_is_refused_before_reading(env: Env) -> None:
    (env.site / "job").mkdir()
    body = bytes(LIMITS.max_upload_bytes + 1)
    status = await put_refused(env, "/api/vfs/job/big.bin", io.BytesIO(body))
    assert status == 413
    status = await put_refused(env, "/api/zip/job/", io.BytesIO(body))
    assert status == 413
    assert list((env.site / "job").iterdir()) == []
    assert env.temp_leftovers() == []


async def test_upload_exactly_at_the_cap_is_accepted(env: Env) -> None:
    status, _, _ = await request(
        env, "PUT", "/api/vfs/full.bin", data=chunks(LIMITS.max_upload_bytes)
    )
    assert status == 201
    assert (env.site / "full.bin").stat().st_size == LIMITS.max_upload_bytes


# ---------------------------------------------------------------------------------------------
# the building blocks, directly


def test_safe_child(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "in").symlink_to(root / "a")
    (root / "out").symlink_to(tmp_path)
    (root / "loop").symlink_to(root / "loop")
    assert safe_child(root, "") == root
    assert safe_child(root, "/a//./b/") == root / "a" / "b"
    assert safe_child(root, "in/x") == root / "in" / "x"  # lexical: the link is kept
    for bad, status in (
        ("..", 400),
        ("a/../..", 400),
        ("a/\x00", 400),
        ("out/x", 403),
        ("out", 403),
    ):
        with pytest.raises(ApiError) as caught:
            safe_child(root, bad)
        assert caught.value.status == status, bad
    with pytest.raises(ApiError) as caught:
        safe_child(root, "loop/x")
    assert caught.value.status == 400


def test_backslash_names_are_folders(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(make_zip({"dir\\file.txt": b"x", "./dot/./f": b"y"}))
    dest = tmp_path / "dest"
    dest.mkdir()
    assert extract_zip(archive, dest, LIMITS) == ["dir/file.txt", "dot/f"]
    assert (dest / "dir" / "file.txt").read_bytes() == b"x"


def test_extraction_counts_real_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The early check on declared sizes off: the byte count while writing still stops it."""
    monkeypatch.setattr(archive_module, "_declared_size", lambda entries: 0)
    archive = tmp_path / "bomb.zip"
    archive.write_bytes(make_zip({"a.bin": bytes(1024 * 1024), "b.bin": bytes(1024 * 1024 + 1)}))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ApiError) as caught:
        extract_zip(archive, dest, LIMITS)
    assert caught.value.status == 413 and "'b.bin'" in caught.value.message
    assert sorted(p.name for p in dest.iterdir()) == ["a.bin"]  # no partial or temporary file


def test_existing_links_in_the_destination_are_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("outside")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "folder-link").symlink_to(outside)
    (dest / "file-link.txt").symlink_to(outside / "target.txt")
    archive = tmp_path / "a.zip"

    archive.write_bytes(make_zip({"folder-link/new.txt": b"x"}))
    with pytest.raises(ApiError) as caught:
        extract_zip(archive, dest, LIMITS)
    assert caught.value.status == 409 and "'folder-link'" in caught.value.message

    archive.write_bytes(make_zip({"file-link.txt": b"replaced"}))
    extract_zip(archive, dest, LIMITS)
    assert not (dest / "file-link.txt").is_symlink()  # the link was replaced, not written through
    assert (dest / "file-link.txt").read_bytes() == b"replaced"
    assert sorted(p.name for p in outside.iterdir()) == ["target.txt"]
    assert (outside / "target.txt").read_text() == "outside"


def test_unsupported_compression_and_encryption(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_BZIP2) as zf:
        zf.writestr("b.txt", b"bz")
    archive.write_bytes(buffer.getvalue())
    with pytest.raises(UnsafeArchive, match="compression method 12"):
        extract_zip(archive, tmp_path, LIMITS)
    data = bytearray(make_zip({"e.txt": b"x"}))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature)
        struct.pack_into(
            "<H", data, at + offset, struct.unpack_from("<H", data, at + offset)[0] | 1
        )
    archive.write_bytes(bytes(data))
    with pytest.raises(UnsafeArchive, match="encrypted"):
        extract_zip(archive, tmp_path, LIMITS)


@pytest.fixture
def tight_umask() -> Iterator[None]:
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def test_modes_do_not_depend_on_the_umask(tmp_path: Path, tight_umask: None) -> None:
    info = zipfile.ZipInfo("tool")
    info.create_system = 3
    info.external_attr = (stat.S_IFREG | 0o4777) << 16  # setuid and world-writable: masked
    archive = tmp_path / "a.zip"
    archive.write_bytes(zip_with_info(info, b"bin"))
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_zip(archive, dest, LIMITS)
    assert stat.S_IMODE((dest / "tool").stat().st_mode) == 0o755


async def test_zip_stream_ends_when_the_client_leaves(tmp_path: Path) -> None:
    """A client that hangs up mid-download: the handler and its zip thread both finish."""
    site = tmp_path / "site"
    (site / "big").mkdir(parents=True)
    for index in range(4):
        (site / "big" / f"{index}.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    in_flight: list[str] = []

    @web.middleware
    async def track(request: web.Request, handler: Any) -> web.StreamResponse:
        in_flight.append(request.path)
        try:
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            in_flight.remove(request.path)

    app = web.Application(middlewares=[track, error_middleware])
    add_file_routes(app, site_root=site, limits=LIMITS, temp_dir=tmp_path / "temp")
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        response = await session.get(server.make_url("/api/zip/big/"))
        assert response.status == 200
        await response.content.readexactly(64 * 1024)
        response.close()  # drop the connection with most of the zip unread
        await wait_for(lambda: not in_flight, timeout=10, what="the zip handler to finish")
        async with session.get(server.make_url("/api/zip/big/")) as again:
            names = zipfile.ZipFile(io.BytesIO(await again.read())).namelist()
        assert sorted(names) == ["0.bin", "1.bin", "2.bin", "3.bin"]


async def test_base_url_hook_builds_hrefs_and_redirects(tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "dir").mkdir(parents=True)
    (site / "dir" / "f.txt").write_text("f")
    app = web.Application(middlewares=[error_middleware])
    add_file_routes(
        app,
        site_root=site,
        limits=LIMITS,
        temp_dir=tmp_path / "temp",
        base_url=lambda request: "https://kudu.example",
    )
    async with TestServer(app, host="127.0.0.1") as server, aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/vfs/dir/?a=1")) as r:
            [entry] = await r.json()
        assert entry["href"] == "https://kudu.example/vfs/dir/f.txt?a=1"  # Kudu keeps the query
        async with session.get(server.make_url("/vfs/dir"), allow_redirects=False) as r:
            assert r.headers["Location"] == "https://kudu.example/vfs/dir/"


async def test_client_hanging_up_mid_body_leaves_nothing(env: Env) -> None:
    (env.site / "job").mkdir()

    def receiving() -> bool:
        partial = list((env.site / "job").rglob("*.tmp")) + list(env.temp.rglob("upload.zip"))
        return bool(partial)

    for path in ("/api/vfs/job/new/half.bin", "/api/zip/job/"):
        _reader, writer = await asyncio.open_connection(env.server.host, env.server.port)
        head = f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        writer.write(head.encode() + b"x" * 10)
        await writer.drain()
        await wait_for(receiving, what="the handler to be receiving the body")
        writer.close()
        await writer.wait_closed()
        await wait_for(
            lambda: not list((env.site / "job").iterdir()) and not env.temp_leftovers(),
            what="the half upload to be removed",
        )
    assert env.changes == []
