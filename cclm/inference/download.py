"""Download one file over HTTP(S) into place, never leaving a file that looks complete but is not.

The bytes go to ``DEST.part``; only a download that got every byte the server announced (and, where a digest is
expected, the right sha256) is renamed to ``DEST`` (an atomic ``os.replace``). An interrupted download leaves the
``.part`` file: the next call resumes it with an HTTP ``Range`` request when the server honours ranges (206), and
starts it over when it does not (200). A file whose digest is wrong is deleted, since resuming it would only
extend the damage. Plain ``urllib``: the project talks to one URL at a time and needs nothing more.
"""

from __future__ import annotations

import hashlib
import os
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
    except (URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise DownloadError(f"cannot download {url}: {reason}") from None


def download(
    url: str,
    dest: str | os.PathLike,
    sha256: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> str:
    """Fetch ``url`` to ``dest`` (see the module) and return the file's sha256; ``sha256``: the digest it must
    have (checked before the rename)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    offset = part.stat().st_size if part.exists() else 0
    response = _open(url, offset, timeout)
    if response is None:
        part.unlink()
        offset, response = 0, _open(url, 0, timeout)
    with response:
        resumed = offset > 0 and response.status == 206
        if resumed and not (response.headers.get("Content-Range") or "").startswith(f"bytes {offset}-"):
            resumed = False  # a range we did not ask for: start over rather than splice the wrong bytes
        if not resumed:
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        digest = hashlib.sha256()
        if resumed:
            with open(part, "rb") as handle:
                for block in iter(lambda: handle.read(CHUNK), b""):
                    digest.update(block)
        written = offset
        try:
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
                for block in iter(lambda: response.read(CHUNK), b""):
                    out.write(block)
                    digest.update(block)
                    written += len(block)
                    bar.update(len(block))
        except (OSError, TimeoutError) as err:
            raise DownloadError(
                f"download of {url} stopped after {written} bytes ({err}); run again to resume it from {part}"
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
    os.replace(part, dest)
    return got
