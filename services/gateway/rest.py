"""OpenAI-style REST API (FastAPI). Talks to the router, never to a model.

Every error is the OpenAI error object {"error": {"message", "type", "param", "code"}} with the
status of its kind (400 bad field, 404 unknown model, 429 queue full, 503 stage unavailable,
504 deadline), including FastAPI's own validation and routing errors."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.api_types import ImageGenerationBody, SetLoraBody, VideoBody
from services.gateway.images import MIME_TYPES, encode_images
from services.gateway.store import ImageStore
from services.gateway.video import MP4_MIME
from services.gateway.videos import POLL_AFTER_MS, VideoJobs
from services.runtime import metrics
from services.runtime.config import validated
from services.runtime.errors import (
    HTTP_STATUS,
    DitserveError,
    InvalidRequestError,
    ModelNotFoundError,
    RequestCancelledError,
    lookup,
)


@dataclass(frozen=True)
class ModelCard:
    id: str
    family: str
    pipeline_class: str
    created: int
    video: bool = False  # a video model: POST /v1/videos, not /v1/images/generations


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(exc: Exception) -> JSONResponse:
    if isinstance(exc, DitserveError):
        status, type_ = lookup(HTTP_STATUS, exc, (500, "server_error"))
        return JSONResponse(error_body(str(exc), type_, exc.code, getattr(exc, "param", None)), status_code=status)
    return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error", "internal_error"), 500)


async def _until_disconnect(request: Request, coro):
    """Run `coro`, cancelling it if the HTTP client disconnects first (frees its batch slot)."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise RequestCancelledError("client disconnected")


MAX_UPLOAD_BYTES = 32 * 2**20  # one uploaded image or mask


async def read_upload(upload, param: str) -> bytes:
    if upload.size is not None and upload.size > MAX_UPLOAD_BYTES:
        raise InvalidRequestError(f"{param}: {upload.size} bytes is more than the {MAX_UPLOAD_BYTES} an upload may "
                                  "have", param)
    return await upload.read()


async def multipart_form(request: Request):
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequestError("this endpoint takes multipart/form-data")
    return await request.form()


def form_model(model_cls, form, exclude=()):
    """A pydantic body from multipart text fields; list / object fields (lora, cache) arrive as
    JSON text."""
    fields = {}
    for key, value in form.multi_items():
        if key in exclude or not isinstance(value, str):
            continue
        if key in ("lora", "cache"):
            try:
                value = json.loads(value)
            except ValueError:
                raise InvalidRequestError(f"{key}: not JSON", key) from None
        fields[key] = value
    return validated(model_cls, fields)


def create_app(router, card: ModelCard, store: ImageStore | None = None, videos: VideoJobs | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_):
        if videos is not None:
            videos.resume()  # jobs a previous gateway process accepted
        yield

    app = FastAPI(title="ditserve", version="v1", lifespan=lifespan)
    store = store or ImageStore()

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        msg = str(err.get("msg", "invalid request")).removeprefix("Value error, ")
        return JSONResponse(error_body(f"invalid {param}: {msg}" if param else msg, "invalid_request_error",
                                       "invalid_request", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), type_, None), status_code=exc.status_code)

    @app.exception_handler(DitserveError)
    async def _ditserve(_, exc: DitserveError):
        return _error_response(exc)

    async def images_response(body: ImageGenerationBody, request: Request, endpoint: str, images=(), mask=None):
        t0 = time.perf_counter()
        status = "error"
        try:
            if body.model not in (None, "", card.id):
                raise ModelNotFoundError(f"model '{body.model}' is not served here (serving '{card.id}')")
            if card.video:
                raise InvalidRequestError(f"model '{card.id}' makes video: use POST /v1/videos", "model")
            req = body.to_generate_request(list(images), mask)
            result = await _until_disconnect(request, router.generate(req, timeout_s=body.timeout_s))
            data = []
            blobs = await encode_images([image.pixels for image in result.images], req.output_format)
            for image, blob in zip(result.images, blobs):
                item = {"seed": image.seed, "revised_prompt": None}
                if body.response_format == "url":
                    key = store.put(blob, MIME_TYPES[req.output_format])
                    item["url"] = str(request.url_for("image_content", image_id=key))
                else:
                    item["b64_json"] = base64.b64encode(blob).decode()
                data.append(item)
            status = "ok"
            r = result.request
            return {
                "created": int(time.time()),
                "data": data,
                "output_format": req.output_format,
                "size": f"{r.width}x{r.height}",
                "model": card.id,
                "timings": {**{k: m.seconds for k, m in result.stages.items()}, "total": result.total_seconds},
                "peak_memory_bytes": {k: m.peak_memory_bytes for k, m in result.stages.items()},
                "num_inference_steps": r.num_inference_steps,
                "batch_size": result.batch_size,
                "cache_stats": vars(result.cache_stats) if result.cache_stats is not None else None,
            }
        except Exception as exc:
            status = getattr(exc, "code", "internal_error")
            return _error_response(exc)
        finally:
            metrics.REQUESTS.labels(endpoint, card.id, status).inc()
            metrics.REQUEST_SECONDS.labels(endpoint, card.id, status).observe(time.perf_counter() - t0)

    @app.post("/v1/images/generations")
    async def generations(body: ImageGenerationBody, request: Request):
        return await images_response(body, request, "images.generations")

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        """multipart: `image` and/or repeated `image[]`, optional `mask`, and the generation
        fields (OpenAI's and ditserve's, as form values; `lora` / `cache` as JSON text)."""
        try:
            form = await multipart_form(request)
            images = [await read_upload(f, "image") for key in ("image", "image[]") for f in form.getlist(key)
                      if not isinstance(f, str)]
            if not images:
                raise InvalidRequestError("image: an edit needs at least one input image", "image")
            mask = form.get("mask")
            mask = await read_upload(mask, "mask") if mask is not None and not isinstance(mask, str) else None
            body = form_model(ImageGenerationBody, form, exclude=("image", "image[]", "mask"))
        except DitserveError as exc:
            metrics.REQUESTS.labels("images.edits", card.id, exc.code).inc()
            return _error_response(exc)
        return await images_response(body, request, "images.edits", images, mask)

    add_video_routes(app, card, videos)

    @app.post("/v1/set_lora")
    async def set_lora(body: SetLoraBody):
        return await router.lora_admin("set", **body.model_dump())

    @app.post("/v1/merge_lora_weights")
    async def merge_lora_weights():
        return await router.lora_admin("merge")

    @app.post("/v1/unmerge_lora_weights")
    async def unmerge_lora_weights():
        return await router.lora_admin("unmerge")

    @app.get("/v1/list_loras")
    async def list_loras():
        return await router.lora_admin("list")

    @app.get("/v1/images/{image_id}/content", name="image_content")
    async def image_content(image_id: str):
        item = store.get(image_id)
        if item is None:
            return JSONResponse(error_body(f"no image '{image_id}' (expired or never made)", "invalid_request_error",
                                           "image_not_found", "image_id"), status_code=404)
        data, mime = item
        return Response(content=data, media_type=mime)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": card.id, "object": "model", "created": card.created,
                                            "owned_by": "ditserve", "family": card.family}]}

    @app.get("/health")
    async def health():
        stages = await router.ready()
        ok = all(stages.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "stages": stages}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        try:
            router_text = await router.metrics_text()
        except DitserveError:  # the router is down: serve what this process has, /health says why
            router_text = ""
        return Response(metrics.exposition(router_text), media_type=CONTENT_TYPE_LATEST)

    return app


def add_video_routes(app: FastAPI, card: ModelCard, videos: VideoJobs | None) -> None:
    """OpenAI's videos API over the job store (services/gateway/videos.py)."""
    poll = {"openai-poll-after-ms": str(POLL_AFTER_MS)}

    def jobs() -> VideoJobs:
        if videos is None or not card.video:
            raise InvalidRequestError(f"model '{card.id}' makes images: use POST /v1/images/generations", "model")
        return videos

    @app.post("/v1/videos")
    async def create_video(request: Request):
        store = jobs()
        images = []
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            ref = form.get("input_reference")
            if ref is not None and not isinstance(ref, str):  # image-to-video
                images.append(await read_upload(ref, "input_reference"))
            body = form_model(VideoBody, form, exclude=("input_reference",))
        else:
            try:
                fields = await request.json()
            except ValueError:
                raise InvalidRequestError("the body is not JSON or multipart form data") from None
            body = validated(VideoBody, fields)
        return JSONResponse(await store.create(body, images), headers=poll)

    @app.get("/v1/videos")
    async def list_videos(after: str | None = None, limit: int = Query(20, ge=1, le=100),
                          order: Literal["asc", "desc"] = "desc"):
        return jobs().list(after, limit, order)

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str):
        return JSONResponse(jobs().get(video_id), headers=poll)

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str):
        return jobs().delete(video_id)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, variant: str = "video"):
        if variant != "video":
            raise InvalidRequestError(f"variant '{variant}': only 'video' (the MP4) is stored", "variant")
        return Response(content=jobs().content(video_id), media_type=MP4_MIME)
