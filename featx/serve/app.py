"""The HTTP routes (FastAPI; OpenAPI at /openapi.json, Swagger UI at /docs and ReDoc at /redoc from files installed
with fastapi-offline, so they render with no network). Every refusal is JSON {"detail": "one line"} with a 4xx
status; an unexpected fault is a 500 whose body holds no traceback. What each route takes and answers is declared
with featx/serve/contract.py."""
from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import time
from contextlib import asynccontextmanager
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .. import __version__
from ..errors import FeatxError
from ..heads.prediction import Predictions, apply_head
from . import contract, masks
from .contract import IMAGES, errors, json_body, request_body
from .errors import ServiceError
from .search import add_search_route
from .service import Service, Upload
from .training import metrics_summary

log = logging.getLogger("featx.serve")
IMAGE_TYPES = ("image/", "application/octet-stream")


def create_app(service: Service, on_failure=None) -> FastAPI:
    """The app for `service`. Its lifespan loads the extractors in the background (/healthz is 503 meanwhile;
    `on_failure(message)` is called if that fails) and, at shutdown, drains the batchers and seals the cache."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def start():
            await run_in_threadpool(service.start)
            if service.failure and on_failure is not None:
                on_failure(service.failure)

        task = asyncio.get_running_loop().create_task(start())
        try:
            yield
        finally:
            await task
            await run_in_threadpool(service.close)

    app = FastAPIOffline(title="featx serve", version=__version__, lifespan=lifespan,
                         description="Fitted featx heads and the embedding cache behind one HTTP endpoint.",
                         generate_unique_id_function=lambda route: route.name)
    app.add_middleware(BodyLimit, max_bytes=service.options.max_bytes)
    app.add_middleware(RequestMetrics, metrics=service.metrics)
    _error_handlers(app)
    keyed = service.options.api_key is not None
    auth = _auth(service.options.api_key)

    def refusals(*statuses: int) -> dict:
        """The errors a route can answer, with 401 where a key is required."""
        return errors(*((401,) if keyed else ()), *statuses)

    @app.get("/healthz", summary="200 once every extractor is loaded, 503 before", response_model=contract.Health,
             response_model_exclude_none=True, responses={503: {"model": contract.Health, "description": "loading"}})
    async def healthz():
        if service.failure:
            return JSONResponse({"status": "failed", "detail": service.failure}, status_code=503)
        if not service.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready", "heads": service.registry.names(), "extractors": len(service.engine.extractors)}

    @app.get("/metrics", dependencies=auth, summary="Prometheus metrics", response_class=Response,
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {contract.PROMETHEUS_TEXT: {"schema": {"type": "string"}}}},
                        **refusals()})
    async def metrics():
        return Response(service.metrics.render(), media_type=contract.PROMETHEUS_TEXT)

    @app.get("/v1/heads", dependencies=auth, summary="The served heads", response_model=contract.HeadList,
             responses={200: {"links": {
                 "predict": {"operationId": "predict", "parameters": {"name": "$response.body#/heads/0/name"}},
                 "embed": {"operationId": "embed", "parameters": {"head": "$response.body#/heads/0/name"}}}},
                 **refusals()})
    async def heads():
        return {"heads": [_describe(s) for s in service.registry.all()]}

    @app.post("/v1/heads/{name}/predict", dependencies=auth, summary="Predict images or embeddings",
              response_model=contract.Predictions | contract.Masks, response_model_exclude_none=True,
              responses={200: {"content": {"image/png": {"schema": contract.BINARY}},
                               "description": "predictions, or a segmentation head's masks (JSON, or one PNG)"},
                         **refusals(404, 413, 415, 422, 503)},
              openapi_extra=request_body(IMAGES, json_body(contract.Embeddings)))
    async def predict(name: str, request: Request, top_k: int | None = Query(None, ge=1),
                      mask: Literal[masks.FORMATS] | None = Query(
                          None, description="segmentation heads: rle (default), array or png")):
        """Images as multipart `file` fields or a raw image body, or JSON {"embeddings": [[...], ...]}.
        A segmentation head answers each image's mask (?mask=, or Accept: image/png; see featx/serve/masks.py)."""
        _ready(service)
        served = service.head(name)
        head = served.head
        if getattr(head, "segment", None) is not None:
            return await _segment(service, served, request, top_k, mask)
        if mask is not None:
            raise ServiceError(422, f"mask={mask}: {name!r} is not a segmentation head; it answers classes")
        if _content_type(request) == "application/json":
            X, keys, cached = _embeddings_json(await _json(request), head.n_features_in_), None, None
        else:
            uploads = await _uploads(request)
            embedded = await service.embed(await service.extractor_for(served), uploads)
            X = np.stack([np.asarray(e.rows[head.tap], dtype=np.float32) for e in embedded])
            keys, cached = [e.key for e in embedded], [e.cached for e in embedded]
        predicted, scores = apply_head(head, X)
        classes = None if head.classes_ is None else [str(c) for c in head.classes_]
        names = np.array(keys if keys else [str(i) for i in range(len(X))], dtype=object)
        preds = Predictions(names, predicted, classes, scores, head.has_proba)
        tops = preds.records(top_k) if top_k and scores is not None else None
        results = []
        for i, record in enumerate(preds.records()):
            record.pop("path")
            if keys:
                record = {"sha256": keys[i], "cached": cached[i], **record}
            if tops:
                record["top_k"] = tops[i]["top_k"]
            results.append(record)
        return {"head": served.name, "results": results}

    @app.post("/v1/embed", dependencies=auth, summary="Stored-row embeddings of images",
              response_model=contract.EmbedAnswer, responses=refusals(404, 413, 415, 422, 503),
              openapi_extra=request_body(IMAGES))
    async def embed(request: Request, tap: str | None = None, head: str | None = None):
        """The rows `featx extract` stores for these images with the head's extractor (?head= picks it when the
        heads use several; ?tap= one of its taps, by default the head's own or the extractor's last)."""
        _ready(service)
        served = service.head(head) if head else None
        extractor = await service.extractor_for(served) if served else service.only_extractor("/v1/embed")
        tap = tap or (served.head.tap if served else extractor.taps[-1])
        if tap not in extractor.taps:
            raise ServiceError(422, f"tap {tap!r}: this extractor computes {', '.join(extractor.taps)}")
        embedded = await service.embed(extractor, await _uploads(request))
        return {"backbone": extractor.config["backbone"], "tap": tap, "results": [
            {"sha256": e.key, "cached": e.cached, "embedding": np.asarray(e.rows[tap]).tolist()} for e in embedded]}

    add_search_route(app, service, auth, refusals, _uploads, _json, _content_type)

    @app.post("/v1/admin/reload", dependencies=auth, summary="Read every head folder again",
              response_model=contract.HeadNames, responses=refusals(422))
    async def reload():
        try:
            names = await run_in_threadpool(service.registry.reload)
        except FeatxError as err:
            raise ServiceError(422, f"reload refused, the loaded heads keep serving: {err}") from None
        return {"heads": names}

    def training_on() -> None:
        _ready(service)
        if service.trainer is None:
            raise ServiceError(403, "training through the service is off: start featx serve with --allow-training")

    @app.post("/v1/heads", dependencies=[*auth, Depends(training_on), Depends(contract.json_content)],
              status_code=202, summary="Fit a head on cached rows (background)", response_model=contract.Job,
              responses={202: {"links": {"job": {"operationId": "job",
                                                 "parameters": {"job_id": "$response.body#/id"}}}},
                         **refusals(403, 404, 409, 413, 415, 422, 503)})
    async def train(spec: contract.TrainRequest):
        """A head named `name` fitted on the labelled `examples` (an embedded image's sha256, or the image in
        base64), with the extractor and tap of the head `like` -> the job (GET /v1/jobs/{id})."""
        options = spec.options.model_dump(exclude_unset=True) if spec.options else {}
        service.trainer.check_request(spec.name, spec.head, options)
        like = service.head(spec.like) if spec.like else None
        extractor = await service.extractor_for(like) if like else service.only_extractor("POST /v1/heads")
        tap = spec.tap or (like.head.tap if like else extractor.taps[-1])
        if tap not in extractor.taps:
            raise ServiceError(422, f"tap {tap!r}: this extractor computes {', '.join(extractor.taps)}")
        keys, labels, rows = await _examples(service, extractor, spec.examples, tap)
        job = service.trainer.start(spec.name, spec.head, options, extractor.config, extractor.key, tap, keys, labels,
                                    rows)
        return job.to_dict()

    @app.get("/v1/jobs/{job_id}", dependencies=auth, summary="A fit's state and metrics", response_model=contract.Job,
             responses=refusals(404))
    async def job(job_id: str):
        found = service.trainer.jobs.get(job_id) if service.trainer else None
        if found is None:
            raise ServiceError(404, f"no job {job_id!r}")
        return found.to_dict()

    contract.declare_errors(app)
    return app


async def _segment(service: Service, served, request: Request, top_k: int | None, mask: str | None):
    """The masks of the request's images (a segmentation head takes images only: its masks take their sizes)."""
    if top_k is not None:
        raise ServiceError(422, f"top_k: {served.name!r} is a segmentation head; it answers masks, not classes")
    if _content_type(request) == "application/json":
        raise ServiceError(422, f"{served.name!r} is a segmentation head: send images (the masks take each "
                                "image's size), not embeddings")
    uploads = await _uploads(request)
    fmt = masks.mask_format(mask, request.headers.get("accept", ""), len(uploads))
    embedded = await service.embed(await service.extractor_for(served), uploads)
    return await masks.answer(served, embedded, uploads, fmt)


def _describe(served) -> dict:
    head, config = served.head, served.head.config or {}
    segment = getattr(head, "segment", None)
    return {
        "name": served.name, "kind": head.kind, "task": head.task, "tap": head.tap,
        "classes": [str(c) for c in segment["classes"]] if segment else
        None if head.classes_ is None else [str(c) for c in head.classes_],
        "n_features": head.n_features_in_, "backbone": config.get("backbone"), "weights": config.get("weights"),
        "weights_sha256": config.get("weights_sha256"), "path": str(served.source),
        "metrics": metrics_summary(head.metrics),
    }


def _ready(service: Service) -> None:
    if not service.ready:
        raise ServiceError(503, service.failure or "the models are still loading: retry when /healthz answers 200")


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError as err:
        raise ServiceError(422, f"request body: not valid JSON ({err})") from None
    if not isinstance(body, dict):
        raise ServiceError(422, "request body: expected a JSON object")
    return body


async def _uploads(request: Request) -> list[Upload]:
    """The images of a request: multipart `file` fields, or the raw body with an image content type."""
    kind = _content_type(request)
    if kind == "multipart/form-data":
        try:
            form = await request.form()
        except StarletteHTTPException as err:  # Starlette's 400 for a body its multipart parser cannot read
            raise ServiceError(422, f"multipart body: {err.detail}") from None
        files = [f for f in form.getlist("file") if hasattr(f, "read")]
        if not files:
            raise ServiceError(422, "multipart body: no `file` field with an image")
        return [Upload(f"file {i} ({f.filename})", await f.read()) for i, f in enumerate(files)]
    if kind.startswith(IMAGE_TYPES):
        body = await request.body()
        if not body:
            raise ServiceError(422, "request body: empty, expected an image")
        return [Upload("request body", body)]
    raise ServiceError(415, f"content type {kind or 'none'!r}: expected multipart/form-data with `file` fields, "
                            "an image/* body, or application/json embeddings")


def _embeddings_json(body: dict, width: int) -> np.ndarray:
    """JSON {"embeddings": [[...], ...]} as float32 rows of the head's width."""
    try:
        X = np.asarray(body["embeddings"], dtype=np.float32)
    except KeyError:
        raise ServiceError(422, 'JSON body: expected {"embeddings": [[...], ...]}') from None
    except (TypeError, ValueError):
        raise ServiceError(422, "embeddings: expected a list of equal-length lists of numbers") from None
    if X.ndim != 2 or X.shape[1] != width or len(X) == 0:
        raise ServiceError(422, f"embeddings of shape {X.shape}: the head expects (rows, {width})")
    if not np.isfinite(X).all():
        raise ServiceError(422, "embeddings: NaN or infinite values")
    return X


async def _examples(service: Service, extractor, examples: list, tap: str):
    """(keys, labels, rows of `tap`) of the labelled examples: sha256 keys in the cache, or base64 images."""
    keys, labels, rows, uploads = [], [], [], {}
    for i, example in enumerate(examples):
        if isinstance(example, contract.ImageExample):
            try:
                uploads[i] = Upload(f"examples[{i}]", base64.b64decode(example.image_base64, validate=True))
            except (binascii.Error, ValueError):
                raise ServiceError(422, f"examples[{i}].image_base64: not valid base64") from None
        keys.append(getattr(example, "sha256", None))
        labels.append(str(example.label))
    embedded = dict(zip(uploads, await service.embed(extractor, list(uploads.values())))) if uploads else {}
    for i, key in enumerate(keys):
        if i in embedded:
            keys[i], found = embedded[i].key, embedded[i].rows
        else:
            found = service.cache.get(extractor.key, key) if isinstance(key, str) else None
            if found is None:
                raise ServiceError(422, f"examples[{i}].sha256 {str(key)[:16]}...: not in the cache or store; "
                                        "upload the image (image_base64) or embed it first")
        rows.append(np.asarray(found[tap], dtype=np.float32))
    return keys, labels, np.stack(rows)


def _auth(api_key: str | None) -> list:
    """The dependencies of a guarded route: none without a key (and no security in the OpenAPI document); with
    one, `Authorization: Bearer <key>` or `X-API-Key: <key>` (either one right lets the request in), both
    declared as security schemes."""
    if api_key is None:
        return []
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                    key: str | None = Depends(header)):
        given = [credentials.credentials if credentials is not None else "", key or ""]
        if not any(secrets.compare_digest(g.encode(), api_key.encode()) for g in given):
            raise HTTPException(401, "missing or wrong API key: send Authorization: Bearer <key> or X-API-Key: <key>",
                                headers={"WWW-Authenticate": "Bearer"})

    return [Depends(check)]


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(FeatxError)
    async def featx_error(request: Request, err: FeatxError):
        return JSONResponse({"detail": str(err)}, status_code=getattr(err, "status", 422))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        parts = [_invalid(e) for e in err.errors()]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 400 and err.__cause__ is not None:  # FastAPI could not read a JSON body
            return JSONResponse({"detail": f"request body: not valid JSON ({err.__cause__})"}, status_code=422)
        if err.status_code == 405:  # every method of the path, not only those of its first route
            allowed = sorted({m for r in app.routes if r.matches(request.scope)[0] != Match.NONE
                              for m in getattr(r, "methods", ())})
            return JSONResponse({"detail": f"method {request.method}: expected {', '.join(allowed)}"},
                                status_code=405, headers={"Allow": ", ".join(allowed)})
        return await http_exception_handler(request, err)

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):
        log.error("internal error on %s: %s", request.url.path, err, exc_info=err)
        return JSONResponse({"detail": f"internal error ({type(err).__name__}); see the server log"}, status_code=500)


def _invalid(error: dict) -> str:
    """One of FastAPI's validation errors as `where: what` (the field's dotted path, or `request body`)."""
    if error["type"] == "json_invalid":
        return f"request body: not valid JSON ({error.get('ctx', {}).get('error', error['msg'])})"
    loc = error["loc"]
    where = ".".join(str(p) for p in loc[1:]) or ("request body" if loc[0] == "body" else str(loc[0]))
    return f"{where}: {error['msg']}"


class RequestMetrics:
    """ASGI middleware: counts every response by route and status, and times it."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            self.metrics.observe_request(getattr(route, "path", "unmatched"), status, time.perf_counter() - started)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is a 413, by its Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"request body over the limit of {self.max_bytes} bytes (--max-bytes)")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": self._too_large().detail}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def receiving():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._too_large()
            return message

        await self.app(scope, receiving, send)
