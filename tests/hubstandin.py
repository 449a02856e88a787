"""A stand-in for the Hugging Face Hub on 127.0.0.1, enough for the real huggingface_hub's
`hf_hub_download` and `get_hf_file_metadata` (pointed at it with HF_ENDPOINT):
`HEAD`/`GET /{owner}/{repo}/resolve/{revision}/{path}` with the commit, ETag and linked
ETag/size headers, byte ranges (206) for resuming, and the Hub's error codes.

Faults to test against: a repo may be gated (401 `GatedRepo` unless the request carries its
token), a file may be cut after N bytes (the connection dropped, once), the server may send
slowly (bytes per second), and it counts the bytes it served per file.

Publishing, as `HfApi.create_repo` and `create_commit` do it (routes and payloads read from
huggingface_hub's hf_api.py and _commit_api.py): `POST /api/repos/create`, `POST
/api/validate-yaml` (the README's front matter must parse), `POST
/api/models/{repo}/preupload/{rev}` (every file "regular", so it comes inline, with the git
oid of the file already there so unchanged files are skipped), `POST
/api/models/{repo}/commit/{rev}` (the ndjson commit) and `GET
/api/models/{repo}[/revision/{rev}]` (repo_info). Writers are tokens (`writers`: token ->
user); a commit request can be dropped (the connection closed before it is applied) or
answered with an error status, and every applied commit is kept in `commits`.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import json
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
    writers: dict[str, str] = field(default_factory=dict)  # token -> the user it acts for
    repos: dict[str, dict] = field(default_factory=dict)  # repo -> {"private", "head"}
    commits: list[dict] = field(default_factory=list)  # applied: repo, oid, files, message
    drop_commits: int = 0  # this many commit requests: the connection closes, nothing applied
    commit_status: int = 0  # every commit request answered with this HTTP error (409 say)

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
            app.router.add_post("/api/repos/create", self._create_repo)
            app.router.add_post("/api/validate-yaml", self._validate_yaml)
            app.router.add_post("/api/models/{owner}/{repo}/preupload/{rev}", self._preupload)
            app.router.add_post("/api/models/{owner}/{repo}/commit/{rev}", self._commit)
            app.router.add_get("/api/models/{owner}/{repo}/revision/{rev}", self._revision)
            app.router.add_get("/api/models/{owner}/{repo}", self._revision)
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

    # --- publishing -----------------------------------------------------------------------
    def repo_files(self, repo: str) -> dict[str, bytes]:
        return {p: d for (r, p), d in self.files.items() if r == repo}

    def _writer(self, request: web.Request, repo: str | None) -> web.Response | str:
        """The user a request writes as, or the Hub's refusal (401 without a valid token, 403
        for another's namespace)."""
        auth = request.headers.get("Authorization", "")
        self.requests.append((request.method, request.path, auth))
        user = self.writers.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") \
            else None
        if user is None:
            return web.json_response({"error": "Invalid username or password."}, status=401)
        if repo is not None and repo.split("/")[0] != user:
            return web.json_response({"error": f"You don't have the rights to write to {repo}"},
                                     status=403)
        return user

    def _commit_files(self, repo: str, files: dict[str, bytes], message: str) -> str:
        head = self.repos[repo].get("head", "")
        oid = hashlib.sha1(f"{repo}{head}{message}{len(self.commits)}".encode()).hexdigest()
        for path, data in files.items():
            self.files[(repo, path)] = data
        self.repos[repo]["head"] = oid
        self.commits.append({"repo": repo, "oid": oid, "files": sorted(files),
                             "message": message})
        return oid

    async def _create_repo(self, request: web.Request) -> web.Response:
        body = await request.json()
        user = self._writer(request, None)
        if isinstance(user, web.Response):
            return user
        repo = f"{body.get('organization') or user}/{body['name']}"
        if repo.split("/")[0] != user:
            return web.json_response({"error": "You don't have the rights to create a model "
                                      f"under the namespace {repo.split('/')[0]}"}, status=403)
        if repo in self.repos:
            return web.json_response({"error": "You already created this model repo",
                                      "url": f"{self.url}/{repo}"}, status=409)
        self.repos[repo] = {"private": body.get("visibility") == "private"}
        self._commit_files(repo, {".gitattributes": b"*.safetensors filter=lfs\n"},
                           "initial commit")
        return web.json_response({"url": f"{self.url}/{repo}", "name": repo})

    async def _validate_yaml(self, request: web.Request) -> web.Response:
        import yaml

        content = (await request.json())["content"]
        head = content.split("---", 2)
        try:
            meta = yaml.safe_load(head[1]) if content.startswith("---") and len(head) == 3 \
                else {}
        except yaml.YAMLError as e:
            return web.json_response({"errors": [{"message": str(e)}]}, status=400)
        if not isinstance(meta, dict):
            return web.json_response({"errors": [{"message": "metadata is not a mapping"}]},
                                     status=400)
        return web.json_response({"errors": [], "warnings": []})

    async def _preupload(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        user = self._writer(request, repo)
        if isinstance(user, web.Response):
            return user
        if repo not in self.repos:
            return web.Response(status=404, headers={"X-Error-Code": "RepoNotFound"})
        have = self.repo_files(repo)
        out = []
        for f in (await request.json())["files"]:
            data = have.get(f["path"])
            oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() \
                if data is not None else None
            out.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                        "oid": oid})
        return web.json_response({"files": out})

    async def _commit(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        user = self._writer(request, repo)
        if isinstance(user, web.Response):
            return user
        body = await request.read()
        if self.drop_commits:
            self.drop_commits -= 1
            request.transport.close()  # the request was lost on its way: nothing applied
            return web.Response(status=500)
        if self.commit_status:
            return web.json_response({"error": "A commit has happened since. Please refresh "
                                      "and try again."}, status=self.commit_status)
        if repo not in self.repos:
            return web.Response(status=404, headers={"X-Error-Code": "RepoNotFound"})
        files, message = {}, ""
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                message = item["value"]["summary"]
            elif item["key"] == "file":
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        oid = self._commit_files(repo, files, message)
        return web.json_response({"commitUrl": f"{self.url}/{repo}/commit/{oid}",
                                  "commitOid": oid})

    async def _revision(self, request: web.Request) -> web.Response:
        repo = f"{request.match_info['owner']}/{request.match_info['repo']}"
        if repo not in self.repos:
            return web.Response(status=404, headers={"X-Error-Code": "RepoNotFound"})
        return web.json_response({"id": repo, "sha": self.repos[repo]["head"],
                                  "private": self.repos[repo]["private"],
                                  "siblings": [{"rfilename": p} for p in self.repo_files(repo)]})


def serve_tiny_flux(hub: Hub, tiny_single: dict[str, str]) -> dict[str, dict]:
    """The tiny model's single files (conftest's tiny_single) as repos on the stand-in; the
    catalog entries that name them ([models.NAME] tables), "tiny-flux" needing the rest."""
    from pathlib import Path

    parts = {"pretrained_model": "tiny-flux", "ae": "tiny-ae", "clip_l": "tiny-clip",
             "t5xxl": "tiny-t5"}
    entries = {}
    for key, name in parts.items():
        path = Path(tiny_single[key])
        hub.add(f"acme/{name}", path.name, path.read_bytes())
        entries[name] = {"repo": f"acme/{name}", "file": path.name,
                         "part": "transformer" if key == "pretrained_model" else key}
    tok = Path(tiny_single["tokenizers"])
    files = sorted(str(p.relative_to(tok)) for p in tok.rglob("*") if p.is_file())
    for f in files:
        hub.add("acme/tiny-tok", f, (tok / f).read_bytes())
    entries["tiny-tok"] = {"repo": "acme/tiny-tok", "files": files, "part": "tokenizers"}
    entries["tiny-flux"]["needs"] = ["tiny-ae", "tiny-clip", "tiny-t5", "tiny-tok"]
    return entries
