"""A stand-in for the Hugging Face Hub on 127.0.0.1, enough for the real huggingface_hub's
`hf_hub_download` and `get_hf_file_metadata` (pointed at it with HF_ENDPOINT):
`HEAD`/`GET /{owner}/{repo}/resolve/{revision}/{path}` with the commit, ETag and linked
ETag/size headers, byte ranges (206) for resuming, and the Hub's error codes.

Faults to test against: a repo may be gated (401 `GatedRepo` unless the request carries its
token), a file may be cut after N bytes (the connection dropped, once), the server may send
slowly (bytes per second), and it counts the bytes it served per file.
"""
from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field

from aiohttp import web

COMMIT = "0123456789abcdef0123456789abcdef01234567"
CHUNK = 256 * 1024


@dataclass
class Hub:
    files: dict[tuple[str, str], bytes] = field(default_factory=dict)  # (repo, path) -> data
    gated: dict[str, str] = field(default_factory=dict)  # repo -> the token that may read it
    cut_after: dict[tuple[str, str], int] = field(default_factory=dict)  # once, then served
    hang_after: dict[tuple[str, str], int] = field(default_factory=dict)  # once: no more bytes
    rate: float = 0.0  # bytes per second (0: as fast as it goes)
    served: dict[tuple[str, str], int] = field(default_factory=dict)
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # method, path, auth
    ranges: list[str] = field(default_factory=list)  # each GET's Range header ("" for none)

    def add(self, repo: str, path: str, data: bytes) -> str:
        self.files[(repo, path)] = data
        return hashlib.sha256(data).hexdigest()

    # --- the server ---------------------------------------------------------------------
    def start(self) -> "Hub":
        ready = threading.Event()

        def run():
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self._closing = asyncio.Event()
            app = web.Application()
            app.router.add_route("*", "/{owner}/{repo}/resolve/{rev}/{path:.+}", self._resolve)
            self.runner = web.AppRunner(app, access_log=None)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        assert ready.wait(10), "the Hub stand-in did not start"
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        async def down():
            self._closing.set()  # a hanging answer ends
            await self.runner.cleanup()
        asyncio.run_coroutine_threadsafe(down(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        path = request.match_info["path"]
        auth = request.headers.get("Authorization", "")
        self.requests.append((request.method, f"{repo}/{path}", auth))
        if repo in self.gated and auth != f"Bearer {self.gated[repo]}":
            return web.Response(status=401, headers={"X-Error-Code": "GatedRepo",
                                                     "X-Error-Message": "Access to this repo is "
                                                     "restricted"})
        if not any(r == repo for r, _ in self.files):
            return web.Response(status=404, headers={"X-Error-Code": "RepoNotFound",
                                                     "X-Error-Message": "Repository not found"})
        data = self.files.get((repo, path))
        if data is None:
            return web.Response(status=404, headers={"X-Error-Code": "EntryNotFound",
                                                     "X-Error-Message": "Entry not found"})
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        headers = {"X-Repo-Commit": COMMIT, "ETag": etag, "X-Linked-Etag": etag,
                   "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes"}
        start, end = 0, len(data)
        rng = request.headers.get("Range", "")
        status = 200
        if rng.startswith("bytes="):
            first, _, last = rng[len("bytes="):].partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else len(data)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        if request.method != "HEAD":
            self.ranges.append(rng)
        if request.method == "HEAD":
            headers["Content-Length"] = str(len(data))
            return web.Response(status=200, headers=headers)
        headers["Content-Length"] = str(end - start)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        try:
            await self._send(request, resp, (repo, path), data, start, end)
        except ConnectionResetError:  # the client went away (killed): nothing to answer
            pass
        return resp

    async def _send(self, request, resp, key, data: bytes, start: int, end: int) -> None:
        cut = self.cut_after.pop(key, None)
        hang = self.hang_after.pop(key, None)
        pos = start
        while pos < end:
            n = min(CHUNK, end - pos)
            if cut is not None and pos + n > cut:
                n = max(0, cut - pos)
                if n:
                    await resp.write(data[pos:pos + n])
                    self.served[key] = self.served.get(key, 0) + n
                request.transport.close()  # the connection dropped mid-file
                return
            if hang is not None and pos >= hang:
                await self._closing.wait()  # the connection stays open and nothing comes
                return
            await resp.write(data[pos:pos + n])
            self.served[key] = self.served.get(key, 0) + n
            pos += n
            if self.rate:
                await asyncio.sleep(n / self.rate)
        await resp.write_eof()
