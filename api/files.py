"""/v1/files: upload (multipart, written to disk as it arrives), list, retrieve, content, delete.

A batch input file (``purpose=batch``) is checked line by line once it is on disk; a bad line is a 400 that names
it, and the file is not kept. Files belong to their uploader: anyone else gets 404.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from litestar import Controller, Request, Response, delete, get, post
from litestar.response import File
from multipart import MultipartError, MultipartSegment, PushMultipartParser, parse_options_header

from api.errors import GUARDED, error_responses
from api.guards import DEPENDENCIES, authenticate, principal_of
from core.errors import APIError
from serving.batches.files import FileObject, FileStore
from serving.batches.lines import check_input_file
from serving.request import Services

MAX_FIELD_BYTES = 4096  # the form's small fields (purpose)


def file_store(services: Services) -> FileStore:
    if services.files is None:  # pragma: no cover - the app always makes one
        raise APIError(503, "Files are not enabled on this gateway.", code="files_disabled")
    return services.files


def list_page(items: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": items, "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None, "has_more": more}  # fmt: skip


_ONE_FILE = error_responses(*GUARDED, 404)


class FilesController(Controller):
    guards = [authenticate]
    dependencies = DEPENDENCIES

    # No framework cap on the body: the upload goes to disk as it arrives, and FIRST_MAX_FILE_BYTES (or the owner's
    # quota) ends it with 413 as soon as it is passed.
    @post(
        "/v1/files",
        status_code=200,
        summary="Upload a file",
        request_max_body_size=None,
        responses=error_responses(*GUARDED, 400, 413, 503),
    )
    async def upload(self, request: Request, services: Services) -> dict[str, Any]:
        """multipart/form-data with `file` and `purpose` (`batch` for a batch input file, which is checked line by
        line: a bad line is a 400 that names it). Larger than the gateway's limit, or past your quota: 413."""
        store, who = file_store(services), principal_of(request)
        ctype, options = parse_options_header(request.headers.get("content-type", ""))
        if ctype != "multipart/form-data" or not options.get("boundary"):
            raise APIError(400, "Upload the file as multipart/form-data with the fields 'file' and 'purpose' "
                           "(client.files.create(file=..., purpose='batch')).", param="file")  # fmt: skip
        fields: dict[str, bytes] = {}
        upload = None
        field_name: str | None = None
        try:
            with PushMultipartParser(options["boundary"], max_segment_count=16) as parser:
                async for chunk in request.stream():
                    for event in parser.parse(chunk):
                        if isinstance(event, MultipartSegment):
                            field_name = event.name
                            if event.name == "file":
                                if upload is not None:
                                    raise APIError(400, "Send one file per upload.", param="file")
                                purpose = fields.get("purpose", b"batch").decode(errors="replace")
                                upload = store.upload(who.user, event.filename or "upload.jsonl", purpose)
                        elif event is None:
                            field_name = None
                        elif field_name == "file" and upload is not None:
                            upload.write(event)
                        elif field_name is not None:
                            fields[field_name] = fields.get(field_name, b"") + event
                            if len(fields[field_name]) > MAX_FIELD_BYTES:
                                raise APIError(400, f"The form field '{field_name}' is too long.", param=field_name)
        except MultipartError as exc:
            if upload is not None:
                upload.discard()
            raise APIError(400, f"The multipart body could not be read ({exc}).", param="file") from None
        except BaseException:
            if upload is not None:
                upload.discard()
            raise
        if upload is None:
            raise APIError(400, "The form has no 'file' field.", param="file")
        purpose = fields.get("purpose", b"").decode(errors="replace")
        if purpose != upload.purpose:  # 'purpose' came after the file: check it now
            upload.discard()
            if not purpose:
                raise APIError(400, "The form has no 'purpose' field (use 'batch').", param="purpose")
            raise APIError(400, "Send the 'purpose' field before the 'file' field.", param="purpose")
        upload.close()
        lines = endpoint = None
        if purpose == "batch":
            try:
                lines, endpoint = await anyio.to_thread.run_sync(
                    check_input_file, upload.tmp, who, services.registry, services.settings.max_batch_lines
                )
            except BaseException:
                upload.discard()
                raise
        meta = upload.commit(lines=lines, endpoint=endpoint)
        return meta.public()

    @get("/v1/files", summary="List your files", responses=error_responses(*GUARDED, 400))
    async def list_files(
        self, request: Request, services: Services, purpose: str | None = None, after: str | None = None,
        limit: int = 10000, order: str = "desc",
    ) -> dict[str, Any]:  # fmt: skip
        """Your files, newest first (`order=asc`: oldest first), `limit` per page after the file `after`."""
        if not 1 <= limit <= 10000 or order not in ("asc", "desc"):
            raise APIError(400, "limit must be 1 to 10000 and order 'asc' or 'desc'.", param="limit")
        files, more = file_store(services).list(principal_of(request).user, purpose, after, limit, order)
        return list_page([f.public() for f in files], more)

    @get("/v1/files/{file_id:str}", summary="Retrieve a file's details", responses=_ONE_FILE)
    async def retrieve(self, request: Request, services: Services, file_id: str) -> dict[str, Any]:
        return file_store(services).get(file_id, principal_of(request).user).public()

    @get(
        "/v1/files/{file_id:str}/content",
        summary="Download a file's content",
        media_type="application/jsonl",
        responses=_ONE_FILE,
    )
    async def content(self, request: Request, services: Services, file_id: str) -> File:
        """The file's bytes (a batch's output or error file: one JSON answer per line)."""
        store = file_store(services)
        meta: FileObject = store.get(file_id, principal_of(request).user)
        return File(path=store.data_path(meta.id), filename=meta.filename, media_type="application/jsonl",
                    content_disposition_type="attachment")  # fmt: skip

    @delete("/v1/files/{file_id:str}", status_code=200, summary="Delete a file", responses=_ONE_FILE)
    async def delete_file(self, request: Request, services: Services, file_id: str) -> Response[dict[str, Any]]:
        meta = file_store(services).delete(file_id, principal_of(request).user)
        return Response({"id": meta.id, "object": "file", "deleted": True})
