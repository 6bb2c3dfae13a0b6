"""Files that several daemons sharing one site rewrite: no writer's change is lost.

1. Two processes subscribing hooks into one `hooks.json` at the same moment: every hook stays.
2. Two real daemons on one site, each receiving settings POSTs at the same moment: every key
   stays in the settings store.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.helpers import REPO_ROOT, DaemonProcess, Site, wait_for_sync
from tests.test_faults import ready
from webjobsd.runtime.jobprocess import free_loopback_port
from webjobsd.webhooks.subscriptions import HookStore

HOOKS_EACH = 40
KEYS_EACH = 30


SUBSCRIBER = """
import os, sys, time
from pathlib import Path
from webjobsd.webhooks.subscriptions import HookRequest, HookStore
path, writer, go, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = HookStore(Path(path))
while not os.path.exists(go):  # both start writing at the same moment
    time.sleep(0.001)
for index in range(count):
    store.add(HookRequest(f"http://127.0.0.1:9/{writer}/{index}", "TriggeredJobFinished", False))
"""


def test_two_processes_subscribing_at_once_keep_every_hook(tmp_path: Path) -> None:
    path = tmp_path / "data" / "webjobsd" / "hooks.json"
    go = tmp_path / "go"
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBER, str(path), name, str(go), str(HOOKS_EACH)],
            cwd=REPO_ROOT,
        )
        for name in ("first", "second")
    ]
    try:
        go.write_text("")
        for writer in writers:
            assert writer.wait(timeout=60) == 0
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    urls = {hook.url for hook in HookStore(path).hooks()}
    assert len(urls) == 2 * HOOKS_EACH


async def test_two_daemons_taking_settings_at_once_keep_every_key(site: Site) -> None:
    ports = [free_loopback_port(), free_loopback_port()]
    daemons = [
        DaemonProcess(site, instance, listen=f"127.0.0.1:{port}")
        for instance, port in zip(("share01", "share02"), ports, strict=True)
    ]
    try:
        for daemon in daemons:
            daemon.start()
        for port in ports:
            wait_for_sync(lambda port=port: ready(port), timeout=20, what="daemon ready")

        async with aiohttp.ClientSession() as session:

            async def post(port: int, key: str) -> None:
                url = f"http://127.0.0.1:{port}/api/settings"
                async with session.post(url, json={key: "1"}) as response:
                    assert response.status in (200, 204), await response.text()

            await asyncio.gather(
                *(post(port, f"KEY_{port}_{index}") for index in range(KEYS_EACH) for port in ports)
            )
            async with session.get(f"http://127.0.0.1:{ports[0]}/api/settings") as response:
                store = await response.json()
        assert {key for key in store if key.startswith("KEY_")} == {
            f"KEY_{port}_{index}" for index in range(KEYS_EACH) for port in ports
        }
        for daemon in daemons:
            assert daemon.stop() == 0
    finally:
        for daemon in daemons:
            daemon.kill_if_running()
