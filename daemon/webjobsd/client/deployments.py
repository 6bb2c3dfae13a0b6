"""The site deployment verbs: `deploy-site` (a folder or a zip through `/api/zipdeploy`) and
`deployments` (the history, one record, its log). HTTP only, like every client verb: the
routes and JSON are Kudu's (KUDU-DEPLOY-SPEC §1, §3), so nothing here imports the daemon's
deploy stage.

Decisions:

* **A folder is zipped into a temp file,** not into memory: a site may be large, and a file on
  disk gives the upload its Content-Length (a counted body, a progress bar) for free.
* **Always asynchronous** (`isAsync=true`), as Kudu's clients do: the daemon answers 202 once the
  pending record exists; `--wait` then follows it. The `Location` answer (`…/latest?…`) is read
  once, which names the record; the record is then polled by its id, so a deployment started by
  someone else after ours cannot be mistaken for ours. A 404 by id (a temporary record replaced
  by its real one) falls back to the `Location`.
* **The log is polled** (there is no stream of a deployment's log over HTTP): each entry is
  printed once, in order, with its details (Kudu's child entries) indented under it. An
  entry's details are read again until a later sibling has appeared (the pipeline writes an
  entry's details before it moves on), and once more at the end, so no line is lost or
  repeated.
* **Exit codes as for runs** (`commands.outcome`): 0 when the deployment succeeded, RUN_FAILED
  when it failed or the wait timed out; refusals (409 while another deployment runs, 400 for a
  file that is not a zip) keep the client's usual codes.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO

from webjobsd.client.commands import (
    FOLLOW_POLL_S,
    PROGRESS_MIN_BYTES,
    ProgressReader,
    outcome,
    table,
    write_fields,
    write_folder_zip,
)
from webjobsd.client.connection import ApiClient, ClientError, ExitCode

DEPLOYER = "webjobsd-cli"
# Kudu's DeployStatus numbers, as the wire carries them (KUDU-DEPLOY-SPEC §3.1).
STATUS_WORDS = {0: "Pending", 1: "Building", 2: "Deploying", 3: "Failed", 4: "Success"}
FAILED, SUCCESS = 3, 4
# Kudu's LogEntryType numbers: 0 Message, 1 Warning, 2 Error.
LOG_MARKS = {1: "WARNING ", 2: "ERROR "}


def status_words(record: dict[str, Any]) -> str:
    status = record.get("status")
    return STATUS_WORDS.get(status, str(status)) if isinstance(status, int) else str(status)


def is_finished(record: dict[str, Any]) -> bool:
    return record.get("status") in (FAILED, SUCCESS)


def _record_path(record_id: str) -> str:
    return f"/api/deployments/{urllib.parse.quote(record_id, safe='')}"


# -- deploy-site -------------------------------------------------------------------------------


def cmd_deploy_site(
    client: ApiClient,
    out: TextIO,
    path: Path,
    *,
    clean: bool,
    wait: bool,
    message: str | None,
    timeout_s: float | None,
    progress: bool,
) -> int:
    if not path.exists():
        raise ClientError(f"{path}: no such file or folder", ExitCode.USAGE)
    query = {"isAsync": "true", "deployer": DEPLOYER}
    if clean:
        query["clean"] = "true"
    if message:
        query["message"] = message
    with contextlib.ExitStack() as stack:
        package: IO[bytes]
        if path.is_dir():
            package = stack.enter_context(tempfile.TemporaryFile(prefix="webjobsd-site-"))
            write_folder_zip(path, package)
        else:
            package = stack.enter_context(path.open("rb"))
        size = package.seek(0, os.SEEK_END)
        package.seek(0)
        body = package
        if progress and size >= PROGRESS_MIN_BYTES:
            body = ProgressReader(package, size, sys.stderr)  # type: ignore[assignment]
        answer = client.request(
            "POST",
            f"/api/zipdeploy?{urllib.parse.urlencode(query)}",
            body=body,
            headers={"Content-Type": "application/zip", "Content-Length": str(size)},
            ok=(200, 202),
        )
    location = answer.headers.get("Location")
    if not location:
        raise ClientError("the daemon did not say where the deployment is", ExitCode.REFUSED)
    record = client.request("GET", location, ok=(200, 202)).json()
    if not wait:
        out.write(f"{record['id']}\n")
        return ExitCode.OK
    print(f"deployment {record['id']}: {status_words(record)}", file=sys.stderr)
    record = follow_deployment(client, record, location, out, timeout_s=timeout_s)
    print(f"deployment {record['id']}: {status_words(record)}", file=sys.stderr)
    for label, key in (("changed jobs", "changed_jobs"), ("removed jobs", "removed_jobs")):
        if record.get(key):
            print(f"{label}: {', '.join(record[key])}", file=sys.stderr)
    return outcome(succeeded=record.get("status") == SUCCESS)


def follow_deployment(
    client: ApiClient,
    record: dict[str, Any],
    location: str,
    out: TextIO,
    *,
    timeout_s: float | None,
) -> dict[str, Any]:
    """Print the record's log as it grows until the record is finished; the finished record."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    printer = LogPrinter(client, record["id"], out)
    while True:
        printer.print_new(final=is_finished(record))
        if is_finished(record):
            return record
        if deadline is not None and time.monotonic() > deadline:
            message = f"deployment {record['id']} still {status_words(record)} at the timeout"
            raise ClientError(message, ExitCode.RUN_FAILED)
        time.sleep(FOLLOW_POLL_S)  # polling the API is the wait here
        record = _poll(client, record["id"], location)
        if record["id"] != printer.record_id:
            printer = LogPrinter(client, record["id"], out)


def _poll(client: ApiClient, record_id: str, location: str) -> dict[str, Any]:
    try:
        found: dict[str, Any] = client.request("GET", _record_path(record_id), ok=(200, 202)).json()
    except ClientError as error:
        if error.code != ExitCode.NOT_FOUND:
            raise
        found = client.request("GET", location, ok=(200, 202)).json()
    return found


@dataclass
class LogPrinter:
    """Prints a deployment's log entries once each, in order, details under their entry (at
    any depth: an entry's details may have details of their own)."""

    client: ApiClient
    record_id: str
    out: TextIO
    printed: dict[str, int] = field(default_factory=dict)  # entries printed, by parent id
    settled: set[str] = field(default_factory=set)  # entries whose details are all printed

    def print_new(self, *, final: bool = False) -> None:
        self._walk(self._read(_record_path(self.record_id) + "/log"), "", 0, final)
        self.out.flush()

    def _walk(self, entries: list[dict[str, Any]], parent: str, depth: int, final: bool) -> None:
        for index, entry in enumerate(entries):
            if index >= self.printed.get(parent, 0):
                write_entry(entry, self.out, indent="  " * depth)
                self.printed[parent] = index + 1
            entry_id = str(entry.get("id") or "")
            if not entry_id or not entry.get("details_url") or entry_id in self.settled:
                continue
            # Read once more after a later entry exists (its details were all written
            # before it), then never again.
            closed = final or index + 1 < len(entries)
            path = f"{_record_path(self.record_id)}/log/{urllib.parse.quote(entry_id, safe='')}"
            self._walk(self._read(path), entry_id, depth + 1, closed)
            if closed:
                self.settled.add(entry_id)

    def _read(self, path: str) -> list[dict[str, Any]]:
        try:
            entries: list[dict[str, Any]] = self.client.request("GET", path).json()
        except ClientError as error:
            if error.code == ExitCode.NOT_FOUND:  # nothing written yet
                return []
            raise
        return entries


def utc_time(value: object) -> str:
    """Kudu's `2026-12-02T07:11:48.1234560Z` to the second, and still saying it is UTC."""
    stamp = str(value or "")
    return stamp[:19].replace("T", " ") + ("Z" if stamp.endswith("Z") else "")


def write_entry(entry: dict[str, Any], out: TextIO, indent: str = "") -> None:
    when = utc_time(entry.get("log_time"))
    mark = LOG_MARKS.get(entry.get("type", 0), "")
    lines = str(entry.get("message") or "").splitlines() or [""]
    out.write(f"{when}  {indent}{mark}{lines[0]}\n")
    # A message of several lines (a script's output) keeps its lines under the first.
    out.writelines(f"{' ' * len(when)}  {indent}  {line}\n" for line in lines[1:])


# -- deployments -------------------------------------------------------------------------------


def cmd_deployments(client: ApiClient, out: TextIO, record_id: str | None, *, log: bool) -> int:
    if record_id is None and not log:
        return _history(client, out)
    record = client.request("GET", _record_path(record_id or "latest"), ok=(200, 202)).json()
    if log:
        LogPrinter(client, record["id"], out).print_new(final=True)
        return ExitCode.OK
    fields = dict(record)
    fields["status"] = f"{status_words(record)} ({record.get('status')})"
    for key in ("changed_jobs", "removed_jobs"):
        if isinstance(fields.get(key), list):
            fields[key] = ", ".join(fields[key]) or None
    write_fields(fields, out)
    return ExitCode.OK


def _history(client: ApiClient, out: TextIO) -> int:
    records = client.request("GET", "/api/deployments").json()
    if not records:
        out.write("no deployments\n")
        return ExitCode.OK
    rows = [["ID", "STATUS", "ACTIVE", "RECEIVED", "DEPLOYER", "AUTHOR", "MESSAGE"]]
    for record in records:
        rows.append(
            [
                str(record["id"]),
                status_words(record),
                "*" if record.get("active") else "",
                utc_time(record.get("received_time")),
                str(record.get("deployer") or ""),
                str(record.get("author") or ""),
                " ".join(str(record.get("message") or "").split()),
            ]
        )
    table(rows, out)
    return ExitCode.OK
