"""Webdataset tar shards: finding, writing and reading them, and the sources that fill them.

Owns the on-disk sample layout. Per key K a shard holds `K.jpg` (JPEG bytes), `K.json`
(`{"caption": ..., "key": K}`) and `K.txt` (the caption): the layout img2dataset writes too, so its
shards read the same way. Members are grouped into samples by webdataset's rule: the key is the
member name up to the first dot of its base name, the rest (lowercased) is the field.

Reading never decodes images: the training stream skips already-consumed samples cheaply and
decodes only what it uses, through `decode_sample`. A truncated or corrupt tar yields the samples
that were readable and then raises `BadSampleError`; the stdlib `tarfile` reader is used (not
webdataset's) because it lets us tell a shard cut at a member boundary from a complete one.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import logging
import lzma
import os
import re
import sys
import tarfile
import zlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import braceexpand
from PIL import Image
from tqdm import tqdm

from mgpt4_dist.data import BadSampleError
from mgpt4_dist.data.text import blip_caption
from mgpt4_dist.data.transforms import decode_image
from mgpt4_dist.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BadSampleError", "CaptionsFileError", "IMAGE_FIELDS", "Sample",
    "decode_sample", "expand_shard_pattern", "iter_cc_sbu_align", "iter_folder_captions", "read_shard_samples",
    "write_shards",
]

log = logging.getLogger(__name__)

Sample = Tuple[str, bytes, str]  # (key, JPEG bytes, caption)

# Fields a raw sample may carry its image in, in order of preference.
IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")


class CaptionsFileError(UserError, ValueError):
    """A captions/annotations file that cannot be used as a whole (format, columns, structure)."""


# =============================================================================================
# Finding shards
# =============================================================================================

_GLOB_CHARS = re.compile(r"[*?\[]")


def _is_remote(pattern: str) -> bool:
    return pattern.startswith("pipe:") or "://" in pattern


def expand_shard_pattern(pattern: str) -> List[str]:
    """Existing files named by brace ranges/alternatives (`{000..007}`, `{a,b}`) and globs, sorted.

    Remote patterns (`pipe:...`, `scheme://...`) are only brace-expanded, not checked.
    """
    expanded = list(braceexpand.braceexpand(pattern))
    if _is_remote(pattern):
        return expanded
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


def _sample_members(key: str, jpeg: bytes, caption: str,
                    extra_json: Optional[Callable[[str, str], Mapping[str, Any]]]) -> List[Tuple[str, bytes]]:
    meta: Dict[str, Any] = dict(extra_json(key, caption)) if extra_json else {}
    meta.update(caption=caption, key=key)  # after the extras: json and txt must agree on the caption
    return [(f"{key}.jpg", bytes(jpeg)),
            (f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")),
            (f"{key}.txt", caption.encode("utf-8"))]


class _PendingShard:
    """One shard being written under a hidden temporary name; `commit` moves it into place whole."""

    def __init__(self, final_path: str):
        self.final_path = final_path
        directory, name = os.path.split(final_path)
        # Hidden and not ending in .tar, so a `*.tar` pattern never picks up a half-written shard.
        self.tmp_path = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
        self.count = 0
        self._file = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w")

    def add(self, members: List[Tuple[str, bytes]]) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), _MEMBER_MTIME, _MEMBER_MODE
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def commit(self) -> str:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the rename must not become visible before the data is on disk
        self._file.close()
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
    """Write (key, JPEG bytes, caption) samples to `out_dir/{prefix}-000000.tar`, ... and return their paths.

    `extra_json(key, caption)` may add fields to each `K.json`. A shard appears under its final
    name only once complete; if writing fails, the shard in progress is removed and the error
    propagates (earlier, complete shards stay). `total` only sizes the progress bar (stderr).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    os.makedirs(out_dir, exist_ok=True)
    written: List[str] = []
    shard: Optional[_PendingShard] = None
    previous_key: Optional[str] = None
    bar = tqdm(total=total, desc=f"writing {prefix}-*.tar", unit="sample", file=sys.stderr, disable=not progress)
    try:
        for key, jpeg, caption in samples:
            _check_key(key)
            if key == previous_key:  # readers would merge the two into one sample
                raise ValueError(f"sample key {key!r} repeats the previous sample's key")
            previous_key = key
            if shard is None:
                shard = _PendingShard(os.path.join(out_dir, _shard_name(prefix, len(written))))
            shard.add(_sample_members(key, jpeg, caption, extra_json))
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


def read_shard_samples(path: str) -> Iterator[Dict[str, Any]]:
    """A cc_sbu_align folder's virtual shard (`FOLDER#alignK`, see `align_folder_shards`) is read
    straight from its filter_cap.json and image/ folder.

    Raw samples of one shard: dicts of `__key__`, `__url__` (the path) and bytes per field, in order.

    Images are not decoded. If the tar is truncated or corrupt, the samples read before the damage
    are yielded (the last one possibly missing fields, which `decode_sample` rejects), then
    `BadSampleError("{path}: truncated or corrupt tar after N samples: ...")` is raised. A missing
    or unreadable file raises its OSError (FileNotFoundError, PermissionError) instead.
    """
    virtual = _ALIGN_SHARD.match(path)
    if virtual:
        yield from _read_align_chunk(virtual.group(1), int(virtual.group(2)))
        return
    with open(path, "rb") as raw:
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
        except _TAR_ERRORS as e:
            error = e
        if current is not None:
            yield current
            count += 1
        if error is not None:
            raise BadSampleError(f"{path}: truncated or corrupt tar after {count} samples: {error}") from error


# A cc_sbu_align folder (filter_cap.json + image/) is read directly, split into virtual shards of
# this many samples so it can be divided among ranks and workers like tar shards.
ALIGN_ANNOTATIONS = "filter_cap.json"
ALIGN_CHUNK = 64
_ALIGN_SHARD = re.compile(r"^(.*)#align(\d+)$")


def _align_annotations(folder: str) -> List[dict]:
    with open(os.path.join(folder, ALIGN_ANNOTATIONS)) as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CaptionsFileError(f"{folder}/{ALIGN_ANNOTATIONS}: expected {{\"annotations\": [...]}}")
    return data["annotations"]


def align_folder_shards(folder: str) -> List[str]:
    count = len(_align_annotations(folder))
    return [f"{folder}#align{k}" for k in range((count + ALIGN_CHUNK - 1) // ALIGN_CHUNK)]


def _read_align_chunk(folder: str, chunk: int) -> Iterator[Dict[str, Any]]:
    """Raw samples like a tar shard's; a missing image leaves the sample without one (a counted skip)."""
    for ann in _align_annotations(folder)[chunk * ALIGN_CHUNK:(chunk + 1) * ALIGN_CHUNK]:
        key = str(ann.get("image_id", ""))
        sample: Dict[str, Any] = {"__key__": key, "__url__": f"{folder}#align{chunk}",
                                  "json": json.dumps({"caption": ann.get("caption")}).encode("utf-8")}
        image_path = os.path.join(folder, "image", f"{key}.jpg")
        if os.path.isfile(image_path):
            with open(image_path, "rb") as f:
                sample["jpg"] = f.read()
        yield sample


def _where(raw: Mapping[str, Any]) -> str:
    key = raw.get("__key__", "<no __key__>")
    url = raw.get("__url__")
    return f"sample {key!r} of {url}" if url else f"sample {key!r}"


def _as_text(value: Any, what: str, where: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except (TypeError, UnicodeDecodeError) as e:
        raise BadSampleError(f"{where}: {what} is not UTF-8 text ({e})") from e


def _json_caption(raw: Mapping[str, Any], where: str) -> Optional[str]:
    if "json" not in raw:
        return None
    try:
        meta = json.loads(_as_text(raw["json"], "json", where))
    except json.JSONDecodeError as e:
        raise BadSampleError(f"{where}: bad JSON ({e})") from e
    if not isinstance(meta, dict):
        raise BadSampleError(f"{where}: bad JSON (a {type(meta).__name__}, not an object)")
    caption = meta.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise BadSampleError(f"{where}: json caption is a {type(caption).__name__}, not a string")
    return caption


def _raw_caption(raw: Mapping[str, Any], where: str) -> str:
    caption = _json_caption(raw, where)
    # img2dataset leaves json["caption"] null when it had no caption column; txt is then the source.
    if (caption is None or not caption.strip()) and "txt" in raw:
        caption = _as_text(raw["txt"], "txt", where)
    if caption is None or not caption.strip():
        raise BadSampleError(f"{where}: missing or empty caption (no json 'caption', no txt)")
    return caption


def _training_caption(raw: Mapping[str, Any], where: str, clean: bool, max_words: int) -> str:
    """The caption as training uses it: raw, or BLIP-cleaned (stage 1); never empty."""
    caption = _raw_caption(raw, where)
    if clean:
        caption = blip_caption(caption, max_words)
        if not caption:
            raise BadSampleError(f"{where}: caption is empty after cleaning")
    return caption


def decode_sample(raw: Mapping[str, Any], transform: Callable[[Image.Image], "torch.Tensor"], clean: bool,
                  max_words: int) -> Tuple["torch.Tensor", str]:
    """(image tensor, caption) of a raw sample from `read_shard_samples`.

    The image comes from the first of `jpg`/`jpeg`/`png`/`webp`, the caption from `json["caption"]`
    or else `txt`; with `clean` it goes through `blip_caption`. Raises BadSampleError naming the
    key and the problem: no image, undecodable or truncated image, missing or empty caption, bad JSON.
    """
    where = _where(raw)
    field = next((f for f in IMAGE_FIELDS if f in raw), None)
    if field is None:
        raise BadSampleError(f"{where}: no image (none of {', '.join(IMAGE_FIELDS)}; has {sorted(raw)})")
    # The caption is checked before the image: rejecting a sample should not cost a decode.
    caption = _training_caption(raw, where, clean, max_words)
    try:
        image = decode_image(raw[field])
    except BadSampleError as e:
        raise BadSampleError(f"{where}: {field}: {e}") from e
    return transform(image), caption


# Precomputed vision features (mgpt4-cache-features) are stored as a `.npy` field: numpy's own
# format, read without pickle.
FEATURES_FIELD = "npy"


def encode_features(features: "torch.Tensor") -> bytes:
    import numpy as np
    import torch

    tensor = features.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: float32 holds it exactly
        tensor = tensor.float()
    buf = io.BytesIO()
    np.save(buf, tensor.numpy(), allow_pickle=False)
    return buf.getvalue()


def decode_feature_sample(raw: Mapping[str, Any], clean: bool, max_words: int) -> Tuple["torch.Tensor", str]:
    """(features [image tokens, width], caption) of a sample written by mgpt4-cache-features."""
    import numpy as np
    import torch

    where = _where(raw)
    if FEATURES_FIELD not in raw:
        raise BadSampleError(f"{where}: no cached features ({FEATURES_FIELD}); is data.features=true "
                             f"pointing at image shards? Run mgpt4-cache-features first")
    caption = _training_caption(raw, where, clean, max_words)
    try:
        array = np.load(io.BytesIO(raw[FEATURES_FIELD]), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadSampleError(f"{where}: unreadable features: {e}") from e
    if array.ndim != 2:
        raise BadSampleError(f"{where}: features of shape {array.shape}, expected [image tokens, width]")
    return torch.from_numpy(array), caption


# =============================================================================================
# Sources: a folder of images with a captions file, and the cc_sbu_align layout
# =============================================================================================

# Record fields naming the image file, and holding the caption, in order of preference.
_IMAGE_NAME_FIELDS = ("image", "file", "file_name", "image_id")
_CAPTION_FIELDS = ("caption", "text")
# Tried in order when a record names an image without extension (e.g. an image_id).
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".JPG", ".JPEG", ".PNG", ".WEBP", ".bmp", ".gif")
_JPEG_MAGIC = b"\xff\xd8\xff"
_REENCODE_QUALITY = 95

Record = Tuple[str, Any]  # (where it came from, for messages; the parsed row)


def _skip(skipped: Optional[List[str]], reason: str) -> None:
    tqdm.write(f"warning: skipping {reason}", file=sys.stderr)  # tqdm.write keeps a running bar intact
    if skipped is not None:
        skipped.append(reason)


def _first_field(row: Mapping[str, Any], names: Tuple[str, ...]) -> Optional[str]:
    for name in names:
        value = row.get(name)
        if value is not None and str(value).strip():
            return str(value)
    return None


def _jsonl_records(path: str) -> Iterator[Record]:
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError:
                yield f"{path}:{number}", line.strip()  # not a dict: reported and skipped downstream


def _check_csv_header(path: str) -> None:
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    if not set(header) & set(_IMAGE_NAME_FIELDS) or not set(header) & set(_CAPTION_FIELDS):
        raise CaptionsFileError(f"{path}: the CSV header needs an image column (one of "
                                f"{', '.join(_IMAGE_NAME_FIELDS)}) and a caption column (one of "
                                f"{', '.join(_CAPTION_FIELDS)}); it has {header}")


def _csv_records(path: str) -> Iterator[Record]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        for row in reader:
            yield f"{path}:{reader.line_num}", row


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CaptionsFileError(f"{path}: not valid JSON ({e})") from e


def _json_records(path: str, data: Any) -> Iterator[Record]:
    rows = data.get("annotations") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise CaptionsFileError(f"{path}: expected a JSON list of records or {{\"annotations\": [...]}}")
    return ((f"{path}: record {i}", row) for i, row in enumerate(rows))


def _caption_records(path: str) -> Iterator[Record]:
    """Records of a captions file; the format is checked now, rows are read lazily."""
    lower = path.lower()
    if lower.endswith(".jsonl"):
        return _jsonl_records(path)
    if lower.endswith(".csv"):
        _check_csv_header(path)
        return _csv_records(path)
    if lower.endswith(".json"):
        return _json_records(path, _load_json(path))
    raise CaptionsFileError(f"{path}: unknown captions format; use .jsonl, .csv or .json")


def _find_image(image_dir: str, name: str) -> Optional[str]:
    path = os.path.join(image_dir, name)
    if os.path.isfile(path):
        return path
    if not os.path.splitext(name)[1]:
        for extension in _IMAGE_EXTENSIONS:
            if os.path.isfile(path + extension):
                return path + extension
    return None


def _jpeg_bytes(path: str) -> bytes:
    """The file's bytes if it is a JPEG, else a JPEG re-encoding; BadSampleError if it does not decode."""
    with open(path, "rb") as f:
        data = f.read()
    image = decode_image(data)  # decoded in full even for JPEGs: a broken file is skipped now, not in training
    if data.startswith(_JPEG_MAGIC):
        return data  # kept as is: re-encoding would lose quality
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_REENCODE_QUALITY)
    return buffer.getvalue()


def _unique_key(path: str, seen: set) -> str:
    # Dots would split the key when the shard is read; a repeated image (several captions) gets
    # a numbered key so every (image, caption) pair stays a sample of its own.
    base = os.path.splitext(os.path.basename(path))[0].replace(".", "_")
    key, number = base, 1
    while key in seen:
        key, number = f"{base}_{number}", number + 1
    seen.add(key)
    return key


def _record_samples(records: Iterable[Record], image_dir: str, skipped: Optional[List[str]]) -> Iterator[Sample]:
    seen: set = set()
    for where, row in records:
        if not isinstance(row, dict):
            _skip(skipped, f"{where}: not a JSON object")
            continue
        name = _first_field(row, _IMAGE_NAME_FIELDS)
        caption = _first_field(row, _CAPTION_FIELDS)
        if name is None:
            _skip(skipped, f"{where}: no image field (one of {', '.join(_IMAGE_NAME_FIELDS)})")
            continue
        if caption is None:
            _skip(skipped, f"{where}: no caption (one of {', '.join(_CAPTION_FIELDS)})")
            continue
        path = _find_image(image_dir, name)
        if path is None:
            _skip(skipped, f"{where}: image {name!r} not found in {image_dir}")
            continue
        try:
            jpeg = _jpeg_bytes(path)
        except (OSError, BadSampleError) as e:
            _skip(skipped, f"{where}: {path}: {e}")
            continue
        yield _unique_key(path, seen), jpeg, caption


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path} does not exist or is not a directory")


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist or is not a file")


def iter_folder_captions(image_dir: str, captions_path: str, skipped: Optional[List[str]] = None) -> Iterator[Sample]:
    """Samples from a folder of images and a captions file (.jsonl, .csv, or a .json list).

    Each record names its image (`image`, `file`, `file_name` or `image_id`; an id without
    extension finds `<id>.jpg`, `.png`, ...) and its caption (`caption` or `text`). Non-JPEG images
    are re-encoded to JPEG. Unusable records and unreadable images are skipped with a warning on
    stderr and their reasons appended to `skipped`. The key is the image file stem.

    Missing paths (FileNotFoundError) and a malformed file (CaptionsFileError) raise right away.
    """
    _require_dir(image_dir, "image folder")
    _require_file(captions_path, "captions file")
    return _record_samples(_caption_records(captions_path), image_dir, skipped)


def iter_cc_sbu_align(root: str, skipped: Optional[List[str]] = None) -> Iterator[Sample]:
    """Samples of MiniGPT-4's stage-2 layout: `root/filter_cap.json` + `root/image/<image_id>.jpg`.

    filter_cap.json is `{"annotations": [{"image_id": "2", "caption": "..."}, ...]}`. Skipping and
    errors as in `iter_folder_captions`.
    """
    _require_dir(root, "cc_sbu_align folder")
    annotations = os.path.join(root, "filter_cap.json")
    _require_file(annotations, "cc_sbu_align annotations")
    _require_dir(os.path.join(root, "image"), "cc_sbu_align image folder")
    data = _load_json(annotations)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise CaptionsFileError(f"{annotations}: expected {{\"annotations\": [{{\"image_id\", \"caption\"}}, ...]}}")
    return _record_samples(_json_records(annotations, data), os.path.join(root, "image"), skipped)
