"""The service's OpenAPI contract: the answer models, the one error body, and the request bodies of the routes
that read their request themselves.

A route that takes images reads them itself (multipart `file` fields, a raw image body, or, for a head, JSON
embeddings: three media types for one route), so FastAPI cannot see its body; `request_body` declares it in the
route's `openapi_extra`. Routes pass `errors(...)` as `responses=` to declare each refusal they can give, with the
body featx sends: `{"detail": "<one line>"}`; `declare_errors(app)` makes FastAPI's own 422 (a query or path
parameter it refuses) say the same, as featx/serve/app.py answers it.

    @app.post("/v1/thing", response_model=Thing, responses=errors(404, 413, 415, 422, 503),
              openapi_extra=request_body(IMAGES, json_body(ThingQuery)))
    async def thing(request: Request): ...   # reads the images or the JSON itself

    @app.post("/v1/other", response_model=Other, responses=errors(413, 415, 422),
              dependencies=[Depends(json_content)])
    async def other(query: OtherQuery): ...  # FastAPI reads and declares the JSON body
"""
from __future__ import annotations

from http import HTTPStatus
from typing import Any, Literal

from fastapi import HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from ..choices import MAX_SEED
from ..heads.estimators import HEAD_TYPES, NORMALIZERS

PROMETHEUS_TEXT = "text/plain; version=0.0.4"
SHA256 = r"^[0-9a-f]{64}$"

ERROR_REASONS = {
    401: "Missing or wrong API key (send Authorization: Bearer KEY or X-API-Key: KEY)",
    403: "Not allowed by the server's options",
    404: "No such head or job",
    409: "Conflicts with a head or a fit in progress",
    413: "Request body over the server's --max-bytes",
    415: "Unsupported content type",
    422: "Invalid request: unreadable image, wrong shape, unknown option...",
    503: "The models are still loading, or failed to load",
}


class ErrorBody(BaseModel):
    """Every refusal: one line saying what was wrong and what was expected."""

    detail: str


def errors(*statuses: int) -> dict[int, dict]:
    """`responses=` of a route: each status with the error body and its usual reason."""
    return {status: {"model": ErrorBody, "description": ERROR_REASONS.get(status, HTTPStatus(status).phrase)}
            for status in statuses}


def declare_errors(app) -> None:
    """The app's OpenAPI document, with FastAPI's default 422 body (a list of errors) replaced by ErrorBody."""
    built = app.openapi

    def document() -> dict:
        if app.openapi_schema is None:
            schema = built()
            schemas = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for operation in (op for path in schema["paths"].values() for op in path.values()):
                answer = operation["responses"].get("422", {})
                if "HTTPValidationError" in str(answer):
                    operation["responses"]["422"] = {
                        "description": ERROR_REASONS[422],
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = document


def json_content(request: Request) -> None:
    """A dependency of a route taking a JSON model: any other content type is a 415 (FastAPI would try to read it
    as the model and answer a 422 that does not say why)."""
    kind = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise HTTPException(415, f"content type {kind!r}: expected application/json")


BINARY = {"type": "string", "format": "binary"}
IMAGE_FILES = ("multipart/form-data", {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "array", "minItems": 1, "items": BINARY,
                            "description": "one or more images (repeat the `file` field)"}},
})
IMAGE_BYTES = [("application/octet-stream", BINARY), ("image/*", BINARY)]
IMAGES = [IMAGE_FILES, *IMAGE_BYTES]


def json_body(model: type[BaseModel]) -> tuple[str, dict]:
    """The application/json part of a request body, the schema of `model` with its sub-models written in place."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return "application/json", inline(schema)


def request_body(*parts) -> dict:
    """`openapi_extra=` of a route reading its own body: a required body in each (media type, schema) of `parts`
    (tuples, or lists of them such as IMAGES)."""
    flat = [part for entry in parts for part in (entry if isinstance(entry, list) else [entry])]
    body: dict[str, Any] = {"required": True, "content": {media: {"schema": schema} for media, schema in flat}}
    if "multipart/form-data" in body["content"]:
        body["content"]["multipart/form-data"]["encoding"] = {"file": {"contentType": "image/*"}}
    return {"requestBody": body}


class Embeddings(BaseModel):
    """Rows of embeddings, each as wide as the head's features."""

    embeddings: list[list[float]] = Field(min_length=1, description="one row per item, each n_features wide")


class Answer(BaseModel):
    """An answer's model: a field the route sends and the model lacks is an error, never dropped unseen."""

    model_config = ConfigDict(extra="forbid")


class TopClass(Answer):
    model_config = ConfigDict(populate_by_name=True)
    class_: str = Field(alias="class")
    probability: float | None = Field(None, description="heads with probabilities")
    score: float | None = Field(None, description="decision score (heads without probabilities)")


class Prediction(Answer):
    sha256: str | None = Field(None, description="the image's content key (images only)")
    cached: bool | None = Field(None, description="whether its embedding came from the cache (images only)")
    predicted: str | float | int
    probabilities: dict[str, float] | None = None
    scores: dict[str, float] | None = None
    top_k: list[TopClass] | None = None


class Predictions(Answer):
    head: str
    results: list[Prediction]


class RunLengths(Answer):
    size: list[int] = Field(description="[height, width]")
    values: list[int]
    counts: list[int]


class Mask(Answer):
    sha256: str
    cached: bool
    size: list[int] = Field(description="[height, width]")
    pixels: dict[str, int] = Field(description="pixels per class present")
    mask: RunLengths | list[list[int]] = Field(description="runs (mask=rle) or rows of class ids (mask=array)")


class Masks(Answer):
    head: str
    task: Literal["segmentation"]
    classes: list[str]
    results: list[Mask]


class Embedding(Answer):
    sha256: str = Field(pattern=SHA256)
    cached: bool
    embedding: list[float] | list[list[float]] | list[list[list[float]]] = Field(
        description="the stored row: a vector, or a feature map for a spatial tap")


class EmbedAnswer(Answer):
    backbone: str
    tap: str
    results: list[Embedding]


class HeadInfo(Answer):
    name: str
    kind: str
    task: str
    tap: str | None
    classes: list[str] | None
    n_features: int | None
    backbone: str | None
    weights: str | None
    weights_sha256: str | None
    path: str
    metrics: dict[str, Any] = Field(description="headline numbers of the head's metrics.json")


class HeadList(Answer):
    heads: list[HeadInfo]


class HeadNames(Answer):
    heads: list[str]


class Health(Answer):
    status: Literal["ready", "loading", "failed"]
    heads: list[str] | None = None
    extractors: int | None = None
    detail: str | None = Field(None, description="why it failed to load")


LABEL = Field(description="its class (a string, number or boolean, as text in the head's classes)")


class KeyedExample(BaseModel):
    """A labelled image by its sha256: embedded before (POST /v1/embed), or a row of the cache store."""

    model_config = ConfigDict(extra="forbid", strict=True)
    sha256: str = Field(pattern=SHA256)
    label: str | int | float | bool = LABEL


class ImageExample(BaseModel):
    """A labelled image sent whole, base64."""

    model_config = ConfigDict(extra="forbid", strict=True)
    image_base64: str = Field(min_length=4, json_schema_extra={"contentEncoding": "base64",
                                                               "contentMediaType": "image/*"})
    label: str | int | float | bool = LABEL


class FitOptions(BaseModel):
    """The options of `featx fit-head` a fit through the service may set (the others are the service's)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    normalize: Literal[NORMALIZERS] = None
    grid: str | float | list[float] = Field(None, description="'LO:HI', '0.1,1,10', or the C values")
    folds: int = Field(None, ge=2)
    class_weight: Literal["balanced"] | None = None
    val_split: float = Field(None, ge=0, lt=1)
    seed: int = Field(None, ge=0, le=MAX_SEED)
    epochs: int = Field(None, ge=1)
    hidden: int = Field(None, ge=1)
    dropout: float = Field(None, ge=0, lt=1)


class TrainRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="the new head's name")
    head: Literal[tuple(HEAD_TYPES)] = Field(None, description="head type (featx fit-head --head), logistic by default")
    like: StrictStr = Field(None, description="a served head whose extractor (and tap) to use")
    tap: StrictStr = Field(None, description="the tap to fit on: by default the head's own, or the extractor's last")
    options: FitOptions = Field(None, description="fit-head options")
    examples: list[KeyedExample | ImageExample] = Field(min_length=1)


class Job(Answer):
    id: str
    name: str
    head: str
    state: Literal["queued", "running", "succeeded", "failed"]
    submitted: float
    started: float | None
    finished: float | None
    error: str | None
    metrics: dict[str, Any] | None
