"""The dashboard, served by fluxgymd itself on its own asyncio loop (aiohttp): the page, a JSON
API over the daemon's own operations, a server-sent events stream fed by the same publish
that feeds the events socket, the samples and logs by job and file name, the finished LoRA
by job (a download), and a Prometheus text endpoint. Off unless `[web] listen` (or `fluxgymd --web HOST:PORT`) is set.

Access: every request needs the token (kept in a file only the service user reads; `fluxgymctl
web-url` prints the login URL) unless it comes over loopback and `trust_loopback` is on.
The token arrives as `?token=` once (then a cookie, HttpOnly, SameSite=Strict), or as an
`Authorization: Bearer` header. Actions (cancel, retry, submit, save-now, sample-now,
publish) need the token always, in the `X-Fluxgymd-Token` header, which a cross-site form
cannot send.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
from importlib import util as importlib_util
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from .config import WebConfig, parse_listen
from .kinds import kind_of
from .protocol import FluxgymError
from .webnew import NewLoraPage


log = logging.getLogger("fluxgymd")
ASSETS = Path(__file__).with_name("webpage")
COOKIE = "fluxgymd_token"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")
EVENT_QUEUE = 1000  # per page; a page that falls this far behind reloads its state
STATUS = {"not_found": 404, "ambiguous": 409, "conflict": 409, "invalid_state": 409,
          "invalid_job": 422, "bad_args": 400, "forbidden": 403}


def load_token(path: Path) -> str:
    """The token from its file, made (mode 0600) on first use."""
    try:
        token = path.read_text(encoding="utf-8").strip()
        if len(token) >= 16:
            return token
    except FileNotFoundError:
        pass
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(token + "\n")
    return token


def plotly_js() -> Path | None:
    """plotly.js as the plotly package ships it (pip installs it; nothing from the internet)."""
    spec = importlib_util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "package_data" / "plotly.min.js"
    return path if path.is_file() else None


class Web(NewLoraPage):
    """The dashboard over the daemon's own operations: `ops` is the control socket's handler
    table (one code path for the CLI and the page), `find` resolves a job reference to its
    store row, `figures` gives /metrics its data (promexport.render's argument)."""

    def __init__(self, cfg: WebConfig, ops: dict[str, Callable[[dict[str, Any]], Any]],
                 find: Callable[[str], dict[str, Any]], figures: Callable[[], dict[str, Any]]):
        self.ops, self.find, self.figures = ops, find, figures
        self.cfg = cfg
        self.host, self.port = parse_listen(cfg.listen)
        self.base = "/" + cfg.base_path.strip("/") if cfg.base_path.strip("/") else ""
        self.token = load_token(Path(cfg.token_file))
        self.clients: set[asyncio.Queue] = set()
        self.runner: web.AppRunner | None = None

    # --- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        app = web.Application(middlewares=[self._auth], client_max_size=1024 * 1024)
        r = app.router
        r.add_get("/", self.page)
        r.add_get("/static/{name}", self.static)
        r.add_get("/api/jobs", self.jobs)
        r.add_get("/api/jobs/{job}", self.job)
        r.add_get("/api/jobs/{job}/metrics", self.metrics)
        r.add_get("/api/jobs/{job}/log", self.log)
        r.add_get("/api/jobs/{job}/samples", self.samples)
        r.add_get("/api/jobs/{job}/samples/{name}", self.sample)
        r.add_get("/api/jobs/{job}/lora", self.lora)
        r.add_get("/api/jobs/{job}/checkpoint", self.checkpoint)
        r.add_post("/api/jobs/{job}/cancel", self.cancel)
        r.add_post("/api/jobs/{job}/retry", self.retry)
        r.add_post("/api/jobs/{job}/save-now", self.save_now)
        r.add_post("/api/jobs/{job}/sample-now", self.sample_now)
        r.add_post("/api/jobs/{job}/publish", self.publish_job)
        r.add_post("/api/submit", self.submit)
        r.add_get("/api/gpus", self.gpus)
        self._add_new_lora_routes(r)
        r.add_get("/api/events", self.events)
        r.add_get("/metrics", self.prometheus)
        root = app
        if self.base:
            root = web.Application(middlewares=[self._auth], client_max_size=1024 * 1024)
            root.add_subapp(self.base, app)
        # lingering_time=0: a request answered before its body was read (an upload over the
        # limit) has its connection closed, not the rest of its body read and thrown away
        self.runner = web.AppRunner(root, access_log=None, handle_signals=False,
                                    lingering_time=0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        bound = site._server.sockets[0].getsockname() if site._server else (self.host, self.port)
        self.port = bound[1]
        log.info("dashboard on http://%s:%s%s/ (%s)", self.host, self.port, self.base,
                 "loopback trusted" if self.cfg.trust_loopback else "token required")

    async def close(self) -> None:
        for q in list(self.clients):
            q.put_nowait(None)
        if self.runner is not None:
            await self.runner.cleanup()

    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            import socket
            host = socket.gethostname()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}{self.base}/?token={self.token}"

    # --- events from the daemon ---------------------------------------------------------
    def publish(self, topic: bytes, obj: dict[str, Any]) -> None:
        if not self.clients:
            return
        kind = topic.decode("ascii", "replace")
        data = json.dumps({"topic": kind, "data": obj}, default=str)
        for q in list(self.clients):
            if q.qsize() >= EVENT_QUEUE - 1:
                # a page this far behind starts over: it reloads its state on "gap"
                while not q.empty():
                    q.get_nowait()
                q.put_nowait('{"topic":"gap"}')
            q.put_nowait(data)

    # --- access -------------------------------------------------------------------------
    def _token_ok(self, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    def _loopback(self, request: web.Request) -> bool:
        try:
            return ipaddress.ip_address(request.remote or "").is_loopback
        except ValueError:
            return False

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.method not in ("GET", "HEAD"):
            if not self._token_ok(request.headers.get("X-Fluxgymd-Token")):
                return self._refuse(request, 403, "actions need the token in the "
                                    "X-Fluxgymd-Token header")
            return await handler(request)
        given = request.query.get("token")
        auth = request.headers.get("Authorization", "")
        candidates = [given, request.cookies.get(COOKIE),
                      auth[7:] if auth.startswith("Bearer ") else None]
        ok = any(self._token_ok(c) for c in candidates)
        if not ok and not (self.cfg.trust_loopback and self._loopback(request)):
            return self._refuse(request, 401, "this page needs its token: run `fluxgymctl "
                                "web-url` on the machine and open the URL it prints")
        response = await handler(request)
        if self._token_ok(given) and isinstance(response, web.Response):
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="Strict",
                                path=self.base or "/")
        return response

    @staticmethod
    def _refuse(request: web.Request, status: int, why: str) -> web.Response:
        if request.path.rstrip("/").endswith("/api") or "/api/" in request.path:
            return web.json_response({"error": why}, status=status)
        return web.Response(status=status, text=f"fluxgymd: {why}\n")

    # --- the page -----------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.Response:
        if not request.path.endswith("/"):
            raise web.HTTPFound(request.path + "/")  # relative URLs need the slash
        html = (ASSETS / "index.html").read_text(encoding="utf-8")
        html = html.replace("{{token}}", self.token)
        return web.Response(text=html, content_type="text/html",
                            headers={"Cache-Control": "no-store"})

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "plotly.min.js":
            path = plotly_js()
            if path is None:
                raise web.HTTPNotFound(text="plotly is not installed (pip install plotly)")
        elif SAFE_NAME.fullmatch(name) and name in {p.name for p in ASSETS.iterdir()}:
            path = ASSETS / name
        else:
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    # --- the API ------------------------------------------------------------------------
    def _error(self, e: FluxgymError) -> web.Response:
        return web.json_response({"error": e.message, "code": e.code.value},
                                 status=STATUS.get(e.code.value, 400))

    async def _op(self, op, **args) -> web.Response:
        try:
            result = op(args)
            if asyncio.iscoroutine(result):
                result = await result
        except FluxgymError as e:
            return self._error(e)
        return web.json_response(result, dumps=lambda o: json.dumps(o, default=str))

    async def jobs(self, request: web.Request) -> web.Response:
        return await self._op(self.ops["list"], states=None, all=True)

    async def job(self, request: web.Request) -> web.Response:
        return await self._op(self.ops["show"], job=request.match_info["job"], events=200)

    async def metrics(self, request: web.Request) -> web.Response:
        return await self._op(self.ops["metrics"], job=request.match_info["job"], limit=100_000)

    async def log(self, request: web.Request) -> web.Response:
        after = request.query.get("after")
        try:
            lines = min(int(request.query.get("lines", "500")), 100_000)
            after_n = int(after) if after is not None else None
        except ValueError:
            return web.json_response({"error": "lines and after are integers"}, status=400)
        return await self._op(self.ops["logs"], job=request.match_info["job"], lines=lines,
                              after=after_n, timestamps=False)

    def _job_and_samples(self, ref: str) -> tuple[dict[str, Any], Path | None]:
        job = self.find(ref)
        return job, kind_of(job).sample_dir(job)

    async def samples(self, request: web.Request) -> web.Response:
        try:
            job, folder = self._job_and_samples(request.match_info["job"])
        except FluxgymError as e:
            return self._error(e)
        items = []
        if folder is not None and folder.is_dir():
            kind = kind_of(job)
            for p in folder.iterdir():
                if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp") and p.is_file() \
                        and SAFE_NAME.fullmatch(p.name):
                    items.append({"name": p.name, "step": kind.sample_step(p.name),
                                  "at": p.stat().st_mtime})
        items.sort(key=lambda s: (s["step"] if s["step"] is not None else -1, s["name"]),
                   reverse=True)
        return web.json_response({"job": job["id"], "samples": items})

    async def sample(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        # by name only: never a path, never outside the job's samples folder
        if not SAFE_NAME.fullmatch(name) or ".." in name:
            return web.json_response({"error": "a sample is named by its file name only"},
                                     status=400)
        try:
            job, folder = self._job_and_samples(request.match_info["job"])
        except FluxgymError as e:
            return self._error(e)
        if folder is None:
            raise web.HTTPNotFound()
        path = (folder / name).resolve()
        if path.parent != folder.resolve() or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "max-age=86400"})

    async def lora(self, request: web.Request) -> web.StreamResponse:
        """The finished LoRA, by job only (its kind says which file), as a download."""
        try:
            job = self.find(request.match_info["job"])
        except FluxgymError as e:
            return self._error(e)
        path = kind_of(job).result(job) if kind_of(job).makes_lora else None
        if path is None or not os.path.isfile(path):
            return web.json_response({"error": f"job {job['id']} ({job['name']}) has no "
                                      f"finished LoRA ({job['state']})"}, status=404)
        name = os.path.basename(path)
        return web.FileResponse(path, headers={
            "Content-Disposition": f'attachment; filename="{name}"',
            "Content-Type": "application/octet-stream", "Cache-Control": "no-store"})

    async def checkpoint(self, request: web.Request) -> web.StreamResponse:
        """The job's newest complete checkpoint (a folder) as one tar, streamed file by file
        (no copy on disk, nothing held in memory), its length known up front."""
        import tarfile

        try:
            job = self.find(request.match_info["job"])
        except FluxgymError as e:
            return self._error(e)
        folder = Path(job["checkpoint"]) if job.get("checkpoint") else None
        if folder is None or not folder.is_dir():
            return web.json_response({"error": f"job {job['id']} ({job['name']}) has no "
                                      "complete checkpoint"}, status=404)
        name = f"{job['name']}-{folder.name}"
        entries = []
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                info = tarfile.TarInfo(f"{name}/{p.relative_to(folder)}")
                st = p.stat()
                info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), 0o644
                entries.append((p, info.tobuf(format=tarfile.PAX_FORMAT), st.st_size))
        pad = lambda n: -n % tarfile.BLOCKSIZE  # noqa: E731
        length = sum(len(h) + n + pad(n) for _, h, n in entries) + 2 * tarfile.BLOCKSIZE
        resp = web.StreamResponse(headers={
            "Content-Type": "application/x-tar", "Content-Length": str(length),
            "Content-Disposition": f'attachment; filename="{name}.tar"',
            "Cache-Control": "no-store"})
        await resp.prepare(request)
        for path, header, size in entries:
            await resp.write(header)
            with open(path, "rb") as fh:
                left = size
                while left > 0:
                    # off the loop: a cold disk must not hold up the daemon's supervision
                    chunk = await asyncio.to_thread(fh.read, min(left, 1 << 20))
                    if not chunk:  # shrank since: the download is cut, not padded wrong
                        raise ConnectionResetError(f"{path} changed while it was sent")
                    await resp.write(chunk)
                    left -= len(chunk)
            await resp.write(b"\0" * pad(size))
        await resp.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        await resp.write_eof()
        return resp

    async def save_now(self, request: web.Request) -> web.Response:
        return await self._op(self.ops["control"], job=request.match_info["job"], action="save")

    async def sample_now(self, request: web.Request) -> web.Response:
        return await self._op(self.ops["control"], job=request.match_info["job"],
                              action="sample")

    async def publish_job(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("repo"), str) or \
                not isinstance(body.get("private", False), bool):
            return web.json_response({"error": "send {\"repo\": \"OWNER/NAME\", "
                                      "\"private\": false}"}, status=400)
        return await self._op(self.ops["publish"], job=request.match_info["job"],
                              repo=body["repo"], private=body.get("private", False),
                              samples=True, name="", priority=0)

    async def cancel(self, request: web.Request) -> web.Response:
        return await self._op(self.ops["cancel"], job=request.match_info["job"])

    async def retry(self, request: web.Request) -> web.Response:
        return await self._op(self.ops["retry"], job=request.match_info["job"])

    async def submit(self, request: web.Request) -> web.Response:
        text = await request.text()
        name = request.query.get("name", "")
        return await self._op(self.ops["submit"], text=text,
                              source=request.query.get("filename", "uploaded.toml"),
                              name=name, priority=0)

    async def gpus(self, request: web.Request) -> web.Response:
        return await self._op(self.ops["gpus"])

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: job states, progress and log lines as the daemon publishes."""
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue(EVENT_QUEUE)
        self.clients.add(q)
        try:
            await resp.write(b": fluxgymd\n\n")
            while True:
                try:
                    item = await asyncio.wait_for(q.get(), 15.0)
                except asyncio.TimeoutError:
                    await resp.write(b": keepalive\n\n")
                    continue
                if item is None:
                    break
                await resp.write(f"data: {item}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.clients.discard(q)
        return resp

    async def prometheus(self, request: web.Request) -> web.Response:
        from .promexport import render
        body, ctype = render(self.figures())
        return web.Response(body=body, headers={"Content-Type": ctype})
