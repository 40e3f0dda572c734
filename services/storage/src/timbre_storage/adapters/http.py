"""HTTP app of the fs backend: serves presigned /blobs URLs and a health check."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from timbre_common.metrics import HttpMetricsMiddleware
from timbre_storage.adapters.blob import FsBlobStore, SignatureInvalid, UrlExpired
from timbre_storage.domain import InvalidId, ObjectMissing

# Whatever a client uploaded is never run as a page on this origin: no scripts, no sniffing.
_SAFE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "default-src 'none'; sandbox"}


def _is_audio(content_type: str | None) -> bool:
    return bool(content_type) and content_type.lower().startswith("audio/")  # type: ignore[union-attr]


def _served_type(content_type: str | None) -> str:
    """Audio plays inline; anything else is bytes to download, whatever type its uploader claimed."""
    return content_type if _is_audio(content_type) else "application/octet-stream"  # type: ignore[return-value]


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def build_http_app(store: FsBlobStore, *, title: str = "timbre-storage") -> FastAPI:
    """FastAPI app: GET /blobs/{key}?expires=&signature= and GET /healthz."""
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HttpMetricsMiddleware)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/blobs/{key:path}")
    async def get_blob(key: str, request: Request) -> Response:
        expires = request.query_params.get("expires")
        signature = request.query_params.get("signature")
        try:
            store.verify(key, expires, signature)
        except SignatureInvalid:
            return _error(403, "signature_invalid", "The URL signature is invalid.")
        except UrlExpired:
            return _error(403, "url_expired", "The URL has expired; request a new one.")
        try:
            data = await store.get(key)
            content_type = await store.content_type(key)
        except (ObjectMissing, InvalidId):
            return _error(404, "object_not_found", "The object does not exist.")
        max_age = max(0, int(expires or 0) - int(store.now()))
        return Response(content=data, media_type=_served_type(content_type),
                        headers={"Cache-Control": f"private, max-age={max_age}", **_SAFE_HEADERS,
                                 "Content-Disposition": "inline" if _is_audio(content_type) else "attachment"})

    return app
