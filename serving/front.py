"""The front of a registered model's service: a small reverse proxy that owns `deploy.port` and forwards every
request to the Bento serving the champion, on a port of its own.

Why a front: a new version starts beside the old one on a spare port, must pass readiness and the smoke prompt,
and only then is the front pointed at it; the old one stops after. Clients never see a gap, and a version that
fails to start or answer leaves the old one serving. Self-hosted BentoML has no such switch (nor canary
routing, a BentoCloud feature), so this is ours.

With a challenger in the routes, `canary` is the share of chat requests it answers instead of the champion,
sticky per the request's `user` field when there is one (else drawn per request); every reply's `model` names
the version that answered. With `shadow`, every plain (not streamed) chat request the champion answers is sent
again to the challenger once the champion's reply is out: the challenger records its answer beside the
champion's under one pair id (feedback store) and the client never sees it.

The routes live in a JSON file (TUNELINE_FRONT_ROUTES), rewritten atomically by the deploy and read again when
it changes: {"champion": {"url", "model"}, "challenger": {"url", "model"} | null, "canary": 0.0, "shadow": false}.
Run: python -m serving.front --host 127.0.0.1 --port 3000 --routes FILE
Stands alone like the service (Starlette, httpx, uvicorn: what BentoML already installs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import uuid
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTasks
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from serving.feedback_store import PAIR_HEADER, SHADOW_HEADER

# Hop-by-hop headers (RFC 9110 §7.6.1) and those the proxy recomputes: never forwarded.
HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
       "transfer-encoding", "upgrade", "host", "content-length"}
CHAT = "/v1/chat/completions"


class Routes:
    """The routes file, read again whenever its modification time changes (a stat per request)."""

    def __init__(self, path: Path) -> None:
        self.path, self.stamp, self.routes = path, None, {}

    def current(self) -> dict:
        try:
            stamp = self.path.stat().st_mtime_ns
        except OSError:
            return self.routes  # the last routes read: a deploy mid-rewrite never leaves the front without any
        if stamp != self.stamp:
            try:
                self.routes, self.stamp = json.loads(self.path.read_text()), stamp
            except ValueError:
                pass
        return self.routes


def share(user: str) -> float:
    """Where in [0, 1) a user falls, the same on every request and every front (sha256, not Python's hash)."""
    return int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") / 2**64


def chat_fields(routes: dict, path: str, body: bytes) -> dict | None:
    """The fields of a chat request, read once and only when a challenger may take it (canary or shadow);
    None for any other request, which the champion answers."""
    if path != CHAT or not routes.get("challenger"):
        return None
    try:
        fields = json.loads(body)
    except ValueError:
        return None
    return fields if isinstance(fields, dict) else None


def choose(routes: dict, fields: dict | None) -> dict:
    """The backend for a request: the challenger for its canary share of chat requests, else the champion."""
    canary = float(routes.get("canary") or 0.0)
    if fields is None or canary <= 0:
        return routes["champion"]
    user = fields.get("user")
    draw = share(user) if isinstance(user, str) and user else random.random()
    return routes["challenger"] if draw < canary else routes["champion"]


def mirrored(routes: dict, target: dict, fields: dict | None) -> dict | None:
    """The shadow a request is sent to after the champion answered it: plain chat requests only (a stream's
    copy would hold the shadow for as long as the client reads)."""
    if fields is None or not routes.get("shadow") or target is not routes["champion"] or fields.get("stream"):
        return None
    return routes["challenger"]


def create_app(routes_file: Path) -> Starlette:
    routes = Routes(routes_file)
    client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=5.0))
    shadowed = {"sent": 0, "answered": 0, "failed": 0}

    async def mirror(shadow: dict, path: str, headers: list, body: bytes) -> None:
        shadowed["sent"] += 1
        try:
            reply = await client.post(shadow["url"] + path, headers=[*headers, (SHADOW_HEADER, "1")], content=body)
            shadowed["answered" if reply.status_code < 400 else "failed"] += 1
        except httpx.HTTPError:
            shadowed["failed"] += 1  # the shadow's trouble is never the client's

    async def forward(request: Request):
        found = routes.current()
        if not found.get("champion"):
            return JSONResponse({"error": {"message": "no version is served yet", "type": "server_error",
                                           "code": 503}}, status_code=503)
        body = await request.body()
        fields = chat_fields(found, request.url.path, body)
        target = choose(found, fields)
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in HOP and k.lower() not in (PAIR_HEADER, SHADOW_HEADER)]
        shadow = mirrored(found, target, fields)
        if shadow:
            headers.append((PAIR_HEADER, uuid.uuid4().hex))
        outgoing = client.build_request(request.method, target["url"] + request.url.path,
                                        params=request.query_params, headers=headers, content=body)
        try:
            reply = await client.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": {"message": f"{target.get('model', 'the service')} did not answer: "
                                                      f"{type(exc).__name__}", "type": "server_error", "code": 503}},
                                status_code=503)
        kept = {k: v for k, v in reply.headers.items() if k.lower() not in HOP}
        after = BackgroundTasks()  # run once the reply is sent: the shadow never delays the client
        after.add_task(reply.aclose)
        if shadow:
            after.add_task(mirror, shadow, request.url.path, headers, body)
        return StreamingResponse(reply.aiter_raw(), status_code=reply.status_code, headers=kept, background=after)

    async def front_health(_: Request):
        found = routes.current()
        return JSONResponse({"champion": (found.get("champion") or {}).get("model"),
                             "challenger": (found.get("challenger") or {}).get("model"),
                             "canary": found.get("canary", 0.0), "shadow": bool(found.get("shadow")),
                             "shadowed": shadowed})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        yield
        await client.aclose()

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]
    return Starlette(routes=[Route("/front", front_health), Route("/{path:path}", forward, methods=methods)],
                     lifespan=lifespan)


def main() -> None:
    parser = argparse.ArgumentParser(description="tuneline's front: forwards deploy.port to the served version")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--routes", default=os.environ.get("TUNELINE_FRONT_ROUTES"), required=False)
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(create_app(Path(args.routes)), host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=30)


if __name__ == "__main__":
    main()
