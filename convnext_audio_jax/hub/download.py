"""HTTP(S) download into a file: resumable with Range requests, verified by size/md5/sha256.

Used by ``pretrained`` (which owns the cache, the lock and the atomic rename); tested through it in
tests/test_pretrained.py against a local HTTP server.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import tqdm

from convnext_audio_jax.runtime.errors import UserError

TIMEOUT_S = 60.0  # per socket operation, not per file
ATTEMPTS = 3  # a broken connection is resumed with an HTTP Range request this many times in all
CHUNK = 1 << 20
PROBE_TIMEOUT_S = 5.0  # a host that answers nothing within this is taken as unreachable
PROXY_ENVS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class DownloadError(UserError):
    """A download that failed; the message is one line and says what was kept."""


def file_digests(path: pathlib.Path) -> dict[str, str]:
    md5, sha256 = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            md5.update(chunk)
            sha256.update(chunk)
    return {"md5": md5.hexdigest(), "sha256": sha256.hexdigest()}


def mismatch(path: pathlib.Path, size: int | None = None, md5: str | None = None, sha256: str | None = None) -> str | None:
    """What in ``path`` differs from the published size/checksums (None: all that is given matches)."""
    if size is not None and path.stat().st_size != size:
        return f"{path.stat().st_size} bytes, {size} published"
    if md5 is None and sha256 is None:
        return None
    digests = file_digests(path)
    for algorithm, want in (("md5", md5), ("sha256", sha256)):
        if want is not None and digests[algorithm] != want.lower():
            return f"{algorithm} {digests[algorithm]}, {want} published"
    return None


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the host of ``url`` cannot be reached now (its name does not resolve, no TCP connection opens within
    ``timeout``), or None when a connection opens. None too where a proxy is set: clients go through it, so a
    direct connection proves nothing. One attempt, no retries: it is how a download client that retries for tens
    of seconds is spared where there is no network."""
    if any(os.environ.get(name) for name in PROXY_ENVS):
        return None
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return None
    except OSError as error:
        return str(error) or type(error).__name__


def stream(url: str, part: pathlib.Path, label: str) -> None:
    """Appends the rest of ``url`` to ``part`` (HTTP Range from its current size) with a progress bar,
    retrying a broken connection; ``part`` keeps what arrived when every attempt fails."""
    failure = None
    for attempt in range(ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "convnext-audio-jax", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as response:
                if have and response.status != 206:  # the server ignored the range: start again
                    have = 0
                length = response.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, "ab" if have else "wb") as out, tqdm.tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                    file=sys.stderr, disable=None,
                ) as bar:
                    while chunk := response.read(CHUNK):
                        out.write(chunk)
                        bar.update(len(chunk))
                if total is not None and part.stat().st_size < total:
                    raise ConnectionError(f"connection closed at {part.stat().st_size} of {total} bytes")
                return
        except urllib.error.HTTPError as error:
            if error.code == 416 and have:  # nothing left to send: the checksum decides
                return
            raise DownloadError(f"downloading {url}: HTTP {error.code} {error.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as error:
            failure = error
            if isinstance(getattr(error, "reason", error), socket.gaierror):
                break  # the host's name does not resolve (no network, a wrong host): trying again changes nothing
            if attempt + 1 < ATTEMPTS:
                print(f"{label}: download failed ({error}); trying again from byte {part.stat().st_size if part.exists() else 0}",
                      file=sys.stderr)
                time.sleep(0.2 * (attempt + 1))
    kept = part.stat().st_size if part.exists() else 0
    # Only a partial file that exists is worth naming: without a network there is none.
    resume = f"{kept} bytes kept in {part}, the next attempt resumes from there" if kept else "nothing was received"
    times = f"{attempt + 1} times" if attempt else "once"
    raise DownloadError(f"downloading {url} failed {times} ({failure}); {resume}")
