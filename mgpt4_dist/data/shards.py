"""Shards: webdataset tar shards named by URL patterns, read as raw samples and written whole.

Owns the shard layout. Per key K a shard holds `K.jpg` (JPEG bytes), `K.json`
(`{"caption": ..., "key": K}`, plus `"captions": [...]` when a sample has several reference
captions) and `K.txt` (the caption): the layout img2dataset writes too, so its shards read the
same way. Members are grouped into samples by webdataset's rule: the key is the member name up to
the first dot of its base name, the rest (lowercased) is the field.

A shard is a local path, a `pipe:COMMAND`, an `http(s)://` URL or an object-store URL (`s3://`,
`gs://`, ...): `mgpt4_dist.data.remote` opens the remote ones as streams. Reading never decodes
images (`samples.decode_sample` does): the training stream skips already-consumed samples cheaply.
A truncated or corrupt tar yields the samples that were readable and then raises
`BadSampleError`; the stdlib `tarfile` reader is used (not webdataset's) because it lets us tell a
shard cut at a member boundary from a complete one.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import lzma
import os
import re
import sys
import tarfile
import tempfile
import zlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import braceexpand
from tqdm import tqdm

from mgpt4_dist.data import BadSampleError, Sample
from mgpt4_dist.data.remote import (ShardMissingError, ShardUnavailableError, is_object_store_url, is_remote_url,
                                    join_url, list_object_store, open_shard_stream, upload_file)
from mgpt4_dist.data.sources import ALIGN_ANNOTATIONS, align_folder_shards, read_align_shard, virtual_align_shard

__all__ = [
    "BadSampleError", "ShardWriter", "expand_shard_pattern", "read_shard_samples", "write_shards",
]

log = logging.getLogger(__name__)


# =============================================================================================
# Finding shards
# =============================================================================================

_GLOB_CHARS = re.compile(r"[*?\[]")


def expand_shard_pattern(pattern: str) -> List[str]:
    """Shards named by brace ranges/alternatives (`{000..007}`, `{a,b}`) and globs, sorted.

    Local items must exist. A glob over an object-store prefix (`s3://bucket/laion/*.tar`) is
    expanded by listing; other remote items (`pipe:...`, `http(s)://...`, object-store names
    without glob characters) are only brace-expanded: opening them is the check.
    """
    expanded = list(braceexpand.braceexpand(pattern))
    if is_remote_url(pattern):
        remote: List[str] = []
        for item in expanded:
            if is_object_store_url(item) and _GLOB_CHARS.search(item):
                listed = list_object_store(item)
                if not listed:
                    raise FileNotFoundError(f"shard pattern {pattern!r}: listing {item} found no object")
                remote += listed
            else:
                remote.append(item)
        return remote
    found = set()
    missing: List[str] = []
    for item in expanded:
        item = os.path.expanduser(item)
        if os.path.isfile(os.path.join(item, ALIGN_ANNOTATIONS)):
            found.update(align_folder_shards(item))
        elif _GLOB_CHARS.search(item):
            found.update(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        elif os.path.isfile(item):
            found.add(item)
        else:
            missing.append(item)
    if not found:
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no file")
    if missing:
        # A hole in a numbered range is usually a failed download; say so rather than train on less.
        log.warning("shard pattern %r: %d listed file(s) do not exist, e.g. %s", pattern, len(missing), missing[0])
    return sorted(found)


# =============================================================================================
# Writing shards
# =============================================================================================

# Fixed member metadata makes equal input give byte-identical shards.
_MEMBER_MTIME = 0
_MEMBER_MODE = 0o444


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _check_key(key: str) -> None:
    # Readers split member names at the first dot of the base name, so a dot or slash in a key
    # would silently regroup the sample's files.
    if not isinstance(key, str) or not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be a non-empty string without '.' or '/'")


def _sample_members(key: str, jpeg: bytes, caption: str, meta: Mapping[str, Any]) -> List[Tuple[str, bytes]]:
    meta = {**meta, "caption": caption, "key": key}  # after the extras: json and txt must agree on the caption
    return [(f"{key}.jpg", bytes(jpeg)),
            (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")),
            (f"{key}.txt", caption.encode("utf-8"))]


class ShardWriter:
    """One tar shard being written under a temporary name; `commit` puts it in place whole.

    A local shard is written as a hidden file beside its final name, fsynced and renamed; an
    object-store shard (`s3://...`, see `remote.is_object_store_url`) is written to a local
    temporary file and uploaded on commit, which an object store makes visible only once complete.
    Either way, a reader never sees a partial shard under the final name.
    """

    def __init__(self, final_path: str):
        self.final_path = final_path
        self._remote = is_object_store_url(final_path)
        if self._remote:
            handle, self.tmp_path = tempfile.mkstemp(prefix="mgpt4-shard-", suffix=".tmp")
            os.close(handle)
        else:
            directory, name = os.path.split(final_path)
            # Hidden and not ending in .tar, so a `*.tar` pattern never picks up a half-written shard.
            self.tmp_path = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
        self.count = 0
        self._file = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w")

    def add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), _MEMBER_MTIME, _MEMBER_MODE
        self._tar.addfile(info, io.BytesIO(data))

    def add(self, members: List[Tuple[str, bytes]]) -> None:
        """One sample's members (`KEY.field`, bytes)."""
        for name, data in members:
            self.add_member(name, data)
        self.count += 1

    def commit(self) -> str:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the rename must not become visible before the data is on disk
        self._file.close()
        if self._remote:
            try:
                upload_file(self.tmp_path, self.final_path)
            finally:
                os.remove(self.tmp_path)
        else:
            os.replace(self.tmp_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        for close in (self._tar.close, self._file.close):
            try:
                close()
            except OSError:
                pass
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


def write_shards(samples: Iterable[Sample], out_dir: str, prefix: str = "shard", samples_per_shard: int = 1000,
                 extra_json: Optional[Callable[[str, str], Mapping[str, Any]]] = None, progress: bool = True,
                 total: Optional[int] = None) -> List[str]:
    """Write samples to `out_dir/{prefix}-000000.tar`, ... and return their paths.

    A sample is (key, JPEG bytes, caption) or (key, JPEG bytes, caption, extra `K.json` fields);
    `extra_json(key, caption)` may add fields to every `K.json` too. `out_dir` may be an object-store
    URL (`s3://bucket/prefix`): each shard is uploaded when complete. A shard appears under its
    final name only once complete; if writing fails, the shard in progress is removed and the error
    propagates (earlier, complete shards stay). `total` only sizes the progress bar (stderr).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not is_object_store_url(out_dir):
        os.makedirs(out_dir, exist_ok=True)
    written: List[str] = []
    shard: Optional[ShardWriter] = None
    previous_key: Optional[str] = None
    bar = tqdm(total=total, desc=f"writing {prefix}-*.tar", unit="sample", file=sys.stderr, disable=not progress)
    try:
        for sample in samples:
            key, jpeg, caption = sample[:3]
            _check_key(key)
            if key == previous_key:  # readers would merge the two into one sample
                raise ValueError(f"sample key {key!r} repeats the previous sample's key")
            previous_key = key
            meta: Dict[str, Any] = dict(extra_json(key, caption)) if extra_json else {}
            if len(sample) > 3:
                meta.update(sample[3])
            if shard is None:
                shard = ShardWriter(join_url(out_dir, _shard_name(prefix, len(written))))
            shard.add(_sample_members(key, jpeg, caption, meta))
            bar.update(1)
            if shard.count == samples_per_shard:
                written.append(shard.commit())
                shard = None
                bar.set_postfix(shards=len(written))
        if shard is not None:
            written.append(shard.commit())
            shard = None
            bar.set_postfix(shards=len(written))
    finally:
        if shard is not None:
            shard.abort()
        bar.close()
    return written


# =============================================================================================
# Reading shards
# =============================================================================================

# What reading a damaged tar (or its compression layer) can raise.
_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)
# webdataset skips metadata members such as `__index__`; so do we.
_META_MEMBER = re.compile(r"__[^/]*__($|/)")


def _split_member_name(name: str) -> Optional[Tuple[str, str]]:
    """(key, field) of a member name by webdataset's rule, or None for members that are no sample file."""
    if _META_MEMBER.match(name):
        return None
    directory, _, base = name.rpartition("/")
    stem, dot, field = base.partition(".")
    if not stem or not dot:
        return None
    return (f"{directory}/{stem}" if directory else stem), field.lower()


def _check_end_of_archive(tar: tarfile.TarFile, raw: io.BufferedReader) -> None:
    # tarfile ends iteration silently on a missing, short or garbage header after the first
    # member, so a shard cut at a member boundary would look complete. A complete archive has a
    # zero block where iteration stopped. Compressed shards are left to their decompressor, which
    # reports a cut stream itself.
    if tar.fileobj is not raw:
        return
    raw.seek(tar.offset)
    block = raw.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"no end-of-archive marker at byte {tar.offset}")


def _tar_members(tar: tarfile.TarFile, raw: io.BufferedReader) -> Iterator[Tuple[str, bytes]]:
    while True:
        info = tar.next()
        if info is None:
            break
        tar.members = []  # TarFile remembers every header it has read; a long shard would pile them up
        if not info.isreg():
            continue
        member = tar.extractfile(info)
        yield info.name, (member.read() if member is not None else b"")
    _check_end_of_archive(tar, raw)


def read_shard_samples(path: str, retries: int = 3, retry_backoff_s: float = 1.0) -> Iterator[Dict[str, Any]]:
    """Raw samples of one shard: dicts of `__key__`, `__url__` (the path) and bytes per field, in order.

    A remote shard (`pipe:`, `http(s)://`, `s3://`, ...) is streamed through `remote.open_shard_stream`,
    which retries broken reads (`retries`, `retry_backoff_s`); one that is missing or keeps failing
    raises `ShardMissingError` / `ShardUnavailableError` (OSErrors naming the URL and the cause).

    A cc_sbu_align folder's virtual shard (`FOLDER#alignK`, see `sources.align_folder_shards`) is
    read straight from its filter_cap.json and image/ folder.

    Images are not decoded. If the tar is truncated or corrupt, the samples read before the damage
    are yielded (the last one possibly missing fields, which `decode_sample` rejects), then
    `BadSampleError("{path}: truncated or corrupt tar after N samples: ...")` is raised. A missing
    or unreadable file raises its OSError (FileNotFoundError, PermissionError) instead.
    """
    if virtual_align_shard(path):
        yield from read_align_shard(path)
        return
    if is_remote_url(path):
        with open_shard_stream(path, retries, retry_backoff_s) as stream:
            yield from _read_tar_samples(stream, path)
        return
    with open(path, "rb") as raw:
        yield from _read_tar_samples(raw, path)


def _read_tar_samples(raw: io.BufferedReader, path: str) -> Iterator[Dict[str, Any]]:
    count = 0
    current: Optional[Dict[str, Any]] = None
    error: Optional[BaseException] = None
    try:
        tar = tarfile.open(fileobj=raw, mode="r:*")
        for name, data in _tar_members(tar, raw):
            split = _split_member_name(name)
            if split is None:
                continue
            key, field = split
            # A repeated field starts a new sample rather than overwrite data or abort the shard.
            if current is not None and (key != current["__key__"] or field in current):
                yield current
                count += 1
                current = None
            if current is None:
                current = {"__key__": key, "__url__": path}
            current[field] = data
    except (ShardMissingError, ShardUnavailableError):
        raise  # the source failed, not the tar: the stream counts a skipped shard
    except _TAR_ERRORS as e:
        error = e
    if current is not None:
        yield current
        count += 1
    if error is not None:
        raise BadSampleError(f"{path}: truncated or corrupt tar after {count} samples: {error}") from error
