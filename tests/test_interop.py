"""Interoperability: a third-party Kudu client (`kudu-api` from the npm registry) drives the
daemon through the whole job lifecycle. See tests/interop/kudu_api_client.js for the client
script and the one adaptation it needs (its base URL is hard-coded to Azure)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from tests.helpers import Site
from tests.test_api_jobs import CREDENTIALS, api

INTEROP = Path(__file__).with_name("interop")


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
async def test_kudu_api_npm_client_drives_the_whole_lifecycle(site: Site, tmp_path: Path) -> None:
    assert (INTEROP / "node_modules" / "kudu-api").is_dir(), (
        "run `npm ci --prefix tests/interop` (part of the README's test command)"
    )
    task_zip = tmp_path / "task.zip"
    with zipfile.ZipFile(task_zip, "w") as archive:
        archive.writestr("run.sh", 'echo "args=$#"; for a in "$@"; do echo "<$a>"; done\n')
    svc = tmp_path / "run.sh"
    svc.write_text("while true; do sleep 0.2; done\n")
    async with api(site) as (_daemon, _session, base):
        process = await asyncio.create_subprocess_exec(
            "node",
            str(INTEROP / "kudu_api_client.js"),
            env={
                **os.environ,
                "KUDU_URL": base + "/",
                "KUDU_USER": CREDENTIALS["WEBJOBSD_USERNAME"],
                "KUDU_PASSWORD": CREDENTIALS["WEBJOBSD_PASSWORD"],
                "TASK_ZIP": str(task_zip),
                "SVC_SCRIPT": str(svc),
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    seen = json.loads(stdout)
    assert seen["uploaded"] == "interop-task"
    assert seen["continuous"] == "interop-svc"
    assert seen["listed"] == ["triggered/interop-task", "continuous/interop-svc"]
    assert seen["runStatus"] == 202
    assert "/api/triggeredwebjobs/interop-task/history/" in seen["location"]
    assert seen["historyStatus"] == "Success"
    assert seen["runTrigger"].startswith("External - ")
    assert seen["swaggerPaths"] == ["/api/triggeredjobs/interop-task/run"]
    assert seen["settings"] == {"stopping_wait_time": 3}
    assert seen["stopStatus"] == 200 and seen["startStatus"] == 200
    assert seen["afterDelete"] == 0
