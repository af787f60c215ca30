"""What the browser panel reads: namespaced websocket events during sampling and one read-only
route with the statistics of the last runs. Neither takes input that names a file or changes state."""
from __future__ import annotations

import logging

log = logging.getLogger("procache")

STEP_EVENT = "procache.step"     # after every sampler step: the kinds so far, per stream
RUN_EVENT = "procache.run"       # when a run ends: its whole summary
ROUTE = "/procache/last_run"
SCHEDULES_ROUTE = "/procache/schedules"   # library name -> pattern digits, for the Loader's preview


def _server():
    try:
        from server import PromptServer
        return PromptServer.instance
    except Exception:            # no server (in-process tests, scripts): nothing to tell
        return None


def send(event: str, data: dict) -> None:
    server = _server()
    if server is None:
        return
    try:
        server.send_sync(event, data, getattr(server, "client_id", None))
    except Exception as e:   # the panel is a view: a failed send must never fail the user's sampling
        log.debug("ProCache: could not send %s: %s", event, e)


def register_routes(last_runs, schedule_patterns) -> bool:
    server = _server()
    if server is None or not hasattr(server, "routes"):
        return False
    from aiohttp import web

    @server.routes.get(ROUTE)
    async def last_run(request):
        return web.json_response({"latest": last_runs.latest(), "recent": last_runs.all()})

    @server.routes.get(SCHEDULES_ROUTE)
    async def schedules(request):
        return web.json_response(schedule_patterns())

    return True
