"""The bare passthrough: what a proxy with no rules costs. Plain ASGI, no framework.

``GET /proxy/{path}?{query}`` goes to ``BENCH_UPSTREAM/{path}?{query}`` with the fixed
``Authorization: Bearer BENCH_TOKEN``, through one pooled aiohttp ``ClientSession`` per process
configured as the app's (``app/runtime.py``); the status, content type and body come back as
bytes. Served by uvicorn (uvloop, httptools) with as many workers as the app::

    BENCH_UPSTREAM=http://127.0.0.1:8100/pub/v2.2 BENCH_TOKEN=... \
        python -m uvicorn bench.passthrough:app --workers 2 --loop uvloop --http httptools
"""

from __future__ import annotations

import os

import aiohttp

PREFIX = "/proxy/"


class Passthrough:
    def __init__(self) -> None:
        self.upstream = os.environ.get("BENCH_UPSTREAM", "http://127.0.0.1:8100/pub/v2.2").rstrip("/")
        self.headers = {"Authorization": f"Bearer {os.environ.get('BENCH_TOKEN', '')}"}
        self.http: aiohttp.ClientSession | None = None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        path = scope["path"]
        if scope["type"] != "http" or not path.startswith(PREFIX):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        query = scope.get("query_string", b"")
        url = f"{self.upstream}/{path[len(PREFIX):]}" + (f"?{query.decode('ascii')}" if query else "")
        assert self.http is not None
        async with self.http.get(url, headers=self.headers, allow_redirects=False) as resp:
            body = await resp.read()
            status, content_type = resp.status, resp.headers.get("Content-Type", "application/json")
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type.encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                connector = aiohttp.TCPConnector(limit=0, limit_per_host=256, ttl_dns_cache=300, keepalive_timeout=30)
                self.http = aiohttp.ClientSession(
                    connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                    skip_auto_headers=("Accept-Encoding",),
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.http is not None:
                    await self.http.close()
                await send({"type": "lifespan.shutdown.complete"})
                return


app = Passthrough()
