"""Opening shards and reading their raw samples, with bad data recorded instead of raised.

A shard that cannot be opened (missing file, HTTP error, unreachable host, failing `pipe:` command) is a
`ShardOpenError`: the run stops and the message names the shard. Damaged data inside a shard that opened
(a truncated or garbled tar) ends that shard early and is recorded as a `BadData` entry; the reader goes on
with the next shard.
"""

from __future__ import annotations

import contextlib
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
from webdataset.tariterators import group_by_keys

# Errors that mean the tar data itself is damaged; anything else from the stream is a source failure.
_TAR_DATA_ERRORS = (tarfile.TarError, EOFError, zlib.error, ValueError)
_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"(\xb5/\xfd")


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
    """

    kind: str
    shard: str
    key: str | None
    message: str

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


def read_shard(url: str, *, bad: list[BadData], expected: int | None = None, timeout: float = 60.0) -> Iterator[dict]:
    """Yield the raw samples of one shard: dicts of `__key__`, `__url__` and one bytes entry per member.

    Args:
        url: the shard path or URL.
        bad: list that receives a `bad_shard` entry when the tar data is damaged (the shard then ends early).
        expected: the shard's sample count from the info file; a shard that ends cleanly but short of it
            was truncated at a member boundary, which tar itself cannot tell, and is recorded too.
        timeout: seconds to wait for an HTTP connection.

    Raises:
        ShardOpenError: the source failed (not found, HTTP error, `pipe:` command exited non-zero).
    """
    stream = open_shard(url, timeout=timeout)
    count, last_key, damage, finished = 0, None, None, False
    try:
        files = ({"fname": name, "data": data, "__url__": url} for name, data in iter_tar(stream))
        for sample in group_by_keys(files):
            count, last_key = count + 1, sample["__key__"]
            yield sample
        finished = True
    except _TAR_DATA_ERRORS as exn:
        damage, finished = exn, True
    except ShardOpenError:
        raise
    except OSError as exn:
        raise ShardOpenError(f"reading shard {url} failed after {count} samples: {exn}") from exn
    finally:
        if not finished:  # left early (end of epoch) or failing: a pipe: command may be stopped mid-write
            with contextlib.suppress(OSError):
                stream.close()
    # A `pipe:` command that failed also leaves damaged or no tar data behind: its exit status decides.
    status = getattr(stream, "status", None)
    try:
        stream.close()
    except OSError as exn:
        raise ShardOpenError(f"reading shard {url} failed after {count} samples: {exn}") from exn
    status = getattr(stream, "status", status)
    if status not in (None, 0, 141):
        raise ShardOpenError(f"reading shard {url} failed after {count} samples: command exited with {status}")
    if damage is not None:
        bad.append(BadData("bad_shard", url, last_key, f"damaged tar data after {count} samples ({damage!r})"))
    elif expected is not None and count < expected:
        message = f"shard ended after {count} of {expected} samples (truncated)"
        bad.append(BadData("bad_shard", url, last_key, message))


def iter_tar(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, data) for the regular files of an uncompressed tar stream.

    Python's tarfile spends more time parsing headers than libjpeg spends decoding a small image, so this
    reads the 512-byte headers directly: ustar and GNU names, pax `path` records, checksums verified.

    Raises:
        tarfile.ReadError: damaged or truncated data, or a compressed archive.
    """
    long_name = None
    while True:
        header = _read_exact(stream, _BLOCK)
        if not header or header == _ZERO_BLOCK:
            return  # end of archive (a missing end marker is not an error, as for tarfile)
        if len(header) < _BLOCK:
            raise tarfile.ReadError("unexpected end of data in a tar header")
        if header.startswith(_COMPRESSED_MAGIC):
            raise tarfile.ReadError("compressed tar shards are not supported; write plain .tar shards")
        _check_header(header)
        size = _octal(header[124:136])
        data = _read_exact(stream, size)
        if len(data) < size or len(_read_exact(stream, -size % _BLOCK)) < -size % _BLOCK:
            raise tarfile.ReadError("unexpected end of data in a tar member")
        kind = header[156:157]
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode()
        elif kind == b"x":  # pax extended header of the next member
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0", b"7"):
            name = long_name or _name(header)
            long_name = None
            yield name, data
        else:  # directories, links, pax globals
            long_name = None


def _read_exact(stream: IO[bytes], size: int) -> bytes:
    data = stream.read(size)
    while len(data) < size:
        more = stream.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _check_header(header: bytes) -> None:
    stored = _octal(header[148:156])
    # The checksum counts its own field as eight spaces.
    if sum(header[:148]) + 8 * 32 + sum(header[156:]) != stored:
        raise tarfile.ReadError("bad tar header checksum (damaged data)")


def _octal(field: bytes) -> int:
    if field[:1] == b"\x80":  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError as exn:
        raise tarfile.ReadError(f"bad number {field!r} in a tar header") from exn


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0].decode()
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0].decode()
        if prefix:
            name = prefix + "/" + name
    return name


def _pax_path(data: bytes) -> str | None:
    path = None
    while data:
        length, _, rest = data.partition(b" ")
        record, data = rest[: int(length) - len(length) - 1], data[int(length) :]
        key, _, value = record.rstrip(b"\n").partition(b"=")
        if key == b"path":
            path = value.decode()
    return path
