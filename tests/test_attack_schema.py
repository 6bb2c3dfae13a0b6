"""Schemathesis against the contract the daemon serves, on a real daemon (the CLI, as a child
process, with Basic auth) and a real site: no 5xx anywhere, and every answer documented (status
code, content type, headers, body schema).

* The schema is `openapi.yaml`, loaded from the package at collection time (pytest needs the
  operations then); `test_the_fuzzed_schema_is_the_served_one` proves the daemon serves exactly
  those bytes at `/api/openapi.yaml`. One test per operation: schemathesis' coverage phase
  (boundary and negative values, missing headers and credentials, other methods) as explicit
  examples, then `MAX_EXAMPLES` generated ones; derandomized and without an example database,
  so a run is reproducible.
* One daemon serves the module (starting one per operation would cost more than the fuzzing),
  so state changes between cases: a DELETE removes a job, a stop disables one, an upload
  replaces one. Within an operation that is accepted; before each operation the site is put
  back (`Fuzzed.restore`). Real job names, run ids, site paths and setting keys are mixed into
  the generated path parameters, and valid uploads into the upload bodies, so that cases reach
  real objects and not only 404s and 400s.
* Cases sent without our credentials (schemathesis drops or garbles `Authorization` on purpose)
  must be a JSON 401 with the challenge; openapi.yaml does not document that 401, which
  `test_refusal_without_credentials_is_documented` reports once instead of every operation's
  test failing on it.

Budget: about 45 s for the module on 2 cores (`MAX_EXAMPLES` per operation; 70 operations since the
deployment routes, so 60 examples each rather than 100: the coverage phase's explicit cases, which
find most refusals, are all sent either way).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import zipfile
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from yarl import URL

from tests.helpers import DaemonProcess, Site, processes_with_marker, wait_for_sync
from tests.test_attack_auth import daemon_port
from webjobsd.http.server import OPENAPI
from webjobsd.webhooks.subscriptions import HookError, validate_url

USER = "fuzzer"
PASSWORD = "fuzz-pass-1234"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
MAX_EXAMPLES = 60

# A continuous job that answers every method on its WEBJOBS_PORT (the passthrough target) with
# 200, so that a 5xx through the passthrough can only come from the daemon.
ECHO_SERVER = """\
import http.server, json, os

class Echo(http.server.BaseHTTPRequestHandler):
    def answer(self):
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = json.dumps({"method": self.command, "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = answer

    def log_message(self, *args):
        pass

port = int(os.environ["WEBJOBS_PORT"])
http.server.ThreadingHTTPServer(("127.0.0.1", port), Echo).serve_forever()
"""

JOBS: dict[tuple[str, str], dict[str, str]] = {
    ("continuous", "echo"): {"run.py": ECHO_SERVER},
    ("continuous", "idle"): {"run.sh": "while true; do sleep 0.2; done\n"},
    ("triggered", "report"): {"run.sh": "echo report done\n"},
    ("triggered", "failing"): {"run.sh": "echo about to fail >&2\nexit 3\n"},
}
SITE_FILES = {"site/wwwroot/hello.txt": "hello\n", "site/wwwroot/docs/readme.md": "# docs\n"}
SETTINGS = {"FUZZ_SETTING": "fuzz"}

# Real objects (and one name too long for Linux) mixed into generated path parameters; run ids
# are filled in by `restore`.
KNOWN: dict[str, list[str]] = {
    "name": sorted(name for _kind, name in JOBS),
    "runId": [],
    "path": [
        "site/wwwroot/hello.txt",
        "site/wwwroot/docs/",
        "site/wwwroot/docs",
        "site/wwwroot/docs/readme.md",
        "site/wwwroot/new-folder/",
        "data/jobs/triggered/report/",
        "site/wwwroot/App_Data/jobs/continuous/idle/",
        "",
        "x" * 300,  # longer than a Linux file name may be
    ],
    "key": [*SETTINGS, "WEBSITE_SITE_NAME"],
}


def _zip(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


# Uploads that deploy (or extract) for real, mixed into the generated upload cases: media type,
# Content-Disposition and body that go together.
UPLOADS = {
    "PUT /api/continuouswebjobs/{name}",
    "PUT /api/triggeredwebjobs/{name}",
    "PUT /api/zip/{path}",
}
VALID_UPLOADS = [
    ("application/zip", "attachment; filename=job.zip", _zip({"run.sh": "echo zip\nsleep 1\n"})),
    (
        "application/zip",
        'attachment; filename="app.zip"',
        _zip({"app/run.py": "print('app')\n", "app/settings.job": '{"is_singleton": false}'}),
    ),
    ("application/octet-stream", "attachment; filename=run.sh", b"echo single file\n"),
]
SCHEMA = schemathesis.openapi.from_path(OPENAPI)
SCHEMA.config.update(basic_auth=(USER, PASSWORD))
# Negative cases come from the coverage phase (missing headers and credentials, values of the
# wrong type, other methods); the generated ones are positive, so that most of them carry our
# credentials and reach the handlers.
SCHEMA.config.phases.fuzzing.generation.update(modes=[schemathesis.GenerationMode.POSITIVE])
# The upload routes take a zip: sent as the generated bytes, like application/octet-stream.
schemathesis.serializer.alias("application/zip", "application/octet-stream")
# git's own request bodies (pkt-lines and packs): fuzzed as the bytes they are, so that `git
# upload-pack`/`receive-pack` get garbage and the daemon must answer it without a 5xx.
schemathesis.serializer.alias("application/x-git-upload-pack-request", "application/octet-stream")
schemathesis.serializer.alias("application/x-git-receive-pack-request", "application/octet-stream")
# git's dumb protocol (`info/refs` without `service`) is refused with 501, as Kudu does: a
# documented answer by design, not a server error.
DUMB_PROTOCOL = "The dumb protocol is not supported."

_METHODS = ("get", "put", "post", "delete", "patch", "head")
SPEC = yaml.safe_load(OPENAPI.read_text())
OPERATIONS = [
    f"{method.upper()} {path}"
    for path, item in SPEC["paths"].items()
    for method in item
    if method in _METHODS
]
# Log streams follow the log until the client leaves, so a case's answer would never end:
# every case of theirs is sent with `follow=false`, which ends the stream once the backlog is
# sent (following itself is tested in test_logstream.py).
LOG_STREAMS = {operation for operation in OPERATIONS if operation.endswith("/logstream")}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def loopback_hook(body: Any) -> Any:
    """A hook URL the daemon would accept keeps its form but points to a closed loopback port:
    the events of fuzzed subscriptions must never leave this machine."""
    if not isinstance(body, dict) or not isinstance(body.get("url"), str):
        return body
    try:
        validate_url(body["url"])
    except HookError:
        return body
    try:
        url = str(URL(body["url"].strip()).with_host("127.0.0.1").with_port(9))
    except (ValueError, TypeError):
        url = "http://127.0.0.1:9/"
    return {**body, "url": url}


def _sometimes(values: list[Any], generated: Any) -> st.SearchStrategy[Any]:
    return st.one_of(st.just(generated), st.sampled_from(values)) if values else st.just(generated)


@SCHEMA.hook
def before_generate_path_parameters(context: Any, strategy: st.SearchStrategy[Any]) -> Any:
    """Each path parameter is, half of the time, a real job name, run id, path or key; a run's
    name and id also come as a pair that exists."""

    def with_known(parameters: dict[str, Any] | None) -> st.SearchStrategy[Any]:
        if not parameters:
            return st.just(parameters)
        mixed = st.fixed_dictionaries(
            {key: _sometimes(KNOWN.get(key, []), value) for key, value in parameters.items()}
        )
        if "runId" not in parameters or not KNOWN["runId"]:
            return mixed
        real_run = st.sampled_from(KNOWN["runId"]).map(
            lambda run_id: {**parameters, "name": "report", "runId": run_id}
        )
        return st.one_of(mixed, real_run)

    return strategy.flatmap(with_known)


@SCHEMA.hook
def before_generate_case(context: Any, strategy: st.SearchStrategy[Any]) -> Any:
    """Half of the upload cases carry a valid upload (the rest are generated bytes)."""
    if context.operation.label not in UPLOADS:
        return strategy

    def valid(case: schemathesis.Case, upload: tuple[str, str, bytes]) -> schemathesis.Case:
        case.media_type, disposition, case.body = upload
        case.headers = {**(case.headers or {}), "Content-Disposition": disposition}
        return case

    return st.one_of(
        strategy, st.tuples(strategy, st.sampled_from(VALID_UPLOADS)).map(lambda p: valid(*p))
    )


class Fuzzed:
    """The module's daemon, its site, and the state each operation starts from."""

    def __init__(self, daemon: DaemonProcess, base: str) -> None:
        self.daemon = daemon
        self.site = daemon.site
        self.base = base
        self.session = requests.Session()  # keep-alive; the credentials come with each case

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", 10)
        headers = {"Authorization": AUTH, **kwargs.pop("headers", {})}
        return self.session.request(method, self.base + path, headers=headers, **kwargs)

    def restore(self) -> None:
        """Put back what earlier operations removed or changed: the jobs (exactly their files,
        enabled, no settings.job), the site files, the settings and some runs."""
        for (kind, name), files in JOBS.items():
            folder = self.site.job_dir(kind, name)
            present = {
                str(p.relative_to(folder)): p.read_text(errors="replace")
                for p in (folder.rglob("*") if folder.is_dir() else [])
                if p.is_file()
            }
            if present != files:
                shutil.rmtree(folder, ignore_errors=True)
                self.site.write_job(kind, name, files)
        for rel, content in SITE_FILES.items():
            path = self.site.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        assert self.request("POST", "/api/settings", json=SETTINGS).status_code == 200
        for hook in self.request("GET", "/api/hooks").json():
            self.request("DELETE", f"/api/hooks/{hook['id']}")
        known_hook = {"url": "http://127.0.0.1:9/known", "event": "TriggeredJobFinished"}
        KNOWN["id"] = [self.request("POST", "/api/hooks", json=known_hook).json()["id"]]

        def all_listed() -> bool:
            response = self.request("GET", "/api/webjobs")
            return response.ok and {job["name"] for job in response.json()} >= set(KNOWN["name"])

        wait_for_sync(all_listed, timeout=15, what="every fixture job listed again")
        wait_for_sync(
            lambda: self.request("GET", "/api/continuouswebjobs/echo/passthrough/").ok,
            timeout=15,
            what="the echo job answering through the passthrough",
        )
        runs = self.request("GET", "/api/triggeredwebjobs/report/history").json()["runs"]
        if not runs:
            KNOWN["runId"] = [self.run("report"), self.run("report")]

    def run(self, name: str) -> str:
        response = self.request("POST", f"/api/triggeredwebjobs/{name}/run")
        assert response.status_code == 202, response.text
        location = response.headers["Location"][len(self.base) :]
        wait_for_sync(
            lambda: self.request("GET", location).json()["status"] in ("Success", "Failed"),
            what=f"the run of {name} to finish",
        )
        return location.rsplit("/", 1)[1]


@pytest.fixture(autouse=True)
def no_leaked_processes() -> Iterator[None]:
    """Replaces conftest's per-test check in this module: the jobs of the module's daemon live
    across tests (an upload starts one, a run starts one). `fuzzed` checks, once the daemon
    has stopped, that none of them outlived it."""
    yield


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    site = Site(tmp_path_factory.mktemp("fuzzed-daemon"))
    daemon = DaemonProcess(site, auth=True, log_level="info", debounce_s=0.1)
    daemon.start(env={"WEBJOBSD_USERNAME": USER, "WEBJOBSD_PASSWORD": PASSWORD})
    try:
        port = wait_for_sync(lambda: daemon_port(daemon), timeout=20, what="the daemon to listen")
        state = Fuzzed(daemon, f"http://127.0.0.1:{port}")
        state.restore()
        yield state
        state.session.close()
    finally:
        code = daemon.stop()
    assert code == 0, daemon.log()[-4000:]
    assert not processes_with_marker(f"@{site.root}\0".encode()), "job processes outlived it"


@pytest.fixture
def restored(fuzzed: Fuzzed) -> Fuzzed:
    """Once per operation, not per example: the fixture's jobs, files, settings and runs."""
    fuzzed.restore()
    return fuzzed


def test_the_fuzzed_schema_is_the_served_one(fuzzed: Fuzzed) -> None:
    response = fuzzed.request("GET", "/api/openapi.yaml")
    assert response.status_code == 200
    assert response.content == OPENAPI.read_bytes()
    labels = [result.ok().label for result in SCHEMA.get_all_operations()]
    assert sorted(labels) == sorted(OPERATIONS)


@SCHEMA.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    phases=[Phase.explicit, Phase.generate],
)
def test_operation_conforms(case: schemathesis.Case, restored: Fuzzed) -> None:
    if case.operation.label in LOG_STREAMS:
        case.query = {**(case.query or {}), "follow": "false"}
    if case.operation.label == "POST /api/hooks":
        case.body = loopback_hook(case.body)
    response = case.call(base_url=restored.base, session=restored.session, timeout=30)
    if response.request.headers.get("Authorization") != AUTH and case.operation.security:
        # Missing, empty or generated credentials: refused, never served. The 401 itself is
        # not in openapi.yaml yet (see test_refusal_without_credentials_is_documented).
        assert response.status_code == 401, (response.status_code, response.text)
        assert response.headers["www-authenticate"] == ['Basic realm="webjobsd", charset="UTF-8"']
        if case.method != "HEAD":
            assert set(json.loads(response.content)) == {"message"}
        return
    checks = CHECKS
    if response.status_code == 501 and response.text.strip() == DUMB_PROTOCOL:
        checks = [check for check in CHECKS if check is not not_a_server_error]
    case.validate_response(response, checks=checks)


SECURED = [
    (path, method)
    for path, item in SPEC["paths"].items()
    for method, operation in item.items()
    if method in _METHODS and operation.get("security", SPEC["security"])
]


def test_refusal_without_credentials_is_documented(fuzzed: Fuzzed) -> None:
    """Every secured operation answers 401 without credentials, so openapi.yaml must say so.

    Failing at the time of writing: no operation documents 401 (a spec gap, reported)."""
    assert fuzzed.session.get(f"{fuzzed.base}/api/webjobs", timeout=10).status_code == 401
    undocumented = [
        f"{method.upper()} {path}"
        for path, method in SECURED
        if not {"401", "4XX", "default"} & set(SPEC["paths"][path][method]["responses"])
    ]
    assert undocumented == [], f"401 missing from openapi.yaml for {undocumented}"


def test_no_request_reached_the_catch_all(fuzzed: Fuzzed) -> None:
    """Last in the module: every exception a case raised in a handler was an answer; the error
    middleware's catch-all (a logged 500) never ran."""
    crashes = [
        line for line in fuzzed.daemon.log().splitlines() if "unhandled error in request" in line
    ]
    assert crashes == [], "\n".join(line[:2000] for line in crashes[:3])
