"""A daemon killed (SIGKILL) in the middle of a site deployment, during the extraction and during
the sync: after a restart the record says Failed, nothing of the deployment is left in staging,
the temp root or wwwroot's temporary names, every job folder is wholly the old version or wholly
the new one, and the next deployment works.

Real daemon processes, real HTTP, real SIGKILLs. The deployment is made slow with large files
(zeros: a small zip, much to write), and the kill waits for the deployment's own log line.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import DaemonProcess, Site, wait_for, wait_for_sync
from tests.test_faults import ready
from tests.test_zipdeploy import OCTET, site_zip
from webjobsd.deploy.staging import STAGING
from webjobsd.deploy.sync import TEMP_PREFIX
from webjobsd.runtime.jobprocess import free_loopback_port

JOBS = ("one", "two", "three")
PAD = 40 * 1024 * 1024
MANY = 800  # files per job: building a job folder takes a while, so the kill lands inside it


def version(tag: str, *, big: bool = False) -> dict[str, str | bytes]:
    files: dict[str, str | bytes] = {"index.html": f"<h1>{tag}</h1>"}
    for name in JOBS:
        folder = f"App_Data/jobs/triggered/{name}"
        files[f"{folder}/run.sh"] = f"#!/bin/sh\necho {name} {tag}\n"
        files[f"{folder}/lib/data.txt"] = f"data of {name}, version {tag}\n"
        if big:
            files[f"{folder}/pad.bin"] = bytes(PAD)
            for index in range(MANY):
                files[f"{folder}/many/f{index:04d}.txt"] = f"{name} {index}\n"
    if big:
        files["static/big.bin"] = bytes(PAD)
    return files


def folder_digest(folder: Path) -> dict[str, str]:
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            found[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def expected_digest(files: dict[str, str | bytes], name: str) -> dict[str, str]:
    prefix = f"App_Data/jobs/triggered/{name}/"
    return {
        rel[len(prefix) :]: hashlib.sha256(
            content.encode() if isinstance(content, str) else content
        ).hexdigest()
        for rel, content in files.items()
        if rel.startswith(prefix)
    }


def leftovers(site: Site) -> list[str]:
    found = []
    staging = site.jobs / STAGING
    if staging.exists():
        found += [str(p) for p in staging.rglob("*")] or [str(staging)]
    for folder in (site.temp / "deployments", site.temp / "uploads"):
        if folder.is_dir():
            found += [str(p) for p in folder.iterdir()]
    www = site.root / "site" / "wwwroot"
    found += [str(p) for p in www.rglob(f"{TEMP_PREFIX}*")]
    marker = site.root / "site" / "locks" / "deployments.sync.json"
    if marker.exists():
        found.append(str(marker))
    return found


def log_messages(site: Site, deployment: str) -> list[str]:
    path = site.root / "site" / "deployments" / deployment / "log.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    messages = []
    for line in lines:
        try:
            messages.append(json.loads(line)["message"])
        except ValueError:
            continue
    return messages


def start(site: Site, port: int) -> DaemonProcess:
    daemon = DaemonProcess(site, listen=f"127.0.0.1:{port}").start()
    wait_for_sync(lambda: ready(port), timeout=30, what="daemon ready")
    return daemon


@pytest.mark.parametrize(
    "moment",
    [
        "Cleaning up temp folders from previous zip deployments",  # extracting
        "Preparing job folders",  # the sync, building the new job folders
    ],
)
async def test_sigkill_in_the_middle_of_a_deployment(site: Site, moment: str) -> None:
    port = free_loopback_port()
    base = f"http://127.0.0.1:{port}"
    old, new = version("v1"), version("v2", big=True)
    daemon = start(site, port)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{base}/api/zipdeploy", data=site_zip(old), headers=OCTET
            ) as response:
                assert response.status == 200, await response.text()
            async with session.post(
                f"{base}/api/zipdeploy?isAsync=true&trackDeploymentProgress=true",
                data=site_zip(new),
                headers=OCTET,
            ) as response:
                assert response.status == 202, await response.text()
                deployment = response.headers["SCM-DEPLOYMENT-ID"]
        await wait_for(
            lambda: any(m.startswith(moment) for m in log_messages(site, deployment)),
            timeout=20,
            interval=0.005,
            what=moment,
        )
        daemon.kill()
        # The kill landed in the phase meant: still extracting, or still building job folders.
        not_yet = "Running deployment command..." if moment.startswith("Cleaning") else "Swapping"
        messages = log_messages(site, deployment)
        assert not any(m.startswith(not_yet) for m in messages), f"killed too late: {messages}"
        debris = leftovers(site)
        assert debris, "the kill landed in the middle of the work"

        daemon = start(site, port)
        assert leftovers(site) == [], f"left after the restart (before it: {debris})"
        for name in JOBS:
            content = folder_digest(site.job_dir("triggered", name))
            assert content in (expected_digest(old, name), expected_digest(new, name)), name
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/api/deployments/{deployment}") as response:
                assert response.status == 200, await response.text()
                assert (await response.json())["status"] == 3
            again = version("v3")
            async with session.post(
                f"{base}/api/zipdeploy", data=site_zip(again), headers=OCTET
            ) as response:
                assert response.status == 200, await response.text()
        for name in JOBS:
            assert folder_digest(site.job_dir("triggered", name)) == expected_digest(again, name)
        assert leftovers(site) == []
        assert daemon.stop() == 0
    finally:
        daemon.kill_if_running()
