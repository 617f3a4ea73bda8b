"""Download one file over HTTP(S) into place, never leaving a file that looks complete but is not.

The bytes go to ``DEST.part`` as they arrive; only a download known to be complete is renamed to ``DEST`` (an
atomic ``os.replace``), and, where a digest is expected, only one with the right sha256. Complete means: the server
announced the length (``Content-Length``) and every byte arrived, or it sent the body chunked and the closing
chunk arrived (a chunked body cut short is detected by the HTTP client). A body delimited only by the server
closing the connection (no length, not chunked) cannot be told from one cut short: it is put in place only when
the expected sha256 matches or the caller's ``check`` reads the file successfully (the registry checks that it
loads as a checkpoint); else it stays ``.part`` and the download fails saying so.

An interrupted download leaves the ``.part`` file: the next call resumes it with an HTTP ``Range`` request when the
server honours ranges (206), and starts it over when it does not (200); a range that stops short of the file's
size (the total in ``Content-Range``) leaves a longer ``.part`` for the next call to resume. A file whose digest is
wrong is deleted, since resuming it would only extend the damage. Plain ``urllib``: the project talks to one URL at
a time and needs nothing more.
"""

from __future__ import annotations

import hashlib
import http.client
import os
from collections.abc import Callable
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

from tqdm.auto import tqdm

from cclm.errors import UserError

CHUNK = 1 << 20
USER_AGENT = "cclm-pretrained-download"


class DownloadError(UserError):
    """A download that failed or stopped early; the message names the URL and says whether it can resume."""


class ChecksumMismatch(UserError):
    """A file whose sha256 is not the expected one (corrupt, truncated on disk, or replaced by another file)."""


def sha256_of(path: str | os.PathLike, start: bytes = b"") -> str:
    digest = hashlib.sha256(start)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urlopen(Request(url, headers=headers), timeout=timeout)
    except HTTPError as err:
        if err.code == 416 and offset:  # the part is as long as the file, or longer: it cannot be resumed
            return None
        raise DownloadError(f"cannot download {url}: HTTP {err.code} {err.reason}") from None
    except (URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot download {url}: {reason!s} ({type(err).__name__})") from None


def _content_range(header: str | None) -> tuple[int, int, int | None] | None:
    """``bytes START-END/TOTAL`` as (START, END, TOTAL or None for ``*``); None when absent or unreadable."""
    try:
        unit, spec = (header or "").split(" ", 1)
        span, total = spec.strip().split("/", 1)
        start, end = (int(bound) for bound in span.split("-", 1))
        return (start, end, None if total.strip() == "*" else int(total)) if unit == "bytes" else None
    except ValueError:
        return None


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    check: Callable[[Path], None] | None = None,
) -> str:
    """Fetch ``url`` to ``dest`` (see the module) and return the file's sha256; ``sha256``: the digest it must
    have (checked before the rename). ``check``: called on the ``.part`` file when the server announced no length
    (and no digest is expected); it raises when the file is not whole (e.g. does not load), and the download then
    fails keeping the ``.part`` file."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    offset = part.stat().st_size if part.exists() else 0
    response = _open(url, offset, timeout)
    if response is None:
        part.unlink()
        offset, response = 0, _open(url, 0, timeout)
    span = _content_range(response.headers.get("Content-Range")) if response.status == 206 else None
    if response.status == 206 and not (offset > 0 and span is not None and span[0] == offset):
        # part of the file, but not the part asked for: start over with a plain request rather than splice
        # (or keep as the whole file) the wrong bytes
        response.close()
        if offset == 0:
            raise DownloadError(f"{url}: the server answered a request for the whole file with part of it")
        offset, response = 0, _open(url, 0, timeout)
        if response.status == 206:
            response.close()
            raise DownloadError(f"{url}: the server answered a request for the whole file with part of it")
    with response:
        resumed = response.status == 206
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        if resumed and span[2] is not None:
            total = span[2]  # a server may send less than the rest (a capped range): the file's size decides
        chunked = bool(getattr(response, "chunked", False))  # http.client detects a chunked body cut short
        digest = hashlib.sha256()
        if resumed:
            with open(part, "rb") as handle:
                for block in iter(lambda: handle.read(CHUNK), b""):
                    digest.update(block)
        written = offset
        read = getattr(response, "read1", response.read)  # what has arrived, without waiting for a full CHUNK
        with (
            open(part, "ab" if resumed else "wb") as out,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=dest.name,
                disable=not progress,
            ) as bar,
        ):

            def keep(block: bytes) -> None:
                nonlocal written
                out.write(block)
                digest.update(block)
                written += len(block)
                bar.update(len(block))

            try:
                for block in iter(lambda: read(CHUNK), b""):
                    keep(block)
            except (OSError, TimeoutError, http.client.HTTPException) as err:
                partial = getattr(err, "partial", b"")
                if isinstance(partial, bytes) and partial:  # what the client read before it noticed the cut
                    keep(partial)
                out.flush()
                raise DownloadError(
                    f"download of {url} stopped after {written} bytes ({type(err).__name__}: {err}); run again "
                    f"to resume it from {part}"
                ) from None
    if total is not None and written != total:
        raise DownloadError(
            f"download of {url} stopped after {written} of {total} bytes; run again to resume it from {part}"
        )
    got = digest.hexdigest()
    if sha256 is not None and got != sha256.lower():
        part.unlink()
        raise ChecksumMismatch(
            f"{url}: the downloaded file's sha256 is {got}, expected {sha256}; it was deleted (a corrupt "
            "transfer or a changed file on the server)"
        )
    if total is None and not chunked and sha256 is None:
        unknown = (
            f"the server announced no length for {url} (no Content-Length, not chunked), so the {written} bytes "
            "received may be a download cut short"
        )
        if check is None:
            raise DownloadError(
                f"{unknown}, and no sha256 is expected to prove them whole; they were kept in {part} (not put "
                f"in place): give the file's sha256, or download it by other means to {dest}"
            )
        try:
            check(part)
        except Exception as err:  # the caller's reader: whatever it raises, the file is not whole
            raise DownloadError(
                f"{unknown}, and they do not read as a whole file ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); they were kept in {part}, not put in place: "
                "run again to resume or restart the download"
            ) from None
    os.replace(part, dest)
    return got
