"""Deploying from the dashboard in a real headless browser (Debian's chromium driven by
playwright, as in test_dashboard.py) against a real daemon: a site zip chosen with the file
input and one dropped on the Deployments page (a real `drop` event carrying a DataTransfer),
the upload's progress bar, the record with its live log and the jobs it changed, and a job
replaced by a zip dropped on its row and chosen on its own page.

One browser session for all of it: chromium's start is the slow part.
"""

from __future__ import annotations

import base64
import io
import re
import zipfile
from pathlib import Path

import aiohttp
from playwright.async_api import FilePayload, Page, expect

from tests.helpers import Site, wait_for
from tests.test_api_jobs import api, get_json, poll
from tests.test_dashboard import WAIT_MS, assert_every_control_is_named, dashboard

JOBS = "App_Data/jobs"


def zip_of(files: dict[str, str | bytes], *, day: int = 1) -> bytes:
    """Entries dated `day` of January 2024: a new version needs a new date (or size), since
    a deployment copies a file only when its size or time differ, as KuduSync does."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, content in files.items():
            info = zipfile.ZipInfo(name, date_time=(2024, 1, day, 3, 4, 6))
            info.external_attr = (0o755 if name.endswith(".sh") else 0o644) << 16
            archive.writestr(info, content)
    return buffer.getvalue()


def chosen(name: str, content: bytes, mime: str = "application/zip") -> FilePayload:
    return {"name": name, "mimeType": mime, "buffer": content}


# A post-deployment action that holds a deployment (whose site has `hold-me`) until the gate
# file exists: the dashboard is looked at while the deployment runs.
HOLD = """#!/bin/sh
if [ -e "$WEBROOT_PATH/hold-me" ]; then
  echo "holding for the gate"
  while [ ! -e "{gate}" ]; do sleep 0.05; done
  echo "gate open"
fi
"""


def ticker(version: str) -> str:
    return f"echo tick {version}\nexec sleep 1000\n"


async def drop_file(page: Page, selector: str, name: str, content: bytes) -> None:
    """What a person's drag and drop delivers: dragenter/dragover then drop, with a
    DataTransfer holding the file (made in the page; playwright cannot drag from the desktop)."""
    transfer = await page.evaluate_handle(
        """([name, data]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: "application/zip" }));
            return transfer;
        }""",
        [name, base64.b64encode(content).decode()],
    )
    for kind in ("dragenter", "dragover"):
        await page.dispatch_event(selector, kind, {"dataTransfer": transfer})
    await expect(page.locator(selector)).to_have_class(re.compile(r"\bdrop-over\b"))
    await page.dispatch_event(selector, "drop", {"dataTransfer": transfer})
    await transfer.dispose()


async def continuous_status(session: aiohttp.ClientSession, base: str, name: str) -> str:
    async with session.get(f"{base}/api/continuouswebjobs/{name}") as response:
        return str((await response.json()).get("status")) if response.status == 200 else ""


async def test_deploy_the_site_and_redeploy_a_job_from_the_dashboard(
    site: Site, tmp_path: Path
) -> None:
    """1. The Deployments page, reached from the navigation, starts empty.
    2. A site zip chosen with the file input: the bar reaches 100 %; while the deployment runs
       (its post-deployment action waits on a gate) the record says so and its log shows the
       action's line, and another zip is refused; then Success, the job it added, which runs.
    3. A second zip dropped on the page: a new record, the changed job named, the new code runs.
       The page without a record's id follows the latest: one posted by another client shows.
    4. A job zip dropped on the job's row (jobs page) and chosen on the job's page replaces it.
    5. A file that is not a zip is refused with a message, and nothing is uploaded."""
    shots = tmp_path / "screenshots"
    gate = tmp_path / "gate"
    actions = site.root / "site" / "deployments" / "tools" / "PostDeploymentActions"
    actions.mkdir(parents=True)
    (actions / "10-hold.sh").write_text(HOLD.replace("{gate}", str(gate)))
    (actions / "10-hold.sh").chmod(0o755)
    async with api(site) as (_daemon, session, base), dashboard(base, shots) as page:
        await page.goto(base + "/dashboard/")
        await page.get_by_role("link", name="Deployments").click()
        await expect(page).to_have_url(re.compile(r"#/deployments$"))
        await expect(page.locator("h1")).to_have_text("Deployments")
        await expect(page.get_by_text("No deployments yet.")).to_be_visible(timeout=WAIT_MS)
        await assert_every_control_is_named(page)

        # 2. The file input (the accessible way), a zip big enough to be sent in pieces.
        first = zip_of(
            {
                "index.html": "<p>v1</p>\n",
                "hold-me": "",
                f"{JOBS}/continuous/ticker/run.sh": ticker("v1"),
                "assets/blob.bin": base64.b64encode(bytes(range(256)) * 8192).decode(),
            }
        )
        await page.get_by_label("Site zip to deploy").set_input_files(chosen("site.zip", first))
        bar = page.locator("#upload-progress")
        await expect(bar).to_have_js_property("value", 100, timeout=WAIT_MS)
        await expect(page.locator("#upload-percent")).to_contain_text("100 % of")
        await expect(page).to_have_url(re.compile(r"#/deployments/[0-9a-f-]+$"), timeout=WAIT_MS)
        status = page.locator("#deployment-status")
        log = page.locator("#log")
        await expect(log).to_contain_text("holding for the gate", timeout=WAIT_MS)
        await expect(status).to_contain_text(re.compile("Pending|Building"))
        await expect(page.locator("#follow-state")).to_have_text("Following the end.")
        await expect(page.locator("#deployment-ended")).to_have_text("not yet")
        await page.screenshot(path=shots / "deployment-running.png", full_page=True)
        # Another zip meanwhile: refused with Kudu's words, and the running one stays shown.
        await page.get_by_label("Site zip to deploy").set_input_files(
            chosen("other.zip", zip_of({"index.html": "other\n"}))
        )
        await expect(page.locator("#deploy-message")).to_have_text(
            "Not deployed: There is a deployment currently in progress. "
            "Please try again when it completes.",
            timeout=WAIT_MS,
        )
        await expect(status).to_contain_text(re.compile("Pending|Building"))
        gate.write_text("")
        await expect(log).to_contain_text("gate open", timeout=WAIT_MS)
        await expect(status).to_contain_text("Success", timeout=WAIT_MS)
        await expect(page.locator("#deployment-active")).to_have_text("active")
        await expect(page.locator("#changed-jobs")).to_contain_text("ticker (continuous)")
        await expect(page.locator("#deployment-deployer")).to_have_text("dashboard")
        await expect(page.locator("#follow-state")).to_contain_text("ended: Success")
        (record,) = await get_json(session, f"{base}/api/deployments")
        assert page.url.endswith(f"#/deployments/{record['id']}")
        assert record["status"] == 4 and record["message"] == "site.zip dropped on the dashboard"
        assert (site.root / "site" / "wwwroot" / "index.html").read_text() == "<p>v1</p>\n"
        await wait_for(lambda: "tick v1" in site.job_log("ticker"), what="ticker v1 runs")
        await expect(page.locator("tr.deployment")).to_have_count(1, timeout=WAIT_MS)
        await page.screenshot(path=shots / "deployment.png", full_page=True)
        await assert_every_control_is_named(page)

        # 3. Dropped on the page: a second record, which names the job it changed.
        await drop_file(
            page,
            "main",
            "site-v2.zip",
            zip_of(
                {"index.html": "<p>v2</p>\n", f"{JOBS}/continuous/ticker/run.sh": ticker("v2")},
                day=2,
            ),
        )
        await expect(page.locator("tr.deployment")).to_have_count(2, timeout=WAIT_MS)
        await expect(status).to_contain_text("Success", timeout=WAIT_MS)
        await expect(page.locator("#changed-jobs")).to_contain_text("ticker (continuous)")
        second, previous = await get_json(session, f"{base}/api/deployments")
        assert previous["id"] == record["id"]
        assert page.url.endswith(f"#/deployments/{second['id']}")
        assert second["active"] and not previous["active"]
        await expect(page.locator(f'tr.deployment[data-id="{second["id"]}"]')).to_contain_text(
            "active"
        )
        await wait_for(lambda: "tick v2" in site.job_log("ticker"), what="ticker v2 runs")
        # The older record opens from the history, with its own log.
        await page.get_by_role("link", name=f"Deployment {record['id']}").click()
        await expect(page.locator("#deployment-h")).to_contain_text(record["id"])
        await expect(page.locator("#log .entry").first).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator("#deployment-active")).to_have_count(0)

        # The page without an id shows the latest, and the next one as soon as it begins,
        # wherever it comes from (here a client of the API).
        await page.get_by_role("link", name="Deployments").click()
        heading = page.locator("#deployment-h")
        await expect(heading).to_contain_text(second["id"], timeout=WAIT_MS)
        third = zip_of(
            {"index.html": "<p>v3</p>\n", f"{JOBS}/continuous/ticker/run.sh": ticker("v2")}, day=3
        )
        async with session.post(
            f"{base}/api/zipdeploy?isAsync=true&deployer=elsewhere", data=third
        ) as response:
            assert response.status == 202, await response.text()
        await expect(page.locator("#deployment-deployer")).to_have_text(
            "elsewhere", timeout=WAIT_MS
        )
        await expect(status).to_contain_text("Success", timeout=WAIT_MS)
        await expect(page.locator("tr.deployment")).to_have_count(3)
        latest = await get_json(session, f"{base}/api/deployments/latest")
        await expect(heading).to_contain_text(latest["id"])
        assert page.url.endswith("#/deployments")

        # 4. A job zip dropped on the job's row replaces that job alone.
        await page.get_by_role("link", name="Jobs", exact=True).click()
        row = page.locator('tr[data-name="ticker"]')
        await expect(row).to_contain_text("Running", timeout=WAIT_MS)
        await drop_file(
            page, 'tr[data-name="ticker"]', "ticker.zip", zip_of({"run.sh": ticker("v3")})
        )
        await expect(page.locator("#redeploy-message")).to_have_text(
            "ticker redeployed from ticker.zip.", timeout=WAIT_MS
        )
        await wait_for(lambda: "tick v3" in site.job_log("ticker"), what="ticker v3 runs")
        await page.get_by_role("link", name="ticker").click()
        await expect(page.locator("#job-status")).to_have_text("Running", timeout=WAIT_MS)
        await page.get_by_label("Zip to replace this job").set_input_files(
            chosen("v4.zip", zip_of({"run.sh": ticker("v4")}))
        )
        await expect(page.locator("#redeploy-message")).to_have_text(
            "ticker redeployed from v4.zip.", timeout=WAIT_MS
        )
        await expect(page.locator("#upload-progress")).to_have_js_property("value", 100)
        await wait_for(lambda: "tick v4" in site.job_log("ticker"), what="ticker v4 runs")
        await poll(
            lambda: continuous_status(session, base, "ticker"),
            lambda value: value == "Running",
            what="ticker running",
        )
        await assert_every_control_is_named(page)

        # 5. Not a zip: said so, and the job is left alone.
        await page.get_by_label("Zip to replace this job").set_input_files(
            chosen("notes.txt", b"hello", "text/plain")
        )
        await expect(page.locator("#redeploy-message")).to_have_text(
            "Not deployed: notes.txt is not a .zip file."
        )
        assert "tick v4" in (site.job_dir("continuous", "ticker") / "run.sh").read_text()
