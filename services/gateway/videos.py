"""Video generation as jobs (OpenAI's videos API): POST /v1/videos queues one, GET polls it,
GET .../content downloads the MP4, DELETE removes it.

Jobs live in SQLite (`video_jobs_path` in the serve config), written at every state change, so
a gateway restart loses none: queued and in-progress jobs run again from the start (a partly
denoised clip is not worth keeping), finished ones stay downloadable. The request is checked by
the router before the job is accepted (a bad size or frame count is a 400 then, not a failed
job later). One gateway process owns one database file; several gateway replicas need one file
each (jobs are polled on the replica that accepted them, as with image URLs)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from services.gateway.api_types import VideoBody
from services.gateway.video import encode_mp4
from services.runtime.errors import DitserveError, InvalidRequestError, ModelNotFoundError, NotFoundError

log = logging.getLogger(__name__)

POLL_AFTER_MS = 1000  # the openai-poll-after-ms header: how soon a client should ask again
# Jobs handed to the router at once; the rest wait here as "queued" instead of filling the
# router's queue (whose overflow is a 429, which would fail an accepted job).
MAX_RUNNING = 4
# A job's deadline in the router: a clip of a 14B model takes minutes, not the 600 s default.
JOB_TIMEOUT_S = 6 * 3600
_SCHEMA = """CREATE TABLE IF NOT EXISTS videos (
    id TEXT PRIMARY KEY, created_at INTEGER NOT NULL, status TEXT NOT NULL, progress INTEGER NOT NULL,
    completed_at INTEGER, body TEXT NOT NULL, info TEXT NOT NULL, error TEXT, content BLOB,
    input_image BLOB)"""


class VideoJobs:
    def __init__(self, router, model_id: str, path: Path):
        self.router, self.model_id = router, model_id
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(_SCHEMA)
        self.lock = threading.Lock()
        self.tasks: dict[str, asyncio.Task] = {}
        self._slots: asyncio.Semaphore | None = None  # made in the serving loop

    # -- the API -------------------------------------------------------------------------
    async def create(self, body: VideoBody, images: list[bytes] = ()) -> dict:
        """`images`: input_reference, for image-to-video models."""
        if body.model not in (None, "", self.model_id):
            raise ModelNotFoundError(f"model '{body.model}' is not served here (serving '{self.model_id}')")
        if len(images) > 1:
            raise InvalidRequestError("input_reference: one image", "input_reference")
        # 400s now, not failed jobs later
        resolved = await self.router.check(body.to_generate_request(list(images)))
        seed = resolved.seeds[0]
        info = {"size": f"{resolved.width}x{resolved.height}", "num_frames": resolved.num_frames,
                "fps": resolved.fps, "seed": seed, "seconds": f"{resolved.num_frames / resolved.fps:g}"}
        job_id = "video_" + secrets.token_hex(12)
        stored = body.model_copy(update={"seed": seed})  # a rerun after a restart makes the same clip
        self._write("INSERT INTO videos (id, created_at, status, progress, body, info, input_image) "
                    "VALUES (?, ?, ?, 0, ?, ?, ?)", job_id, int(time.time()), "queued", stored.model_dump_json(),
                    json.dumps(info), images[0] if images else None)
        self._start(job_id)
        return self.get(job_id)

    def get(self, job_id: str) -> dict:
        row = self._read("SELECT id, created_at, status, progress, completed_at, body, info, error FROM videos "
                         "WHERE id = ?", job_id)
        if not row:
            raise NotFoundError(f"no video '{job_id}'", "video_id")
        return self._object(row[0])

    def list(self, after: str | None, limit: int, order: str) -> dict:
        rows = self._read("SELECT id, created_at, status, progress, completed_at, body, info, error FROM videos "
                          f"ORDER BY created_at {'ASC' if order == 'asc' else 'DESC'}, rowid "
                          f"{'ASC' if order == 'asc' else 'DESC'}")
        ids = [r[0] for r in rows]
        start = ids.index(after) + 1 if after in ids else 0
        page = rows[start : start + limit]
        data = [self._object(r) for r in page]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": start + limit < len(rows)}

    def delete(self, job_id: str) -> dict:
        self.get(job_id)
        task = self.tasks.pop(job_id, None)
        if task is not None:
            task.cancel()
        self._write("DELETE FROM videos WHERE id = ?", job_id)
        return {"id": job_id, "object": "video.deleted", "deleted": True}

    def content(self, job_id: str) -> bytes:
        video = self.get(job_id)
        if video["status"] != "completed":
            raise InvalidRequestError(f"video '{job_id}' is {video['status']}, not completed", "video_id")
        return self._read("SELECT content FROM videos WHERE id = ?", job_id)[0][0]

    def resume(self) -> None:
        """At start-up (inside the event loop): run again what a previous process accepted."""
        for (job_id,) in self._read("SELECT id FROM videos WHERE status IN ('queued', 'in_progress')"):
            self._write("UPDATE videos SET status = 'queued', progress = 0 WHERE id = ?", job_id)
            self._start(job_id)

    # -- running a job ---------------------------------------------------------------------
    def _start(self, job_id: str) -> None:
        self.tasks[job_id] = asyncio.get_running_loop().create_task(self._run(job_id))

    async def _run(self, job_id: str) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_RUNNING)
        async with self._slots:
            await self._run_now(job_id)

    async def _run_now(self, job_id: str) -> None:
        last = [-1]

        def on_step(done: int, total: int) -> None:
            progress = min(99, int(done * 100 / max(total, 1)))  # 100 once the MP4 is stored
            if progress != last[0]:
                last[0] = progress
                self._write("UPDATE videos SET status = 'in_progress', progress = ? WHERE id = ?", progress, job_id)

        try:
            rows = self._read("SELECT body, input_image FROM videos WHERE id = ?", job_id)
            if not rows:  # deleted while it waited
                return
            # inside the try: a stored body this version cannot read fails its job, visibly
            body, image = VideoBody.model_validate_json(rows[0][0]), rows[0][1]
            self._write("UPDATE videos SET status = 'in_progress' WHERE id = ?", job_id)
            result = await self.router.generate(body.to_generate_request([image] if image else []), on_step=on_step,
                                                timeout_s=JOB_TIMEOUT_S)
            r = result.request
            mp4 = await asyncio.to_thread(encode_mp4, result.images[0].pixels, r.fps)
            self._write("UPDATE videos SET status = 'completed', progress = 100, completed_at = ?, content = ? "
                        "WHERE id = ?", int(time.time()), mp4, job_id)
        except asyncio.CancelledError:  # deleted while running
            raise
        except Exception as exc:  # the job fails, the gateway keeps serving
            code = exc.code if isinstance(exc, DitserveError) else "internal_error"
            message = str(exc) if isinstance(exc, DitserveError) else f"internal error: {type(exc).__name__}"
            if not isinstance(exc, DitserveError):
                log.exception("video job %s failed", job_id)
            self._write("UPDATE videos SET status = 'failed', completed_at = ?, error = ? WHERE id = ?",
                        int(time.time()), json.dumps({"code": code, "message": message}), job_id)
        finally:
            self.tasks.pop(job_id, None)

    # -- storage ---------------------------------------------------------------------------
    def _object(self, row) -> dict:
        job_id, created, status, progress, completed, body, info, error = row
        body, info = json.loads(body), json.loads(info)
        return {"id": job_id, "object": "video", "model": self.model_id, "status": status, "progress": progress,
                "created_at": created, "completed_at": completed, "expires_at": None, "prompt": body["prompt"],
                "seconds": info["seconds"], "size": info["size"], "remixed_from_video_id": None,
                "error": json.loads(error) if error else None,
                "num_frames": info["num_frames"], "fps": info["fps"], "seed": info["seed"]}

    def _write(self, sql: str, *args) -> None:
        with self.lock:
            self.db.execute(sql, args)

    def _read(self, sql: str, *args) -> list:
        with self.lock:
            return self.db.execute(sql, args).fetchall()
