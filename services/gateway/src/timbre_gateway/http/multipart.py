"""A streaming multipart/form-data reader that refuses an oversized file while it arrives."""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException
from starlette.requests import Request

from .errors import ApiError

MAX_FIELD_BYTES = 64 * 1024
MAX_PARTS = 32


@dataclass
class FilePart:
    filename: str | None
    content_type: str | None
    data: bytes


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, FilePart] = field(default_factory=dict)


class _TooLarge(Exception):
    pass


async def read_form(request: Request, *, file_fields: set[str], max_file_bytes: int) -> Form:
    """Parse the body part by part; stop reading as soon as a file passes `max_file_bytes` or the whole body
    passes that plus the fields' allowance. Only parts named in `file_fields` may carry a file; a field sent twice
    is refused rather than letting the second one win."""
    content_type = request.headers.get("content-type", "")
    ctype, params = parse_options_header(content_type)
    if ctype == b"application/x-www-form-urlencoded":
        # A form without its file: read its fields, so the route can say which one is missing (400).
        return await _read_urlencoded(request)
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(422, "unsupported_media_type", "send the request as multipart/form-data")
    max_body_bytes = max_file_bytes + MAX_PARTS * MAX_FIELD_BYTES
    too_large = ApiError(422, "file_too_large", f"the upload exceeds {max_file_bytes // (1024 * 1024)} MB")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body_bytes:
        raise too_large
    form = Form()
    seen: set[str] = set()
    state: dict[str, object] = {"name": None, "filename": None, "ctype": None, "buf": bytearray(),
                                "header": b"", "headers": {}, "parts": 0}

    def on_part_begin() -> None:
        state.update(name=None, filename=None, ctype=None, buf=bytearray(), headers={})
        state["parts"] = int(state["parts"]) + 1  # type: ignore[arg-type]
        if int(state["parts"]) > MAX_PARTS:  # type: ignore[arg-type]
            raise ApiError(400, "too_many_parts", f"at most {MAX_PARTS} form parts")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] = bytes(state["header"]) + data[start:end]  # type: ignore[arg-type]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        headers = state["headers"]
        name = bytes(state["header"]).lower()  # type: ignore[arg-type]
        headers[name] = headers.get(name, b"") + data[start:end]  # type: ignore[union-attr,index]

    def on_header_end() -> None:
        state["header"] = b""

    def on_headers_finished() -> None:
        headers: dict[bytes, bytes] = state["headers"]  # type: ignore[assignment]
        _, disp = parse_options_header(headers.get(b"content-disposition", b""))
        name = disp.get(b"name")
        state["name"] = name.decode("utf-8", "replace") if name is not None else None
        filename = disp.get(b"filename")
        state["filename"] = filename.decode("utf-8", "replace") if filename is not None else None
        ctype = headers.get(b"content-type")
        state["ctype"] = ctype.decode("latin-1") if ctype else None
        # Refused before any of the part is buffered: a file only where the route expects one, each name once.
        field_name = state["name"]
        if state["filename"] is not None and field_name not in file_fields:
            raise ApiError(400, "unexpected_file", f"{field_name or 'an unnamed part'} may not be a file; "
                           f"files go in {', '.join(sorted(file_fields))}")
        if isinstance(field_name, str):
            if field_name in seen:
                raise ApiError(400, "duplicate_field", f"{field_name} was sent twice")
            seen.add(field_name)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if not isinstance(state["name"], str):
            return  # a part with no name is never read, so it is not kept
        buf: bytearray = state["buf"]  # type: ignore[assignment]
        buf.extend(data[start:end])
        limit = max_file_bytes if state["name"] in file_fields else MAX_FIELD_BYTES
        if len(buf) > limit:
            raise _TooLarge(state["name"])

    def on_part_end() -> None:
        name = state["name"]
        if not isinstance(name, str):
            return
        buf = bytes(state["buf"])  # type: ignore[arg-type]
        if name in file_fields:
            form.files[name] = FilePart(state["filename"], state["ctype"], buf)  # type: ignore[arg-type]
        else:
            try:
                form.fields[name] = buf.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ApiError(400, "invalid_field", f"field {name} is not UTF-8 text") from exc

    parser = MultipartParser(params[b"boundary"], callbacks={  # type: ignore[arg-type]
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished})
    received = 0
    try:
        async for chunk in request.stream():
            # Per-part limits alone would let many parts add up; the whole body has one budget.
            received += len(chunk)
            if received > max_body_bytes:
                raise too_large
            parser.write(chunk)
        parser.finalize()
    except _TooLarge as exc:
        field_name = exc.args[0]
        if field_name in file_fields:
            raise ApiError(422, "file_too_large",
                           f"{field_name} exceeds {max_file_bytes // (1024 * 1024)} MB") from None
        raise ApiError(422, "field_too_large", f"field {field_name} is too large") from None
    except (ApiError, HTTPException):  # ours, or the body cap's 413
        raise
    except Exception as exc:  # the multipart parser's own errors on a malformed body
        raise ApiError(400, "malformed_multipart", f"the multipart body could not be parsed: {exc}") from None
    return form


async def _read_urlencoded(request: Request) -> Form:
    """Fields of an application/x-www-form-urlencoded body (which carries no files), size-bounded."""
    limit = MAX_PARTS * MAX_FIELD_BYTES
    body = bytearray()
    async for chunk in request.stream():
        body.extend(chunk)
        if len(body) > limit:
            raise ApiError(422, "field_too_large", "the form is too large")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_PARTS, strict_parsing=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "malformed_form", f"the form body could not be parsed: {exc}") from None
    return Form(fields=dict(pairs))
