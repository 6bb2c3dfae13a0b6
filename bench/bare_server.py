"""The baseline of the list API scenario: a bare aiohttp handler serialising a JSON body.

    python3 bench/bare_server.py --port PORT --body FILE

Answers GET /api/continuouswebjobs with `web.json_response(document)`, the document being the
JSON in FILE (the daemon's own answer, so the body has the same size and shape). Nothing else:
no middleware, no access log, no file reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aiohttp import web


def build(document: object) -> web.Application:
    async def handler(_request: web.Request) -> web.StreamResponse:
        return web.json_response(document)

    app = web.Application()
    app.router.add_get("/api/continuouswebjobs", handler)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body", type=Path, required=True)
    args = parser.parse_args()
    document = json.loads(args.body.read_text())
    web.run_app(build(document), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
