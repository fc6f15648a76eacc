"""The dashboard's HTTP side: its routes, its authentication and its static page, read-only.

    GET /dashboard                  the page (galaxy/serving/static/dashboard.html)
    GET /dashboard/static/NAME      its script and style sheet
    GET /dashboard/state.json       devices, the plan, the engine now           (dashboard.devices_view, ...)
    GET /dashboard/timeline.json    the last engine step per device and layer   (dashboard.timeline_view)
    GET /dashboard/history.json     the engine's numbers over the last minutes  (dashboard.History)

Authentication is the API's key. A browser cannot send `Authorization: Bearer` when it opens a
page, so `/dashboard?key=KEY` (or the page's login form) checks the key once and answers with a
redirect that sets an HttpOnly, SameSite=Strict cookie scoped to /dashboard; every dashboard request
then checks the cookie or a Bearer header, in constant time. The cookie holds an HMAC of the key,
not the key: it opens the dashboard, never the API. Only GET and HEAD are served; nothing here
changes the cluster. The assets ship in the package (package-data): no CDN, no build step.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from urllib.parse import parse_qs

from ..version import __version__
from . import dashboard as views
from .monitor import Monitor

COOKIE = "galaxy_dashboard"
ASSETS = {"dashboard.html": "text/html; charset=utf-8", "dashboard.js": "text/javascript; charset=utf-8",
          "dashboard.css": "text/css; charset=utf-8"}
HEADERS = {  # every dashboard answer: nothing from elsewhere, not framed, nothing cached, no referrer
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
    "X-Frame-Options": "DENY"}

LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Galaxy dashboard: sign in</title></head>
<body><h1>Galaxy dashboard</h1><p>{message}</p>
<form method="get" action="/dashboard"><label>API key <input type="password" name="key" autofocus></label>
<button type="submit">Open</button></form></body></html>
"""


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)


def cookie_value(api_key: str) -> str:
    """What the dashboard cookie holds: an HMAC of the API key (a stolen cookie opens no API)."""
    return hmac.new(api_key.encode(), b"galaxy dashboard cookie v1", hashlib.sha256).hexdigest()


def asset(name: str) -> bytes:
    return resources.files("galaxy.serving").joinpath("static", name).read_bytes()


class Dashboard:
    """The dashboard of one server: its monitor (device polls, history) and its routes.

    `session` is where the devices are; `model` the loaded model (None: devices only); `engine` its
    serving engine (its `load` is /metrics' source, its `last_step` the timeline's; None when there
    is none); `totals` the request histograms' running sums (ServerMetrics.totals); `plan` a planner
    Plan (the planner's reason; with no model, the split it draws)."""

    def __init__(self, session, model=None, *, engine=None, totals=dict, api_key: str | None = None,
                 plan=None, name: str = "", api: bool = True, poll_s: float = 1.0, timeout_s: float = 1.0,
                 sample_s: float = 1.0, history_s: float = 300.0, measure_links: bool = True):
        self.session, self.model, self.engine, self.plan = session, model, engine, plan
        self.api_key, self.name, self.api = api_key or None, name, api
        self.monitor = Monitor(session.executor, engine_load=lambda: engine.load if engine is not None else None,
                               totals=totals, poll_s=poll_s, timeout_s=timeout_s, sample_s=sample_s,
                               history_s=history_s, measure_links=measure_links)
        self._cookie = cookie_value(self.api_key) if self.api_key else ""

    def start(self) -> None:
        self.monitor.start()

    def stop(self) -> None:
        self.monitor.stop()

    # the views ------------------------------------------------------------------------------------------
    def state(self) -> dict:
        ex = self.session.executor
        names, now = list(ex.names), time.time()
        load = self.engine.load if self.engine is not None else None
        last = self.engine.last_step if self.engine is not None else None
        model = self.model
        loaded = model is not None and model.loaded
        return {
            "now": now, "version": __version__, "served_model": self.name or None, "api": self.api,
            "poll_s": self.monitor.poll_s, "timeout_s": self.monitor.timeout_s,
            "model": None if not loaded else {"name": model.name, "causal": model.config.causal},
            "devices": views.devices_view(names, self.monitor.statuses(), last=last, engine=load,
                                          links=self.monitor.links,
                                          weight_bytes=model.weight_bytes if loaded else [], now=now),
            "links_error": self.monitor.links_error,
            "plan": self._plan_view(loaded, names),
            "engine": views.engine_view(load, names)}

    def _plan_view(self, loaded: bool, names: list[str]) -> dict:
        """The loaded model's split; with no model, the plan file's (galaxy dashboard --plan)."""
        if not loaded and self.plan is not None:
            return views.plan_file_view(self.plan, names)
        return views.plan_view(self.model.partition if loaded else None, self.model.config if loaded else None,
                               self.plan, names)

    def timeline(self) -> dict:
        last = self.engine.last_step if self.engine is not None else None
        return views.timeline_view(last, list(self.session.executor.names), self.monitor.links, time.time())

    def history(self) -> dict:
        return self.monitor.history_view()

    # HTTP -----------------------------------------------------------------------------------------------
    def authorized(self, authorization: str | None, cookie_header: str | None) -> bool:
        if self.api_key is None:
            return True
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            return True
        try:
            morsel = SimpleCookie(cookie_header or "").get(COOKIE)
        except CookieError:
            return False
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), self._cookie.encode())

    def handle(self, method: str, path: str, query: str, headers) -> Response:
        """Answer one request under /dashboard (`path` without its query string or trailing slash)."""
        if method not in ("GET", "HEAD"):
            return self._json(405, {"error": {"message": f"the dashboard is read-only: {path} accepts GET and "
                                              f"HEAD, not {method}", "type": "invalid_request_error",
                                              "code": "method_not_allowed"}}, {"Allow": "GET, HEAD"})
        keys = parse_qs(query).get("key")
        if path == "/dashboard" and keys is not None:
            return self._login(keys[-1])
        if not self.authorized(headers.get("Authorization"), headers.get("Cookie")):
            if path == "/dashboard":
                return self._page(401, LOGIN.format(message="This dashboard needs the server's API key."))
            return self._json(401, {"error": {"message": "open /dashboard and give the API key first (or send "
                                              "'Authorization: Bearer <key>')", "type": "invalid_request_error",
                                              "code": "invalid_api_key"}})
        if path == "/dashboard":
            return Response(200, asset("dashboard.html"), ASSETS["dashboard.html"], dict(HEADERS))
        if path.startswith("/dashboard/static/"):
            name = path[len("/dashboard/static/"):]
            if name in ASSETS:
                return Response(200, asset(name), ASSETS[name], dict(HEADERS))
        views_by_path = {"/dashboard/state.json": self.state, "/dashboard/timeline.json": self.timeline,
                         "/dashboard/history.json": self.history}
        if path in views_by_path:
            return self._json(200, views_by_path[path]())
        return self._json(404, {"error": {"message": f"no dashboard resource {path}; see /dashboard, "
                                          f"{', '.join(views_by_path)}", "type": "invalid_request_error",
                                          "code": "unknown_url"}})

    def _login(self, key: str) -> Response:
        if self.api_key is not None and not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return self._page(401, LOGIN.format(message="That key is not this server's API key."))
        headers = {**HEADERS, "Location": "/dashboard"}  # the key leaves the address bar and the history
        if self.api_key is not None:
            headers["Set-Cookie"] = f"{COOKIE}={self._cookie}; Path=/dashboard; HttpOnly; SameSite=Strict"
        return Response(303, b"", "text/plain; charset=utf-8", headers)

    @staticmethod
    def _page(status: int, html: str) -> Response:
        return Response(status, html.encode(), ASSETS["dashboard.html"], dict(HEADERS))

    @staticmethod
    def _json(status: int, obj: dict, extra: dict[str, str] | None = None) -> Response:
        return Response(status, json.dumps(obj, allow_nan=False).encode(), "application/json",
                        {**HEADERS, **(extra or {})})
