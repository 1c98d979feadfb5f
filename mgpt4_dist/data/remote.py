"""Remote shards: `pipe:COMMAND`, `http(s)://` and object-store URLs opened as byte streams.

Owns how a shard URL that is not a local path is read, listed and written:

- `pipe:COMMAND` runs COMMAND through the shell and reads its stdout (webdataset's form, e.g.
  `pipe:aws s3 cp s3://bucket/x.tar -` or `pipe:curl -s -f URL`); a non-zero exit is an error.
- `http://`, `https://`: the stdlib HTTP client, `Range` requests when resuming a broken read.
- Object stores (`s3://`, `gs://`, `az://`, ... whatever fsspec opens): through fsspec, with s3fs
  / gcsfs installed (the `remote` extra). Credentials and endpoints come from the usual
  environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_PROFILE,
  GOOGLE_APPLICATION_CREDENTIALS, ...), as the AWS CLI and gsutil read them.

Everything streams: a shard is never copied whole to local disk. `open_shard_stream` returns a
forward-reading file object that the tar reader uses like a local file. A read that breaks
(connection reset, 5xx, timeout, a pipe exiting non-zero) is retried with exponential backoff
(`data.retries`, `data.retry_backoff_s`) from where it broke: with a ranged request when the
source honours one, else by reopening from the shard start and discarding the bytes already
consumed (plain static servers such as `python -m http.server` answer Range with the whole file).
A missing shard (HTTP 404/410, NoSuchKey) raises `ShardMissingError` at once; a shard still
failing after the retries raises `ShardUnavailableError`. Both are OSErrors naming the URL and
the cause; the training stream skips such a shard and counts it (`skipped_shards`).
"""
from __future__ import annotations

import fnmatch
import http.client
import io
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from typing import Callable, List, Optional, Tuple

log = logging.getLogger(__name__)

__all__ = ["ShardMissingError", "ShardUnavailableError", "is_object_store_url", "is_remote_url", "join_url",
           "list_object_store", "open_shard_stream", "upload_file"]

# Seconds a connection may stay silent before a read counts as failed (and is retried).
READ_TIMEOUT_S = 60.0
# Bytes requested per read from the underlying source.
_CHUNK = 1 << 20
# Bytes kept behind the read position: the tar reader seeks back a little (format probing, the
# byte before a header), never further than this.
_KEEP_BEHIND = 4 << 20
# Object-store reads are ranged requests of this size (streaming, never the whole object).
_OBJECT_BLOCK = 8 << 20
_HTTP_SCHEMES = ("http://", "https://")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# Shell exit statuses that mean the command itself is wrong (not found, not executable): retrying
# cannot help, and the cause belongs in the first error the user sees.
_PIPE_PERMANENT_EXITS = (126, 127)


class ShardMissingError(FileNotFoundError):
    """A shard URL that names nothing (HTTP 404/410, NoSuchKey, no such file)."""


class ShardUnavailableError(OSError):
    """A shard that kept failing after the retries (or failed for good: a pipe command not found)."""


class _Transient(Exception):
    """A failure worth retrying; `cause` says what happened."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


def is_remote_url(url: str) -> bool:
    """A shard that is not a local path: `pipe:...` or `scheme://...` (`file://` excepted)."""
    return url.startswith("pipe:") or (bool(_SCHEME.match(url)) and not url.startswith("file://"))


def is_object_store_url(url: str) -> bool:
    """An fsspec URL other than HTTP(S) and local files: `s3://`, `gs://`, `az://`, ..."""
    match = _SCHEME.match(url)
    return bool(match) and not url.startswith(_HTTP_SCHEMES) and match.group(1) not in ("file", "local")


def join_url(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_remote_url(base) else os.path.join(base, name)


def _filesystem(url: str):
    try:
        import fsspec
    except ImportError as e:  # pragma: no cover - fsspec comes with the core install
        raise ShardUnavailableError(f"{url}: fsspec is needed for object-store URLs ({e})") from None
    protocol = _SCHEME.match(url).group(1)
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as e:
        extra = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(protocol)
        hint = f"; install {extra} (pip install 'mgpt4_dist[remote]')" if extra else ""
        raise ShardUnavailableError(f"{url}: no filesystem for {protocol}:// ({e}){hint}") from None


def list_object_store(pattern: str) -> List[str]:
    """The objects a glob over an object-store prefix names (`s3://bucket/laion/*.tar`), sorted."""
    fs = _filesystem(pattern)
    protocol = _SCHEME.match(pattern).group(1)
    try:
        found = fs.glob(pattern)
    except FileNotFoundError:
        found = []
    except Exception as e:  # credentials, endpoint, permissions: the cause is in the message
        raise ShardUnavailableError(f"{pattern}: listing failed: {type(e).__name__}: {e}") from e
    # fsspec returns paths without the scheme; a glob may also match "directories" (prefixes).
    return sorted(f"{protocol}://{path}" for path in found if fnmatch.fnmatch(f"{protocol}://{path}", pattern))


def upload_file(local_path: str, url: str) -> None:
    """Put a complete local file at an object-store URL (one object; never visible half written)."""
    fs = _filesystem(url)
    try:
        fs.put_file(local_path, url)
    except Exception as e:
        raise ShardUnavailableError(f"{url}: upload failed: {type(e).__name__}: {e}") from e


# =============================================================================================
# Openers: (url, byte offset) -> (readable, offset it actually starts at)
# =============================================================================================

class _PipeReader:
    """stdout of a shell command; its exit status is checked at end of stream and on close."""

    def __init__(self, url: str, command: str):
        self.url, self.command = url, command
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, bufsize=0)

    def read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        if not data:
            self._check_exit()
        return data

    def _check_exit(self) -> None:
        status = self.proc.wait()
        if status != 0:
            stderr = self.proc.stderr.read().decode("utf-8", "replace").strip().splitlines()
            cause = f"command exited with status {status}" + (f": {stderr[-1]}" if stderr else "")
            if status in _PIPE_PERMANENT_EXITS:
                raise ShardUnavailableError(f"{self.url}: {cause}")
            raise _Transient(cause)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


def _open_pipe(url: str, offset: int) -> Tuple[object, int]:
    return _PipeReader(url, url[len("pipe:"):]), 0


class _HttpReader:
    def __init__(self, response):
        self.response = response

    def read(self, n: int) -> bytes:
        try:
            # read1: what has arrived (up to n), so bytes received before a reset are kept.
            return self.response.read1(n)
        except http.client.IncompleteRead as e:
            raise _Transient(f"connection closed early ({e})") from None
        except (OSError, http.client.HTTPException) as e:
            raise _Transient(f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        self.response.close()


def _open_http(url: str, offset: int) -> Tuple[object, int]:
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=READ_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code in (404, 410):
            raise ShardMissingError(f"{url}: HTTP {e.code} {e.reason}") from None
        if e.code in (408, 425, 429) or e.code >= 500:
            raise _Transient(f"HTTP {e.code} {e.reason}") from None
        raise ShardUnavailableError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _Transient(f"{type(reason).__name__}: {reason}") from None
    # 206: the server honoured the range. 200: it sent the whole file (no Range support).
    start = offset if response.status == 206 else 0
    return _HttpReader(response), start


class _ObjectReader:
    def __init__(self, handle):
        self.handle = handle

    def read(self, n: int) -> bytes:
        try:
            return self.handle.read(n)
        except FileNotFoundError:
            raise
        except Exception as e:  # botocore/aiohttp errors are not OSErrors
            raise _Transient(f"{type(e).__name__}: {e}") from None

    def close(self) -> None:
        try:
            self.handle.close()
        except Exception:
            pass


def _open_object(url: str, offset: int) -> Tuple[object, int]:
    fs = _filesystem(url)
    try:
        handle = fs.open(url, "rb", block_size=_OBJECT_BLOCK, cache_type="readahead")
        if offset:
            handle.seek(offset)
    except FileNotFoundError as e:
        raise ShardMissingError(f"{url}: no such object ({e})") from None
    except PermissionError as e:
        raise ShardUnavailableError(f"{url}: access denied ({e})") from None
    except Exception as e:
        name = type(e).__name__
        # Missing credentials or a wrong endpoint do not heal by waiting.
        if "Credential" in name or "EndpointConnection" in name and not os.environ.get("AWS_ENDPOINT_URL"):
            raise ShardUnavailableError(f"{url}: {name}: {e}") from None
        raise _Transient(f"{name}: {e}") from None
    return _ObjectReader(handle), offset


def _opener(url: str) -> Callable[[str, int], Tuple[object, int]]:
    if url.startswith("pipe:"):
        return _open_pipe
    if url.startswith(_HTTP_SCHEMES):
        return _open_http
    return _open_object


# =============================================================================================
# The stream the tar reader sees
# =============================================================================================

class RemoteShardStream(io.RawIOBase):
    """A forward stream over a remote shard that survives broken reads.

    Seeks forward by reading and back within the last `_KEEP_BEHIND` bytes, which is all the tar
    reader needs. A failed read reopens the source at the current position (or from its start,
    discarding bytes, when it ignores ranges) after `backoff * 2**k` seconds, up to `retries` times
    in a row; progress resets the count.
    """

    def __init__(self, url: str, retries: int, backoff_s: float):
        super().__init__()
        self.url, self.retries, self.backoff_s = url, max(0, retries), max(0.0, backoff_s)
        self._open = _opener(url)
        self._reader: Optional[object] = None
        self._source_pos = 0  # bytes of the shard received from the source so far
        self._buffer = bytearray()  # shard bytes [self._buffer_start, self._source_pos)
        self._buffer_start = 0
        self._pos = 0  # the reader's position
        self._eof = False
        self.retried = 0  # reopenings after failures (for tests and logs)
        self._connect()

    # ------------------------------------------------------------------ source handling
    def _retrying(self, read_size: int) -> bytes:
        """(Re)connect if needed and read up to `read_size` bytes (0: connect only), retrying
        transient failures with exponential backoff."""
        failures = 0
        while True:
            try:
                if self._reader is None:
                    self._reopen()
                return self._reader.read(read_size) if read_size else b""
            except _Transient as e:
                failures += 1
                self._drop_reader()
                if failures > self.retries:
                    raise ShardUnavailableError(f"{self.url}: {e.cause} (gave up after {self.retries} "
                                                f"retries)") from None
                delay = self.backoff_s * (2 ** (failures - 1))
                log.info("%s: %s; retry %d/%d in %.1f s from byte %d", self.url, e.cause, failures,
                         self.retries, delay, self._source_pos)
                time.sleep(delay)
                self.retried += 1

    def _connect(self) -> None:
        self._retrying(0)

    def _reopen(self) -> None:
        reader, start = self._open(self.url, self._source_pos)
        # A source that ignored the range starts over: discard what was already received.
        to_skip = self._source_pos - start
        try:
            while to_skip > 0:
                data = reader.read(min(_CHUNK, to_skip))
                if not data:
                    raise _Transient(f"source ended at byte {self._source_pos - to_skip} while skipping to "
                                     f"byte {self._source_pos}")
                to_skip -= len(data)
        except BaseException:
            reader.close()
            raise
        self._reader = reader

    def _drop_reader(self) -> None:
        if self._reader is not None:
            try:
                self._reader.close()
            except Exception:
                pass
            self._reader = None

    def _fill(self) -> bool:
        """Receive the next chunk into the buffer; False at end of the shard."""
        if self._eof:
            return False

        data = self._retrying(_CHUNK)
        if not data:
            self._eof = True
            self._drop_reader()
            return False
        self._buffer += data
        self._source_pos += len(data)
        # Drop bytes far behind the reader.
        excess = (self._pos - self._buffer_start) - _KEEP_BEHIND
        if excess > 0:
            del self._buffer[:excess]
            self._buffer_start += excess
        return True

    # ------------------------------------------------------------------ file interface
    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            while self._fill():
                pass
            offset += self._source_pos
        if offset < self._buffer_start:
            raise OSError(f"{self.url}: cannot seek back to byte {offset} of a stream (kept from byte "
                          f"{self._buffer_start})")
        self._pos = offset
        return self._pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            while self._fill():
                pass
            n = self._source_pos - self._pos
        while self._source_pos - self._pos < n and self._fill():
            pass
        begin = self._pos - self._buffer_start
        data = bytes(self._buffer[begin:begin + max(0, n)])
        self._pos += len(data)
        return data

    def readinto(self, target) -> int:
        data = self.read(len(target))
        target[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._drop_reader()
        self._buffer = bytearray()
        super().close()


def open_shard_stream(url: str, retries: int = 3, backoff_s: float = 1.0) -> RemoteShardStream:
    """The shard at a remote URL as a readable stream; ShardMissingError / ShardUnavailableError
    (both OSErrors naming the URL and the cause) when it cannot be read."""
    return RemoteShardStream(url, retries, backoff_s)

