"""Opening shards and reading their raw samples with webdataset, with bad data recorded instead of raised.

A shard that cannot be opened (missing file, HTTP error, unreachable host, failing `pipe:` command) is a
`ShardOpenError`: the run stops and the message names the shard. Damaged data inside a shard that opened
(a truncated or garbled tar) ends that shard early and is recorded as a `BadData` entry; the reader goes on
with the next shard.

The tar stream is read and grouped into samples by webdataset (`tar_file_expander`, `group_by_keys`); its
exception handler hook records damage here. Python's tarfile, under webdataset, takes a stream that stops in the
middle of a header, or a header that does not check out, for the end of the archive, so a plain tar is also
checked to end the way a complete one does: with tar's end-of-archive marker and nothing but zeros after the
point where reading stopped.
"""

from __future__ import annotations

import contextlib
import http.client
import signal
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO
from urllib.parse import urlparse
from urllib.request import url2pathname

import webdataset as wds
from webdataset.gopen import Pipe
from webdataset.tariterators import group_by_keys, tar_file_expander

# Errors that mean the tar data itself is damaged; anything else from the stream is a source failure.
_TAR_DATA_ERRORS = (tarfile.TarError, EOFError, zlib.error, ValueError)
_END_MARKER = bytes(1024)  # two zero blocks end every complete tar
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"(\xb5/\xfd")
# Exit statuses of a `pipe:` command that was stopped by closing its output early (SIGPIPE, raw or via a shell).
_STOPPED = (-signal.SIGPIPE, 128 + signal.SIGPIPE)


class ShardOpenError(OSError):
    """A shard could not be opened or read from its source; the message names the shard."""


@dataclass(frozen=True)
class BadData:
    """One skipped sample or damaged shard.

    Args:
        kind: `corrupt_image`, `missing_image`, `missing_label`, `bad_label` or `bad_shard`.
        shard: the shard URL.
        key: the sample key (for `bad_shard`, the last key read before the damage, or None).
        message: what went wrong.
        lost: samples of the data this item stands for: 1 for a skipped sample; for a damaged shard, the samples
            its info-file count promised that were never read (1 where the count is unknown, 0 where the damage
            lies after the last promised sample).
    """

    kind: str
    shard: str
    key: str | None
    message: str
    lost: int = 1

    def __str__(self) -> str:
        where = f"shard {self.shard}" + (f" key {self.key}" if self.key is not None else "")
        return f"{self.kind} in {where}: {self.message}"


def open_shard(url: str, *, timeout: float = 60.0) -> IO[bytes]:
    """Open a shard for sequential reading.

    Local paths and `file:` URLs are opened directly, `http(s):` with urllib (errors surface at once instead
    of after curl's retries), everything else (`pipe:`, `gs:`, `hf:` ...) through webdataset's `gopen`.

    Args:
        url: the shard path or URL.
        timeout: seconds to wait for an HTTP connection.

    Raises:
        ShardOpenError: naming the shard.
    """
    scheme = urlparse(url).scheme
    try:
        if scheme in ("http", "https"):
            return urllib.request.urlopen(url, timeout=timeout)
        if scheme in ("", "file") or len(scheme) == 1:
            return open(url2pathname(urlparse(url).path) if scheme == "file" else url, "rb")
        return wds.gopen(url, "rb")
    except urllib.error.HTTPError as exn:
        raise ShardOpenError(f"cannot open shard {url}: HTTP {exn.code} {exn.reason}") from exn
    except urllib.error.URLError as exn:
        raise ShardOpenError(f"cannot reach shard {url}: {exn.reason}") from exn
    except FileNotFoundError as exn:
        raise ShardOpenError(f"shard not found: {url}") from exn
    except OSError as exn:
        raise ShardOpenError(f"cannot open shard {url}: {exn}") from exn


def read_shard(
    url: str, *, bad: list[BadData], expected: int | None = None, timeout: float = 60.0, skip: int = 0
) -> Iterator[dict]:
    """Yield the raw samples of one shard: dicts of `__key__`, `__url__` and one bytes entry per member.

    Args:
        url: the shard path or URL.
        bad: receives (`append`) a `bad_shard` entry when the tar data is damaged (the shard then ends early), with
            the samples lost when `expected` is known.
        expected: the shard's sample count from the info file; a shard that ends short of it is recorded too.
        timeout: seconds to wait for an HTTP connection.
        skip: samples read past without being yielded (another reader's part of the shard); damage found
            among them is left for that reader to record.

    Raises:
        ShardOpenError: the source failed (not found, HTTP error, `pipe:` command exited non-zero).
    """
    raw = open_shard(url, timeout=timeout)
    stream = _TarStream(raw, url)
    damage: list[Exception] = []

    def record(exn: Exception) -> bool:
        """webdataset's handler hook: damaged tar data ends the shard and is recorded; a source failure raises."""
        if isinstance(exn, _TAR_DATA_ERRORS):
            damage.append(exn)
            return False
        raise exn

    files = tar_file_expander([{"url": url, "stream": stream}], handler=record)
    count, last_key, ending = 0, None, None
    try:
        for sample in group_by_keys(files, handler=record):
            count, last_key = count + 1, sample["__key__"]
            if count > skip:
                yield sample
        ending = None if damage else stream.ending_problem()
    except (OSError, http.client.HTTPException) as exn:
        if isinstance(exn, ShardOpenError):
            raise
        why = f"command exited with {raw.status}" if isinstance(raw, Pipe) and raw.status else _describe(exn)
        raise ShardOpenError(f"reading shard {url} failed after {count} samples: {why}") from exn
    finally:
        # Closing a `pipe:` command before its end (end of epoch, damage) stops it with SIGPIPE; webdataset's Pipe
        # raises for that, so its exit status is judged below instead.
        with contextlib.suppress(OSError):
            raw.close()
    status = raw.status if isinstance(raw, Pipe) else None
    stopped_early = bool(damage or ending)
    if status not in (None, 0, *(_STOPPED if stopped_early else _STOPPED[1:])):
        raise ShardOpenError(f"reading shard {url} failed after {count} samples: command exited with {status}")
    if count < skip:
        return
    lost = 1 if expected is None else max(0, expected - count)  # one reader records the whole shard's loss
    if damage:
        message = f"damaged tar data after {count} samples ({_describe(damage[0])})"
        bad.append(BadData("bad_shard", url, last_key, message, lost))
    elif expected is not None and count < expected:
        message = f"shard ended after {count} of {expected} samples (truncated)"
        bad.append(BadData("bad_shard", url, last_key, message, lost))
    elif ending:
        bad.append(BadData("bad_shard", url, last_key, f"damaged tar data after {count} samples ({ending})", lost))


class _TarStream:
    """The shard's bytes on their way to tarfile, with what it takes to tell afterwards whether the tar was whole."""

    def __init__(self, raw: IO[bytes], url: str):
        self._raw = raw
        self._url = url
        self._head: bytes | None = None
        self._tail = b""

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if self._head is None:
            self._head = data[:8]
        self._tail = (self._tail + data)[-len(_END_MARKER) :]
        return data

    def __str__(self) -> str:  # webdataset writes the stream into its error messages
        return self._url

    def ending_problem(self) -> str | None:
        """Once tarfile has stopped reading a plain tar: what is wrong with how the stream ends, or None.

        A compressed tar is left to its decompressor; its sample count is the only check.
        """
        if self._head is None or self._head.startswith(_COMPRESSED_MAGIC):
            return None
        while chunk := self.read(1 << 16):
            if chunk.count(0) != len(chunk):
                return "unreadable tar header followed by more data"
        if self._tail != _END_MARKER:
            return "no end-of-archive marker: the tar was cut short"
        return None


def _describe(exn: BaseException) -> str:
    """The exception's own message: webdataset appends the stream and URL to `args`."""
    if isinstance(exn, OSError) and exn.strerror:
        return f"{type(exn).__name__}: {exn.strerror}"
    return f"{type(exn).__name__}: {exn.args[0]}" if exn.args else type(exn).__name__
