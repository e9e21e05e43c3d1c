"""Receiving an upload: a multipart body streamed into a private temporary folder under a byte limit.

The body is parsed as it arrives (python-multipart's streaming parser) and only the part named ``file`` is kept,
written to ``upload<.ext>`` in a folder of its own (mode 0700) made for the request: the client's file name is
never a path here, only its extension (letters and digits, as a hint for decoders) and a label in the answer.
Past ``limit`` bytes the upload is refused (413) at once — from the Content-Length header before any byte is
read, else as soon as the count passes the limit — so a large upload is neither held in memory nor written out.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile

from python_multipart.multipart import (
    MultipartParseError,
    MultipartParser,
    parse_options_header,
)

from convnext_audio_jax.serve.engine import RequestError

FOLDER_PREFIX = "convnext-audio-serve-"
FIELD = "file"


def private_folder(root: str | None) -> str:
    """A new folder only this process can read (``tempfile.mkdtemp``: mode 0700, unique name) under ``root``."""
    return tempfile.mkdtemp(prefix=FOLDER_PREFIX, dir=root)


def remove_folder(folder: str) -> None:
    """Removes a request's folder (made by `private_folder`: everything in it was written for the request)."""
    if os.path.basename(folder).startswith(FOLDER_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def safe_label(name: str) -> str:
    """The client's file name as a label: its last path component, printable characters only, at most 200."""
    label = re.split(r"[\\/]", name)[-1]
    label = "".join(c for c in label if c.isprintable())[:200]
    return label or "upload"


class _Part:
    def __init__(self):
        self.headers: dict[bytes, bytes] = {}
        self.field, self.filename = b"", None


class UploadReceiver:
    """Feed it the body a chunk at a time; ``path`` and ``name`` are the file part's once ``finish`` returns."""

    def __init__(self, content_type: str, content_length: str | None, folder: str, limit: int):
        kind, options = parse_options_header(content_type or "")
        if kind != b"multipart/form-data" or not options.get(b"boundary"):
            raise RequestError(415, f"expected a multipart/form-data body with the audio in a field named "
                                    f"'{FIELD}', got Content-Type {content_type or 'none'!r}")
        self.limit, self.folder, self.received = limit, folder, 0
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            raise RequestError(413, f"the upload is {int(content_length):,} bytes; the server's limit is {limit:,} bytes")
        self.path: str | None = None
        self.name = "upload"
        self._file = None
        self._complete = False  # the file part ended (its closing boundary arrived)
        self._part: _Part | None = None
        self._header_field = b""
        self._header_value = b""
        callbacks = {
            "on_part_begin": self._part_begin, "on_part_data": self._part_data, "on_part_end": self._part_end,
            "on_header_field": self._header_field_data, "on_header_value": self._header_value_data,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
        }
        self._parser = MultipartParser(options[b"boundary"], callbacks)

    def _part_begin(self):
        self._part = _Part()

    def _header_field_data(self, data, start, end):
        self._header_field += data[start:end]

    def _header_value_data(self, data, start, end):
        self._header_value += data[start:end]

    def _header_end(self):
        self._part.headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self):
        _, options = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        self._part.field = options.get(b"name", b"")
        if self._part.field == FIELD.encode() and self._file is None:
            filename = options.get(b"filename")
            self.name = safe_label(filename.decode("utf-8", "replace")) if filename else "upload"
            extension = os.path.splitext(self.name)[1].lower()
            suffix = extension if re.fullmatch(r"\.[a-z0-9]{1,8}", extension) else ""
            self.path = os.path.join(self.folder, "upload" + suffix)
            self._file = open(self.path, "xb")

    def _part_data(self, data, start, end):
        if self._file is not None and self._part.field == FIELD.encode() and not self._file.closed:
            self._file.write(data[start:end])

    def _part_end(self):
        if self._file is not None and self._part.field == FIELD.encode() and not self._file.closed:
            self._file.close()
            self._complete = True

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.limit:
            self.close()
            raise RequestError(413, f"the upload passed the server's limit of {self.limit:,} bytes while arriving")
        try:
            self._parser.write(chunk)
        except MultipartParseError as error:
            self.close()
            raise RequestError(400, f"the multipart body is malformed: {error}") from None

    def finish(self) -> None:
        try:
            self._parser.finalize()
        except MultipartParseError as error:
            raise RequestError(400, f"the multipart body is malformed: {error}") from None
        finally:
            self.close()
        if self.path is None:
            raise RequestError(422, f"no file part named '{FIELD}' in the multipart body")
        if not self._complete:
            raise RequestError(400, "the multipart body ended inside the file part")

    def close(self) -> None:
        if self._file is not None and not self._file.closed:
            self._file.close()
