"""Sources: the inputs that are not yet shards, turned into samples.

Owns caption-file ingest (a folder of images with a .jsonl/.csv/.json captions file, and the
cc_sbu_align layout `filter_cap.json` + `image/`) for `mgpt4-make-shards`, and the cc_sbu_align
folder read directly as virtual shards (`FOLDER#alignK`) so training can use it without
converting it. Samples are `(key, JPEG bytes, caption)` or, when a record carries several
reference captions, `(key, JPEG bytes, caption, {"captions": [...]})`; `shards.write_shards`
writes both.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

from tqdm import tqdm

from mgpt4_dist.data import BadSampleError, Sample
from mgpt4_dist.data.transforms import decode_image
from mgpt4_dist.errors import UserError

__all__ = ["ALIGN_ANNOTATIONS", "CaptionsFileError", "align_folder_shards", "iter_cc_sbu_align",
           "iter_folder_captions", "read_align_shard", "virtual_align_shard"]


class CaptionsFileError(UserError, ValueError):
    """A captions/annotations file that cannot be used as a whole (format, columns, structure)."""


# =============================================================================================
# A cc_sbu_align folder as virtual shards
# =============================================================================================

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


def virtual_align_shard(name: str) -> Optional[Tuple[str, int]]:
    """(folder, chunk) of a virtual shard name `FOLDER#alignK`, or None for any other shard URL."""
    match = _ALIGN_SHARD.match(name)
    return (match.group(1), int(match.group(2))) if match else None


def read_align_shard(name: str) -> Iterator[Dict[str, Any]]:
    folder, chunk = virtual_align_shard(name)
    return _read_align_chunk(folder, chunk)


# =============================================================================================
# A folder of images with a captions file, and the cc_sbu_align layout, for mgpt4-make-shards
# =============================================================================================


# Record fields naming the image file, and holding the caption, in order of preference.
_IMAGE_NAME_FIELDS = ("image", "file", "file_name", "image_id")
_CAPTION_FIELDS = ("caption", "text")
# Several reference captions per image (evaluation scores against all); the first trains.
_REFERENCES_FIELD = "captions"
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
        references = row.get(_REFERENCES_FIELD)
        if references is not None and (not isinstance(references, list)
                                       or not all(isinstance(r, str) and r.strip() for r in references)):
            _skip(skipped, f"{where}: {_REFERENCES_FIELD!r} must be a list of non-empty strings")
            continue
        references = list(references or [])
        caption = _first_field(row, _CAPTION_FIELDS) or (references[0] if references else None)
        if references and references[0] != caption:
            references.insert(0, caption)  # the training caption is always the first reference
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
        key = _unique_key(path, seen)
        yield (key, jpeg, caption, {_REFERENCES_FIELD: references}) if references else (key, jpeg, caption)


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path} does not exist or is not a directory")


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist or is not a file")


def iter_folder_captions(image_dir: str, captions_path: str, skipped: Optional[List[str]] = None) -> Iterator[Sample]:
    """Samples from a folder of images and a captions file (.jsonl, .csv, or a .json list).

    Each record names its image (`image`, `file`, `file_name` or `image_id`; an id without
    extension finds `<id>.jpg`, `.png`, ...) and its caption (`caption` or `text`), or a list of
    reference captions (`captions`, .jsonl/.json; the first is the caption). Non-JPEG images
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

