"""The dashboard in a real headless browser (Debian's chromium driven by playwright) against a
real daemon with Basic auth: the jobs page, a triggered job's run chart and Run button, a
continuous job's Stop/Start buttons, and a live log that shows a line written after it opened.

Playwright's async API (its sync API wants its own loop, and pytest-asyncio's is running); the
browser gets the credentials the way a person's browser caches them (`http_credentials`), or in
the address (`http://user:pass@host:port/dashboard/`).
Screenshots of each page go to the test's `screenshots` folder, whose path is printed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, HttpCredentials, Page, async_playwright, expect

import webjobsd.http
from tests.helpers import Site, leaders, wait_for
from tests.test_api_jobs import CREDENTIALS, api, get_json, poll

# Debian's chromium on PATH: what tests/tools/ensure looks for, and installs when it is missing.
CHROMIUM = shutil.which("chromium")
WAIT_MS = 15_000
# The pages refresh themselves every REFRESH_MS (app.js); the tests wait for what a refresh
# shows, never for its period, so in the browser here that period passes ten times faster.
APP_JS = Path(webjobsd.http.__file__).parent / "dashboard" / "app.js"
_REFRESH = re.search(r"^const REFRESH_MS = (\d+);$", APP_JS.read_text(), re.MULTILINE)
assert _REFRESH is not None, f"REFRESH_MS not found in {APP_JS}"
REFRESH_MS = int(_REFRESH.group(1))
FASTER_REFRESH = f"""
const setTimeoutOfThePage = window.setTimeout;
window.setTimeout = (handler, ms, ...rest) =>
  setTimeoutOfThePage(handler, ms === {REFRESH_MS} ? {REFRESH_MS // 10} : ms, ...rest);
"""
LOOP = {"run.sh": "echo up\nwhile true; do sleep 0.2; done\n"}
FINISHED = ("Success", "Failed")


@contextlib.asynccontextmanager
async def browser() -> AsyncIterator[Browser]:
    if CHROMIUM is None:
        pytest.fail(
            "chromium is not on PATH: `bash tests/tools/ensure` installs it "
            "(the README's test command runs it first)"
        )
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield chromium
        finally:
            await chromium.close()


def origin(url: str) -> tuple[str, str | None, int | None]:
    """Scheme, host and port: what makes two addresses the same site (credentials do not)."""
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


@contextlib.asynccontextmanager
async def dashboard(
    base: str, shots: Path, *, cached_credentials: bool = True
) -> AsyncIterator[Page]:
    """A page with the cached credentials (or none: the address then carries them); fails the
    test on a script error or on a request that leaves this daemon."""
    shots.mkdir(exist_ok=True)
    print(f"dashboard screenshots: {shots}")
    errors: list[str] = []
    foreign: list[str] = []
    credentials: HttpCredentials | None = None
    if cached_credentials:
        credentials = {
            "username": CREDENTIALS["WEBJOBSD_USERNAME"],
            "password": CREDENTIALS["WEBJOBSD_PASSWORD"],
        }
    async with browser() as chromium:
        context = await chromium.new_context(
            http_credentials=credentials, viewport={"width": 1100, "height": 800}
        )
        await context.add_init_script(FASTER_REFRESH)
        try:
            page = await context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on(
                "request",
                lambda request: (
                    None if origin(request.url) == origin(base) else foreign.append(request.url)
                ),
            )
            yield page
        finally:
            await context.close()
    assert errors == [], errors
    assert foreign == [], foreign


INTERACTIVE_ROLES = {"button", "link", "textbox", "combobox", "checkbox", "searchbox", "slider"}


async def assert_every_control_is_named(page: Page) -> None:
    """Chromium's own accessibility tree: each control a screen reader announces has a name."""
    cdp = await page.context.new_cdp_session(page)
    try:
        tree = await cdp.send("Accessibility.getFullAXTree")
    finally:
        await cdp.detach()
    controls = [
        node
        for node in tree["nodes"]
        if not node.get("ignored") and node.get("role", {}).get("value") in INTERACTIVE_ROLES
    ]
    assert controls, "no controls found"
    unnamed = [
        (node["role"]["value"], node.get("backendDOMNodeId"))
        for node in controls
        if not node.get("name", {}).get("value", "").strip()
    ]
    assert unnamed == [], unnamed


async def finished_runs(session: aiohttp.ClientSession, base: str, name: str) -> list[Any]:
    body = await get_json(session, f"{base}/api/triggeredwebjobs/{name}/history")
    return [run for run in body["runs"] if run["status"] in FINISHED]


async def test_jobs_page_and_a_triggered_job(site: Site, tmp_path: Path) -> None:
    site.write_job("triggered", "report", {"run.sh": "echo report line\necho oops >&2\n"})
    site.write_job(
        "triggered",
        "nightly",
        {"run.sh": "exit 0\n", "settings.job": '{"schedule": "0 30 2 * * *"}'},
    )
    site.write_job("continuous", "worker", LOOP)
    shots = tmp_path / "screenshots"
    async with api(site) as (_daemon, session, base):
        for count in (1, 2, 3):
            async with session.post(f"{base}/api/triggeredwebjobs/report/run") as response:
                assert response.status == 202, await response.text()
            await poll(
                lambda: finished_runs(session, base, "report"),
                lambda runs, count=count: len(runs) == count,
                what=f"run {count} finished",
            )
        async with dashboard(base, shots) as page:
            # `/` sends the browser to the dashboard; the jobs page lists every job.
            await page.goto(base + "/")
            assert page.url == base + "/dashboard/"
            rows = page.locator("tr.job")
            await expect(rows).to_have_count(3, timeout=WAIT_MS)
            nightly = page.locator('tr[data-name="nightly"]')
            await expect(nightly).to_contain_text("0 30 2 * * *")
            await expect(nightly.locator(".words")).to_have_text("At 02:30 every day")
            next_run = nightly.locator(".next-run time")
            await expect(next_run).to_contain_text(re.compile(r"in \d+ (min|h)"))
            (schedule,) = await get_json(session, f"{base}/api/schedules")
            assert await next_run.get_attribute("datetime") == schedule["next_run"]
            await expect(page.locator('tr[data-name="report"] .next-run')).to_have_count(0)
            await expect(page.locator('tr[data-name="report"]')).to_contain_text("Success")
            await expect(page.locator('tr[data-name="worker"]')).to_contain_text("Running")
            await page.screenshot(path=shots / "jobs.png", full_page=True)
            await assert_every_control_is_named(page)
            await page.get_by_label("Type").select_option("continuous")
            await expect(rows).to_have_count(1)
            await expect(rows.first).to_have_attribute("data-name", "worker")
            await page.get_by_label("Type").select_option("")
            await page.get_by_label("Status").select_option("Success")
            await expect(rows).to_have_count(1)
            await expect(rows.first).to_have_attribute("data-name", "report")

            # The job page: one bar per run, then the Run button adds one.
            await page.get_by_role("link", name="report").click()
            await expect(page).to_have_url(re.compile(r"#/job/triggered/report$"))
            bars = page.locator("#chart rect.bar")
            await expect(bars).to_have_count(3, timeout=WAIT_MS)
            await expect(page.locator("#stat-success")).to_have_text("100 %")
            await expect(page.locator("#job-schedule")).to_contain_text("No schedule")
            await expect(page.locator("#chart title").first).to_contain_text("Success")
            await page.screenshot(path=shots / "triggered-job.png", full_page=True)
            await assert_every_control_is_named(page)
            await page.get_by_label("Arguments").fill('one "two words"')
            await page.get_by_role("button", name="Run").click()
            await expect(bars).to_have_count(4, timeout=WAIT_MS)
            await poll(
                lambda: finished_runs(session, base, "report"),
                lambda runs: len(runs) == 4,
                what="the dashboard's run finished",
            )
            runs = (await get_json(session, f"{base}/api/triggeredwebjobs/report/history"))["runs"]
            assert runs[0]["trigger"].startswith("External - Mozilla/")

            # A bar opens its run; the run's log, its stderr line marked.
            await page.locator("#chart a").last.click()
            await expect(page).to_have_url(re.compile(rf"#/run/report/{runs[0]['id']}$"))
            log = page.locator("#log")
            await expect(log).to_contain_text("report line", timeout=WAIT_MS)
            await expect(log.locator(".line.err")).to_contain_text("oops")
            await expect(log).to_contain_text("end of stream (finished)")
            await expect(page.locator("#run-status")).to_have_text("Success")
            await page.screenshot(path=shots / "run.png", full_page=True)
            await assert_every_control_is_named(page)

            # On a phone: the table becomes one card per job.
            await page.set_viewport_size({"width": 390, "height": 844})
            await page.get_by_role("link", name="webjobsd").click()
            await expect(rows).to_have_count(3, timeout=WAIT_MS)
            await page.screenshot(path=shots / "jobs-phone.png", full_page=True)

            # The page refreshes itself: a job dropped in meanwhile appears without a reload.
            site.write_job("triggered", "late", {"run.sh": "exit 0\n"})
            await expect(rows).to_have_count(4, timeout=WAIT_MS)
            await expect(page.locator('tr[data-name="late"]')).to_contain_text("Never run")


async def test_continuous_job_live_log_and_stop_start(site: Site, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    site.write_job(
        "continuous",
        "chatty",
        {
            "run.sh": (
                f"echo first\nwhile [ ! -e {gate} ]; do sleep 0.1; done\n"
                "echo second\necho trouble >&2\nexec sleep 1000\n"
            )
        },
    )
    shots = tmp_path / "screenshots"
    async with api(site) as (_daemon, _session, base), dashboard(base, shots) as page:
        await wait_for(lambda: "INFO] first" in site.job_log("chatty"), what="first line")
        # The live log: a line the job prints once the page is open shows up.
        await page.goto(base + "/dashboard/#/log/chatty")
        log = page.locator("#log")
        await expect(log).to_contain_text("INFO] first", timeout=WAIT_MS)
        gate.write_text("")
        await expect(log).to_contain_text("INFO] second", timeout=WAIT_MS)
        await expect(log.locator(".line.err")).to_contain_text("trouble", timeout=WAIT_MS)
        await expect(log.locator(".line.err")).to_have_count(1)
        await page.screenshot(path=shots / "live-log.png", full_page=True)

        # The job page: Stop and Start change the status and make a start, not a restart.
        await page.get_by_role("link", name="chatty").click()
        status = page.locator("#job-status")
        await expect(status).to_have_text("Running", timeout=WAIT_MS)
        await expect(page.locator("#stat-starts")).to_have_text("1", timeout=WAIT_MS)
        await expect(page.locator("#stat-uptime")).not_to_have_text("—")
        await page.get_by_role("button", name="Stop").click()
        await expect(status).to_have_text("Stopped", timeout=WAIT_MS)
        await expect(page.get_by_role("button", name="Start")).to_be_enabled()
        await page.get_by_role("button", name="Start").click()
        await expect(status).to_have_text("Running", timeout=WAIT_MS)
        await expect(page.locator("#stat-starts")).to_have_text("2", timeout=WAIT_MS)
        await expect(page.locator("#stat-restarts")).to_have_text("0")
        await expect(page.locator("#last-end")).to_contain_text("was stopped")

        # A process killed from outside is restarted, and that one is a restart.
        await wait_for(lambda: len(leaders(site, "chatty")) == 1, what="one process")
        os.kill(leaders(site, "chatty")[0], signal.SIGKILL)
        await expect(page.locator("#stat-restarts")).to_have_text("1", timeout=WAIT_MS)
        await expect(page.locator("#stat-starts")).to_have_text("3")
        await expect(page.locator("#last-end")).to_contain_text("exited (signal 9)")
        await expect(page.locator("#starts line.tick.restart")).to_have_count(1)
        await expect(page.locator("#starts line.tick")).to_have_count(3)
        await page.screenshot(path=shots / "continuous-job.png", full_page=True)
        await assert_every_control_is_named(page)


async def test_the_live_log_stops_following_when_the_reader_scrolls_up(
    site: Site, tmp_path: Path
) -> None:
    """1. Opened at the end of a long log, the view follows new lines.
    2. Scrolled up, it says so, offers a jump, and new lines do not move it.
    3. The jump returns to the end, and new lines are followed again."""
    gate = tmp_path / "gate"
    site.write_job(
        "continuous",
        "stream",
        {
            "run.sh": (
                'for i in $(seq 200); do echo "start line $i"; done\n'
                "batch=0\n"
                "while true; do\n"
                f"  if [ -e {gate} ]; then rm {gate}; batch=$((batch+1))\n"
                '    for i in $(seq 50); do echo "batch $batch line $i"; done\n'
                "  fi\n"
                "  sleep 0.05\n"
                "done\n"
            )
        },
    )
    shots = tmp_path / "screenshots"
    at_end = "(box) => box.scrollTop + box.clientHeight >= box.scrollHeight - 8"
    async with api(site) as (_daemon, _session, base), dashboard(base, shots) as page:
        await page.goto(base + "/dashboard/#/log/stream")
        log = page.locator("#log")
        follow_state = page.locator("#follow-state")
        jump = page.get_by_role("button", name="Jump to end")
        await expect(log).to_contain_text("start line 200", timeout=WAIT_MS)
        assert await log.evaluate(at_end)
        await expect(follow_state).to_have_text("Following the end.")
        await expect(jump).to_be_hidden()

        await log.evaluate("(box) => { box.scrollTop = 0; }")
        await expect(follow_state).to_contain_text("Paused")
        await expect(jump).to_be_visible()
        gate.write_text("")
        await expect(log).to_contain_text("batch 1 line 50", timeout=WAIT_MS)
        assert await log.evaluate("(box) => box.scrollTop") == 0
        assert not await log.evaluate(at_end)
        await page.screenshot(path=shots / "live-log-paused.png", full_page=True)

        await jump.click()
        await expect(follow_state).to_have_text("Following the end.")
        await expect(jump).to_be_hidden()
        gate.write_text("")
        await expect(log).to_contain_text("batch 2 line 50", timeout=WAIT_MS)
        assert await log.evaluate(at_end)


async def test_the_dashboard_works_from_an_address_that_carries_the_credentials(
    site: Site, tmp_path: Path
) -> None:
    """`http://user:pass@host:port/dashboard/`: a relative URL inherits the credentials of the
    page's address and `fetch` refuses such a URL; the jobs list, Run and a live log must work."""
    gate = tmp_path / "gate"
    site.write_job("triggered", "report", {"run.sh": "echo report line\n"})
    site.write_job(
        "continuous",
        "chatty",
        {
            "run.sh": f"echo first\nwhile [ ! -e {gate} ]; do sleep 0.1; done\necho second\n"
            "exec sleep 1000\n"
        },
    )
    shots = tmp_path / "screenshots"
    async with (
        api(site) as (_daemon, session, base),
        dashboard(base, shots, cached_credentials=False) as page,
    ):
        user = urllib.parse.quote(CREDENTIALS["WEBJOBSD_USERNAME"], safe="")
        password = urllib.parse.quote(CREDENTIALS["WEBJOBSD_PASSWORD"], safe="")
        with_credentials = base.replace("http://", f"http://{user}:{password}@", 1)
        await page.goto(with_credentials + "/dashboard/")
        rows = page.locator("tr.job")
        await expect(rows).to_have_count(2, timeout=WAIT_MS)
        await expect(page.locator("#page-error")).to_be_empty()

        await page.get_by_role("link", name="report").click()
        await page.get_by_role("button", name="Run").click()
        await expect(page.locator("#chart rect.bar")).to_have_count(1, timeout=WAIT_MS)
        (run,) = await poll(
            lambda: finished_runs(session, base, "report"),
            lambda runs: len(runs) == 1,
            what="the dashboard's run finished",
        )
        assert run["trigger"].startswith("External - Mozilla/")

        await wait_for(lambda: "INFO] first" in site.job_log("chatty"), what="first line")
        await page.goto(with_credentials + "/dashboard/#/log/chatty")
        log = page.locator("#log")
        await expect(log).to_contain_text("INFO] first", timeout=WAIT_MS)
        gate.write_text("")
        await expect(log).to_contain_text("INFO] second", timeout=WAIT_MS)
        await expect(page.locator("#page-error")).to_be_empty()
        await page.screenshot(path=shots / "credentials-in-address.png", full_page=True)
