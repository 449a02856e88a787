"""The dashboard's new-LoRA page on the server: drafts of uploaded photos (uploads.py checks
every file), their captions, a caption job over a draft, the memory plan beside the VRAM
choice, and "Start training", which is the daemon's `new` operation with the draft as the
photo folder: the chain `fluxgymctl new` queues, through the same code.

Mixed into web.Web (its `ops`, `_op`, `_error`)."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .protocol import FluxgymError, check_args
from .uploads import Drafts, UploadError

CAPTION_JOB_FILE = ".caption-job"  # in the draft: the id of its caption job


class NewLoraPage:
    drafts: Drafts

    def _add_new_lora_routes(self, r) -> None:
        self.drafts = Drafts(self.cfg.drafts_dir, self.cfg.max_upload_mb * 2**20)
        r.add_get("/api/models", self.models)
        r.add_get("/api/plan", self.plan)
        r.add_post("/api/drafts", self.draft_create)
        r.add_get("/api/drafts/{draft}", self.draft_show)
        r.add_post("/api/drafts/{draft}/files", self.draft_upload)
        r.add_get("/api/drafts/{draft}/files/{name}", self.draft_file)
        r.add_put("/api/drafts/{draft}/captions/{name}", self.draft_caption)
        r.add_post("/api/drafts/{draft}/caption", self.draft_caption_job)
        r.add_post("/api/drafts/{draft}/start", self.draft_start)

    def _known(self, ref: str) -> bool:
        try:
            self.find(ref)
            return True
        except FluxgymError:
            return False

    @staticmethod
    def _upload_error(e: UploadError) -> web.Response:
        return web.json_response({"error": e.message}, status=e.status)

    async def models(self, request: web.Request) -> web.Response:
        return await self._op(self.ops["models"])

    async def plan(self, request: web.Request) -> web.Response:
        try:
            args = check_args("plan", {"base": request.query.get("base", ""),
                                       "resolution": int(request.query.get("resolution",
                                                                           "512"))})
        except (FluxgymError, ValueError) as e:
            return web.json_response({"error": getattr(e, "message", str(e))}, status=400)
        return await self._op(self.ops["plan"], **args)

    async def draft_create(self, request: web.Request) -> web.Response:
        return web.json_response({"id": self.drafts.create(),
                                  "max_upload_mb": self.cfg.max_upload_mb})

    async def draft_show(self, request: web.Request) -> web.Response:
        try:
            folder = self.drafts.folder(request.match_info["draft"])
            files = self.drafts.listing(request.match_info["draft"])
        except UploadError as e:
            return self._upload_error(e)
        job = None
        marker = folder / CAPTION_JOB_FILE
        if marker.is_file():
            try:
                job = self.ops["show"]({"job": marker.read_text().strip(), "events": 0})
            except FluxgymError:
                job = None  # removed since
        return web.json_response({"id": folder.name, "files": files, "caption_job": job},
                                 dumps=lambda o: json.dumps(o, default=str))

    async def draft_upload(self, request: web.Request) -> web.Response:
        """One file, its name in ?name=, its bytes the request's body (streamed)."""
        async def chunks():
            while True:
                chunk = await request.content.read(64 * 1024)
                if not chunk:
                    return
                yield chunk
        try:
            stored = await self.drafts.store(request.match_info["draft"],
                                             request.query.get("name", ""),
                                             request.content_length, chunks())
        except UploadError as e:
            resp = self._upload_error(e)
            if e.status == 413:
                resp.force_close()  # the rest of the body is never read
            return resp
        return web.json_response(stored)

    async def draft_file(self, request: web.Request) -> web.StreamResponse:
        try:
            folder = self.drafts.folder(request.match_info["draft"])
            names = {f["name"] for f in self.drafts.listing(folder.name)}
        except UploadError as e:
            return self._upload_error(e)
        name = request.match_info["name"]
        if name not in names:  # by the draft's own listing: never a path
            raise web.HTTPNotFound()
        return web.FileResponse(folder / name, headers={"Cache-Control": "no-store"})

    async def draft_caption(self, request: web.Request) -> web.Response:
        text = await request.text()
        try:
            return web.json_response(self.drafts.write_caption(
                request.match_info["draft"], request.match_info["name"], text))
        except UploadError as e:
            return self._upload_error(e)

    async def draft_caption_job(self, request: web.Request) -> web.Response:
        """Caption the draft's photos that have no caption (kind = "caption", the configured
        Florence-2, fetched first when missing): the page fills its boxes when it ends."""
        import tomli_w

        try:
            folder = self.drafts.folder(request.match_info["draft"])
            if not self.drafts.listing(folder.name):
                raise UploadError("add photos first", 409)
        except UploadError as e:
            return self._upload_error(e)
        trigger = request.query.get("trigger", "")
        text = tomli_w.dumps({"job": {"name": f"caption-{folder.name}", "kind": "caption",
                                      "description": "captions of a new LoRA's photos"},
                              "caption": {"dataset_dir": str(folder),
                                          **({"trigger_word": trigger} if trigger else {})}})
        stem, n = f"caption-{folder.name}", 1
        name = stem
        while self._known(name):  # a second press captions what is still missing
            n += 1
            name = f"{stem}-{n}"
        try:
            job = await self.ops["submit"]({"text": text, "source": "", "name": name,
                                            "priority": 0, "after": None})
        except FluxgymError as e:
            return self._error(e)
        (folder / CAPTION_JOB_FILE).write_text(str(job["id"]))
        return web.json_response(job, dumps=lambda o: json.dumps(o, default=str))

    async def draft_start(self, request: web.Request) -> web.Response:
        """The form as the `new` operation's arguments, the draft as its photos."""
        try:
            folder = self.drafts.folder(request.match_info["draft"])
            form = await request.json()
        except UploadError as e:
            return self._upload_error(e)
        except ValueError:
            return web.json_response({"error": "send the form as a JSON object"}, status=400)
        if not isinstance(form, dict):
            return web.json_response({"error": "send the form as a JSON object"}, status=400)
        form = {k: v for k, v in form.items() if k != "images"}
        try:
            args = check_args("new", {**form, "images": str(folder)})
        except FluxgymError as e:
            return self._error(e)
        resp = await self._op(self.ops["new"], **args)
        if resp.status == 200 and not args["dry_run"]:
            import shutil
            shutil.rmtree(folder, ignore_errors=True)  # copied into the job's folder
        return resp
