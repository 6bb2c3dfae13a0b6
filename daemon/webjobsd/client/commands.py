"""The client verbs: `jobs`, `show`, `run`, `logs`, `history`, `stop`, `start`, `deploy`,
`delete`, `settings`. Each takes an `ApiClient` and an output stream and returns an exit code;
failures are `ClientError`s raised from the connection and turned into messages by the caller.

Following a log (`logs -f`, `run --follow`) reads the daemon's Server-Sent Events stream of
that log (`.../logstream`): lines arrive as they are written, rotation is the daemon's concern,
and a run's stream ends with the run's status. `logs` without `-f` reads the file once.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import sys
import time
import urllib.parse
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, TextIO

from webjobsd.client.connection import ApiClient, ClientError, ExitCode

KINDS = ("continuous", "triggered")
FOLLOW_POLL_S = 0.5
FINISHED = {"Success", "Failed", "Aborted", "Stopped"}
PROGRESS_MIN_BYTES = 1024 * 1024


def find_job(client: ApiClient, name: str, kind: str | None) -> dict[str, Any]:
    """The job's JSON; without `kind`, the one job of that name (ambiguity is an error)."""
    quoted = urllib.parse.quote(name, safe="")
    if kind is not None:
        job: dict[str, Any] = dict(client.request("GET", f"/api/{kind}webjobs/{quoted}").json())
        return job
    found = [job for job in client.request("GET", "/api/webjobs").json() if job["name"] == name]
    if not found:
        raise ClientError(f"no job named {name!r}", ExitCode.NOT_FOUND)
    if len(found) > 1:
        raise ClientError(
            f"{name!r} is both a continuous and a triggered job; say which with --type",
            ExitCode.USAGE,
        )
    return dict(found[0])


def table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        out.write("  ".join(cells).rstrip() + "\n")


def cmd_jobs(client: ApiClient, out: TextIO, kind: str | None) -> int:
    path = f"/api/{kind}webjobs" if kind else "/api/webjobs"
    jobs = client.request("GET", path).json()
    rows = [["NAME", "TYPE", "STATUS", "LATEST RUN", "SCHEDULE"]]
    for job in jobs:
        latest = job.get("latest_run") or {}
        latest_text = f"{latest.get('status', '')} {latest.get('start_time', '')}".strip()
        rows.append(
            [
                job["name"],
                job["type"],
                str(job.get("status") or ""),
                latest_text or "-",
                str((job.get("settings") or {}).get("schedule") or "-"),
            ]
        )
    if len(rows) == 1:
        out.write("no jobs\n")
    else:
        table(rows, out)
    return ExitCode.OK


def cmd_show(client: ApiClient, out: TextIO, name: str, kind: str | None) -> int:
    job = find_job(client, name, kind)
    write_fields(job, out)
    quoted = urllib.parse.quote(name, safe="")
    if job.get("type") == "triggered":
        for entry in client.request("GET", "/api/schedules").json():
            if entry["name"] == name:
                out.write(f"schedule in words: {entry['description'] or '-'}")
                out.write(f" ({entry['time_zone']})\n" if entry["time_zone"] else "\n")
                out.write(f"next run: {entry['next_run'] or entry['status']}")
                out.write(f" ({entry['error']})\n" if entry["error"] else "\n")
    elif job.get("type") == "continuous":
        starts = client.request("GET", f"/api/continuouswebjobs/{quoted}/starts").json()
        out.write(
            f"starts: {len(starts['starts'])}, restarts after an exit: {starts['restarts']}\n"
        )
        running = [entry for entry in starts["starts"] if entry["ended"] is None]
        here = [entry for entry in running if entry["instance_id"] == starts.get("instance_id")]
        running = here or running
        if running:
            out.write(f"running since: {running[-1]['start_time']} (pid {running[-1]['pid']})\n")
    return ExitCode.OK


def write_fields(fields: Mapping[str, Any], out: TextIO, indent: str = "") -> None:
    """`key: value` lines as a person reads them, not as the wire carries them: a field without
    a value (JSON null, empty) is left out; text of several lines (Kudu's CRLF-ended
    `detailed_status`, a line per daemon) goes on its own lines, indented; a nested object
    (`latest_run`, `settings`) is an indented block; other values are JSON (`true`, `3`)."""
    for key, value in fields.items():
        if value is None or value in ("", {}, []):
            continue
        if isinstance(value, Mapping):
            out.write(f"{indent}{key}:\n")
            write_fields(value, out, indent + "  ")
            continue
        lines = (value if isinstance(value, str) else json.dumps(value)).splitlines()
        if len(lines) == 1:
            out.write(f"{indent}{key}: {lines[0]}\n")
        else:
            out.write(f"{indent}{key}:\n")
            out.writelines(f"{indent}  {line}\n" for line in lines)


def cmd_run(
    client: ApiClient,
    out: TextIO,
    name: str,
    arguments: Sequence[str],
    *,
    wait: bool,
    follow: bool,
    timeout_s: float | None,
) -> int:
    quoted = urllib.parse.quote(name, safe="")
    query = f"?arguments={urllib.parse.quote(shlex.join(arguments))}" if arguments else ""
    answer = client.request("POST", f"/api/triggeredwebjobs/{quoted}/run{query}", ok=(202,))
    location = answer.headers.get("Location")
    if not location:
        raise ClientError("the daemon did not say where the run is", ExitCode.REFUSED)
    if not (wait or follow):
        out.write(f"{location.rstrip('/').rsplit('/', 1)[-1]}\n")
        return ExitCode.OK
    run_id = location.rstrip("/").rsplit("/", 1)[-1]
    if follow:
        stream = f"/api/triggeredwebjobs/{quoted}/history/{run_id}/logstream?offset=0"
        follow_stream(client, stream, out, timeout_s=timeout_s)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        run = client.request("GET", location).json()
        if run.get("status") in FINISHED:
            print(f"run {run['id']}: {run['status']} in {run.get('duration')}", file=sys.stderr)
            return outcome(succeeded=run["status"] == "Success")
        if deadline is not None and time.monotonic() > deadline:
            message = f"run {run['id']} still {run['status']} at the timeout"
            raise ClientError(message, ExitCode.RUN_FAILED)
        time.sleep(FOLLOW_POLL_S)  # polling the API is the wait here


def outcome(*, succeeded: bool) -> ExitCode:
    """The exit code of a verb that waited for something the daemon ran (a run, a deployment):
    the command itself worked, so anything but success is RUN_FAILED, not an error of ours."""
    return ExitCode.OK if succeeded else ExitCode.RUN_FAILED


def follow_stream(
    client: ApiClient, path: str, out: TextIO, *, timeout_s: float | None = None
) -> str | None:
    """Print the data lines of an SSE log stream until it ends; returns the `end` event's data."""
    response = client.open("GET", path, headers={"Accept": "text/event-stream"})
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    event = "message"
    with response:
        for raw in response:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:") and event == "message":
                out.write(line[5:].removeprefix(" ") + "\n")
            elif line.startswith("data:") and event == "end":
                out.flush()
                return line[5:].strip()
            elif not line:
                event = "message"
                out.flush()
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError("timed out following the output", ExitCode.RUN_FAILED)
    return None


def cmd_logs(client: ApiClient, out: TextIO, name: str, kind: str | None, *, follow: bool) -> int:
    job = find_job(client, name, kind)
    quoted = urllib.parse.quote(name, safe="")
    if job["type"] == "triggered":
        latest = job.get("latest_run") or {}
        if not latest.get("id"):
            out.write(f"{name} has no runs yet\n")
            return ExitCode.OK
        path = f"/api/triggeredwebjobs/{quoted}/history/{latest['id']}/logstream?offset=0"
    else:
        path = f"/api/continuouswebjobs/{quoted}/logstream?offset=0"
    if not follow:
        path += "&follow=false"
    follow_stream(client, path, out)
    return ExitCode.OK


def cmd_history(client: ApiClient, out: TextIO, name: str) -> int:
    quoted = urllib.parse.quote(name, safe="")
    runs = client.request("GET", f"/api/triggeredwebjobs/{quoted}/history").json()["runs"]
    if not runs:
        out.write("no runs\n")
        return ExitCode.OK
    rows = [["ID", "STATUS", "START", "DURATION", "TRIGGER"]]
    for run in runs:
        rows.append(
            [
                run["id"],
                run["status"],
                str(run.get("start_time") or ""),
                str(run.get("duration") or ""),
                str(run.get("trigger") or ""),
            ]
        )
    table(rows, out)
    return ExitCode.OK


def cmd_stop_start(client: ApiClient, out: TextIO, verb: str, name: str) -> int:
    quoted = urllib.parse.quote(name, safe="")
    client.request("POST", f"/api/continuouswebjobs/{quoted}/{verb}")
    out.write(f"{name}: {'stopping' if verb == 'stop' else 'starting'}\n")
    return ExitCode.OK


def cmd_delete(client: ApiClient, out: TextIO, name: str, kind: str | None) -> int:
    job = find_job(client, name, kind)
    quoted = urllib.parse.quote(name, safe="")
    client.request("DELETE", f"/api/{job['type']}webjobs/{quoted}")
    out.write(f"{name}: deleted\n")
    return ExitCode.OK


def cmd_settings(
    client: ApiClient, out: TextIO, name: str, kind: str | None, pairs: Sequence[str]
) -> int:
    job = find_job(client, name, kind)
    path = f"/api/{job['type']}webjobs/{urllib.parse.quote(name, safe='')}/settings"
    settings: dict[str, Any] = client.request("GET", path).json()
    if pairs:
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep or not key:
                raise ClientError(f"expected KEY=VALUE, got {pair!r}", ExitCode.USAGE)
            settings[key] = _setting_value(raw)
        body = json.dumps(settings).encode()
        client.request("PUT", path, body=body, headers={"Content-Type": "application/json"})
    out.write(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return ExitCode.OK


def _setting_value(raw: str) -> Any:
    """JSON when it parses (numbers, booleans, null, objects), the text itself otherwise."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def cmd_deploy(
    client: ApiClient, out: TextIO, path: Path, kind: str, name: str | None, *, progress: bool
) -> int:
    if not path.exists():
        raise ClientError(f"{path}: no such file or folder", ExitCode.USAGE)
    job_name = name or path.resolve().name.removesuffix(".zip")
    if path.is_dir():
        payload, filename, content_type = zip_folder(path), f"{job_name}.zip", "application/zip"
    else:
        payload = path.read_bytes()
        filename = path.name
        content_type = (
            "application/zip" if path.suffix.lower() == ".zip" else "application/octet-stream"
        )
    body: IO[bytes] = io.BytesIO(payload)
    if progress and len(payload) >= PROGRESS_MIN_BYTES:
        body = ProgressReader(body, len(payload), sys.stderr)  # type: ignore[assignment]
    answer = client.request(
        "PUT",
        f"/api/{kind}webjobs/{urllib.parse.quote(job_name, safe='')}",
        body=body,
        headers={
            "Content-Type": content_type,
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Content-Length": str(len(payload)),
        },
    )
    job = answer.json()
    out.write(f"{job['name']}: deployed as a {job['type']} job, runs {job['run_command']}\n")
    return ExitCode.OK


def zip_folder(folder: Path) -> bytes:
    """The folder's files (not the folder itself) in a zip; links are stored as their targets'
    contents would be refused by the daemon, so they are skipped with a note."""
    buffer = io.BytesIO()
    write_folder_zip(folder, buffer)
    return buffer.getvalue()


def write_folder_zip(folder: Path, target: IO[bytes]) -> None:
    """`zip_folder` into any binary file (a temp file for a whole site)."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(_files(folder)):
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink():
                print(f"skipping symbolic link {relative}", file=sys.stderr)
                continue
            archive.write(path, relative)


def _files(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in files:
            yield Path(root) / name


class ProgressReader(io.RawIOBase):
    """Counts what the upload reads and draws a bar on the terminal."""

    def __init__(self, inner: IO[bytes], total: int, terminal: TextIO) -> None:
        super().__init__()
        self._inner = inner
        self._total = total
        self._terminal = terminal
        self._sent = 0
        self._drawn = -1

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self._sent += len(data)
        self._draw()
        return data

    def _draw(self) -> None:
        percent = self._sent * 100 // max(self._total, 1)
        if percent == self._drawn:
            return
        self._drawn = percent
        filled = percent // 5
        self._terminal.write(
            f"\ruploading [{'#' * filled}{'.' * (20 - filled)}] {percent:3d}% "
            f"{self._sent / 1048576:.1f}/{self._total / 1048576:.1f} MiB"
        )
        if self._sent >= self._total:
            self._terminal.write("\n")
        self._terminal.flush()
