"""Links the API hands out that lead into the dashboard, followed by a real browser (Debian's
chromium driven by playwright, as in test_dashboard.py): a job's `extra_info_url` opens that
job's page."""

from __future__ import annotations

from pathlib import Path

from playwright.async_api import expect

from tests.helpers import Site, wait_for
from tests.test_api_jobs import api, get_json
from tests.test_dashboard import LOOP, WAIT_MS, dashboard


async def test_extra_info_url_opens_the_jobs_page(site: Site, tmp_path: Path) -> None:
    site.write_job("triggered", "report", {"run.sh": "exit 0\n"})
    site.write_job("continuous", "worker", LOOP)
    async with api(site) as (_daemon, session, base):
        await wait_for(lambda: site.status("worker") == "Running", what="worker running")
        jobs = {job["name"]: job for job in await get_json(session, f"{base}/api/webjobs")}
        async with dashboard(base, tmp_path / "screenshots") as page:
            # The triggered job's page has its Run button, the continuous one its Stop button.
            for name, control in (("report", "#run-button"), ("worker", "#stop-button")):
                await page.goto(jobs[name]["extra_info_url"])
                await expect(page.locator("h1")).to_have_text(name, timeout=WAIT_MS)
                await expect(page.locator(control)).to_be_visible(timeout=WAIT_MS)
