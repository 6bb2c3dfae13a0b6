"""Live logs over HTTP (Server-Sent Events) against a real daemon, read incrementally by a real
client: every wait is a read with a deadline, and the jobs wait for a trigger file the test
creates, so nothing is synchronised by sleeping."""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.helpers import Site, wait_for
from tests.test_api_jobs import api

NUMBERED = re.compile(r"\bn=(\d+)\b")


@dataclass
class Event:
    id: str | None = None
    event: str = "message"
    data: list[str] = field(default_factory=list)

    def json(self) -> dict[str, object]:
        return dict(json.loads("\n".join(self.data)))


class SseReader:
    """Parses a text/event-stream body line by line as it arrives."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def next(self, timeout: float = 10.0) -> Event | None:
        """The next event (comments skipped), or None at the end of the stream."""
        event = Event()
        seen = False
        while True:
            raw = await asyncio.wait_for(self.response.content.readline(), timeout)
            if not raw:
                return None
            line = raw.decode().rstrip("\n")
            if not line:
                if seen:
                    return event
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            seen = True
            if name == "id":
                event.id = value
            elif name == "event":
                event.event = value
            elif name == "data":
                event.data.append(value)

    async def until(self, predicate: object, timeout: float = 10.0) -> list[Event]:
        """Events up to and including the first one `predicate` accepts."""
        assert callable(predicate)
        deadline = time.monotonic() + timeout
        events: list[Event] = []
        while True:
            event = await self.next(max(0.01, deadline - time.monotonic()))
            assert event is not None, f"stream ended before the expected event: {events[-3:]}"
            events.append(event)
            if predicate(event):
                return events


def numbers(events: list[Event]) -> list[int]:
    return [int(m.group(1)) for e in events for line in e.data if (m := NUMBERED.search(line))]


def has_line(text: str) -> object:
    return lambda event: any(text in line for line in event.data)


def gated_job(trigger: Path, before: str, after: str) -> dict[str, str]:
    """A job that prints `before`, waits for `trigger` to exist, prints `after`, then idles."""
    return {
        "run.sh": f"{before}\nwhile [ ! -e {trigger} ]; do sleep 0.02; done\n{after}\n"
        "while true; do sleep 0.2; done\n"
    }


async def test_a_line_written_after_the_stream_opened_arrives_live(site: Site) -> None:
    """1. A continuous job prints `ready` and waits. 2. The stream shows `ready`.
    3. The job prints a new line; it arrives on the open stream, and each event id is the
    byte offset in job_log.txt just after the lines sent."""
    trigger = site.root.parent / "go"
    site.write_job("continuous", "worker", gated_job(trigger, "echo ready", "echo after-open"))
    async with api(site) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs/worker/logstream"
        async with session.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/event-stream")
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["X-Accel-Buffering"] == "no"
            sse = SseReader(response)
            await sse.until(has_line("ready"))
            trigger.touch()
            events = await sse.until(has_line("after-open"), timeout=5)
            last = events[-1]
            content = (site.data_dir("continuous", "worker") / "job_log.txt").read_bytes()
            assert last.id is not None
            sent_to = int(last.id)
            assert content[:sent_to].endswith(b"after-open\n")
            assert content[:sent_to].decode().splitlines()[-len(last.data) :] == last.data


async def test_last_event_id_resumes_without_duplicates_or_gaps(site: Site) -> None:
    """1. A job prints numbered lines. 2. A stream reads some and is closed. 3. A new stream
    with `Last-Event-ID` continues at the very next line, and the text before that id is
    exactly what the first stream received."""
    site.write_job(
        "continuous",
        "counter",
        {"run.sh": "i=0\nwhile true; do i=$((i+1)); echo n=$i; sleep 0.01; done\n"},
    )
    async with api(site) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs/counter/logstream?offset=0"
        async with session.get(url) as response:
            sse = SseReader(response)
            first: list[Event] = []
            while len(numbers(first)) < 20:
                first += await sse.until(lambda _e: True)
        last_id = first[-1].id
        assert last_id is not None
        content = (site.data_dir("continuous", "counter") / "job_log.txt").read_bytes()
        sent_lines = [line for e in first for line in e.data]
        assert content[: int(last_id)].decode().splitlines() == sent_lines
        async with session.get(
            f"{base}/api/continuouswebjobs/counter/logstream", headers={"Last-Event-ID": last_id}
        ) as response:
            sse = SseReader(response)
            second: list[Event] = []
            while len(numbers(second)) < 20:
                second += await sse.until(lambda _e: True)
        seen = numbers(first) + numbers(second)
        assert seen == list(range(seen[0], seen[0] + len(seen))), seen


async def test_rotation_while_streaming_loses_nothing(site: Site) -> None:
    """1. A job prints numbered lines into a log that rotates every ~2 KB. 2. One stream
    follows it across several rotations: it says `rotated` (id 0) each time, and the
    numbers it delivers are consecutive."""
    site.write_job(
        "continuous",
        "chatty",
        {"run.sh": "i=0\nwhile true; do i=$((i+1)); echo n=$i padding; sleep 0.005; done\n"},
    )
    async with api(site, log_max_bytes=2000, log_generations=1) as (_daemon, session, base):
        url = f"{base}/api/continuouswebjobs/chatty/logstream?offset=0"
        async with session.get(url) as response:
            sse = SseReader(response)
            events: list[Event] = []
            deadline = time.monotonic() + 15
            while sum(e.event == "rotated" for e in events) < 3:
                assert time.monotonic() < deadline, "no three rotations in 15 s"
                events += await sse.until(lambda _e: True)
        rotations = [e for e in events if e.event == "rotated"]
        assert all(e.id == "0" and e.json() == {"offset": 0} for e in rotations)
        seen = numbers(events)
        assert seen == list(range(seen[0], seen[0] + len(seen))), seen
        # Lines before and after each rotation: the stream crossed them, not only started.
        first_rotation = events.index(rotations[0])
        assert numbers(events[:first_rotation]) and numbers(events[first_rotation:])


async def test_a_run_stream_delivers_the_whole_output_then_ends_with_the_status(
    site: Site,
) -> None:
    """1. A run prints a line and waits. 2. Its stream shows the line. 3. The run prints 50
    more lines and fails. 4. The stream delivers them all, then `end` with `Failed`, then EOF."""
    trigger = site.root.parent / "go"
    script = gated_job(trigger, "echo n=0", "for i in $(seq 1 50); do echo n=$i; done\nexit 3")
    script["run.sh"] = script["run.sh"].replace("while true; do sleep 0.2; done\n", "")
    site.write_job("triggered", "report", script)
    async with api(site) as (_daemon, session, base):
        async with session.post(f"{base}/api/triggeredwebjobs/report/run") as response:
            assert response.status == 202
            run_url = response.headers["Location"]
        async with session.get(f"{run_url}/logstream") as response:
            assert response.status == 200
            sse = SseReader(response)
            events = await sse.until(has_line("n=0"))
            trigger.touch()
            events += await sse.until(lambda e: e.event == "end")
            assert await sse.next(timeout=5) is None
        assert numbers(events) == list(range(51))
        end = events[-1]
        assert end.json() == {"reason": "finished", "status": "Failed"}
        # A finished run's stream needs no following: it ends by itself, resumable by id.
        assert end.id is not None
        async with session.get(
            f"{run_url}/logstream", headers={"Last-Event-ID": end.id}
        ) as response:
            sse = SseReader(response)
            rest = await sse.until(lambda e: e.event == "end")
            assert [e.event for e in rest] == ["end"]


async def test_follow_false_and_tail_send_the_backlog_then_end(site: Site) -> None:
    trigger = site.root.parent / "go"
    site.write_job(
        "continuous",
        "worker",
        gated_job(trigger, "for i in $(seq 1 30); do echo n=$i; done", "echo never"),
    )
    async with api(site) as (_daemon, session, base):
        await wait_for(lambda: "n=30" in site.job_log("worker"), what="thirty lines")
        url = f"{base}/api/continuouswebjobs/worker/logstream?tail=5&follow=false"
        async with session.get(url) as response:
            sse = SseReader(response)
            events = await sse.until(lambda e: e.event == "end")
            assert await sse.next(timeout=5) is None
        assert numbers(events) == [26, 27, 28, 29, 30]
        assert events[-1].json() == {"reason": "caught up", "status": None}


HUGE = "9" * 5000
RUN = "202601010000000000"


async def test_errors_are_json_and_credentials_are_required(site: Site) -> None:
    site.write_job("continuous", "worker", {"run.sh": "while true; do sleep 0.2; done\n"})
    site.write_job("triggered", "report", {"run.sh": "echo hi\n"})
    async with api(site) as (_daemon, session, base):
        cases = [
            ("/api/continuouswebjobs/nope/logstream", {}, 404),
            ("/api/triggeredwebjobs/report/history/202601010000000000/logstream", {}, 404),
            ("/api/triggeredwebjobs/nope/history/202601010000000000/logstream", {}, 404),
            ("/api/continuouswebjobs/bad%20name/logstream", {}, 400),
            ("/api/continuouswebjobs/worker/logstream", {"Last-Event-ID": "x"}, 400),
            ("/api/continuouswebjobs/worker/logstream?tail=-1", {}, 400),
            ("/api/continuouswebjobs/worker/logstream?follow=maybe", {}, 400),
            # Past Python's 4,300-digit int conversion limit (a 500 before): each number a
            # stream reads, on both kinds of stream.
            (f"/api/continuouswebjobs/worker/logstream?tail={HUGE}", {}, 400),
            (f"/api/continuouswebjobs/worker/logstream?offset={HUGE}", {}, 400),
            ("/api/continuouswebjobs/worker/logstream", {"Last-Event-ID": HUGE}, 400),
            (f"/api/continuouswebjobs/worker/logstream?tail={'0' * 5000}1x", {}, 400),
            (f"/api/triggeredwebjobs/report/history/{RUN}/logstream?tail={HUGE}", {}, 400),
            (f"/api/triggeredwebjobs/report/history/{RUN}/logstream?offset={HUGE}", {}, 400),
        ]
        for path, headers, status in cases:
            async with session.get(base + path, headers=headers) as response:
                assert response.status == status, path[:100]
                assert set(await response.json()) == {"message"}, path[:100]
        async with (
            aiohttp.ClientSession() as anonymous,
            anonymous.get(f"{base}/api/continuouswebjobs/worker/logstream") as response,
        ):
            assert response.status == 401
            assert set(await response.json()) == {"message"}


async def test_daemon_shutdown_ends_an_open_stream_promptly(site: Site) -> None:
    """1. A stream follows a running job's log. 2. The daemon is asked to stop. 3. The stream
    gets `end` (reason shutdown) and EOF well before the HTTP server's 5 s drain timeout."""
    site.write_job("continuous", "worker", {"run.sh": "echo up\nwhile true; do sleep 0.2; done\n"})
    async with api(site) as (daemon, session, base):
        url = f"{base}/api/continuouswebjobs/worker/logstream"
        async with session.get(url) as response:
            sse = SseReader(response)
            await sse.until(has_line("up"))
            started = time.monotonic()
            daemon.request_shutdown("test")
            end = await sse.until(lambda e: e.event == "end", timeout=3)
            assert end[-1].json() == {"reason": "shutdown", "status": None}
            assert await sse.next(timeout=3) is None
            assert time.monotonic() - started < 2.0
