"""`mgpt4-make-shards`: write webdataset tar shards for training, from one of three sources.

    mgpt4-make-shards --images DIR --captions captions.jsonl --out shards/
    mgpt4-make-shards --cc-sbu-align cc_sbu_align/ --out shards/ --prefix cc_sbu_align
    mgpt4-make-shards --synthetic 1000 --out shards/
    mgpt4-make-shards --images DIR --captions captions.jsonl --out s3://bucket/shards

A captions record may carry several reference captions (`"captions": [...]`, .jsonl/.json): they
are written to KEY.json as `"captions"` beside `"caption"` (the first), for evaluation.
`--out` may be an object-store URL (s3://, gs://, ...; credentials from the usual environment):
each shard is uploaded when complete, never as a partial object.

A thin layer over `make_shards`, which tests call directly. Captions are stored raw: cleaning
happens at training time. Progress and skip warnings go to stderr; stdout gets one summary line.
Bad input is one `error:` line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys
from dataclasses import dataclass
from typing import Iterator, List, Optional, Tuple

from mgpt4_dist.cli import ArgumentParser, examples, user_errors
from mgpt4_dist.data import Sample
from mgpt4_dist.data.remote import ShardUnavailableError, is_object_store_url, is_remote_url, join_url, list_object_store
from mgpt4_dist.data.shards import write_shards
from mgpt4_dist.data.sources import CaptionsFileError, iter_cc_sbu_align, iter_folder_captions
from mgpt4_dist.errors import UserError
from mgpt4_dist.tiny.scenes import synthetic_samples

PROG = "mgpt4-make-shards"


class InputError(UserError):
    """A problem with what the user asked for; the CLI reports it in one line and exits with 2."""


@dataclass
class ShardReport:
    out_dir: str
    shards: List[str]
    samples: int
    skipped: int

    def summary(self) -> str:
        names = [os.path.basename(path) for path in self.shards]
        span = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]}"
        noun = "shard" if len(names) == 1 else "shards"
        return (f"wrote {len(names)} {noun} ({self.samples} samples, {self.skipped} skipped) "
                f"to {self.out_dir if is_remote_url(self.out_dir) else os.path.abspath(self.out_dir)} ({span})")


def _open_source(images: Optional[str], captions: Optional[str], cc_sbu_align: Optional[str],
                 synthetic: Optional[int], seed: int, image_size: int,
                 skipped: List[str]) -> Tuple[Iterator[Sample], Optional[int], str]:
    """(samples, their number if known, a name for messages) of the one source asked for."""
    chosen = [name for name, value in (("--images", images), ("--cc-sbu-align", cc_sbu_align),
                                       ("--synthetic", synthetic)) if value is not None]
    if len(chosen) != 1:
        raise InputError(f"give exactly one of --images, --cc-sbu-align, --synthetic (got {chosen or 'none'})")
    if (images is None) != (captions is None):
        raise InputError("--images and --captions go together")
    try:
        if synthetic is not None:
            if synthetic < 1:
                raise InputError(f"--synthetic must be >= 1, got {synthetic}")
            if image_size < 8:
                raise InputError(f"--image-size must be >= 8, got {image_size}")
            return synthetic_samples(synthetic, seed=seed, image_size=image_size), synthetic, "--synthetic"
        if cc_sbu_align is not None:
            return iter_cc_sbu_align(cc_sbu_align, skipped), None, cc_sbu_align
        return iter_folder_captions(images, captions, skipped), None, captions
    except (FileNotFoundError, CaptionsFileError) as e:
        raise InputError(str(e)) from e


def _prepare_remote_out(out: str, prefix: str) -> None:
    if not is_object_store_url(out):
        raise InputError(f"--out {out}: write to a local folder or an object store (s3://, gs://, ...), "
                         f"not a pipe: or http(s):// URL")
    try:
        existing = list_object_store(join_url(out, f"{prefix}-*.tar"))
    except ShardUnavailableError as e:
        raise InputError(f"--out {out}: cannot list it: {e}") from e
    if existing:
        raise InputError(f"--out {out} already holds {len(existing)} {prefix}-*.tar shard(s); "
                         f"remove them or choose another --out or --prefix")


def _prepare_out_dir(out: str, prefix: str) -> None:
    if is_remote_url(out):
        return _prepare_remote_out(out, prefix)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out}: exists and is not a directory")
    # Shards left by an earlier run would be trained on alongside the new ones, unnoticed.
    existing = glob.glob(os.path.join(glob.escape(out), f"{glob.escape(prefix)}-*.tar"))
    if existing:
        raise InputError(f"--out {out} already holds {len(existing)} {prefix}-*.tar shard(s); "
                         f"remove them or choose another --out or --prefix")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot create it ({e})") from e
    if not os.access(out, os.W_OK):
        raise InputError(f"--out {out}: not writable")


def _counted(samples: Iterator[Sample], counter: List[int]) -> Iterator[Sample]:
    for sample in samples:
        counter[0] += 1
        yield sample


def make_shards(out: str, *, images: Optional[str] = None, captions: Optional[str] = None,
                cc_sbu_align: Optional[str] = None, synthetic: Optional[int] = None, seed: int = 0,
                image_size: int = 64, prefix: str = "shard", samples_per_shard: int = 1000,
                progress: bool = True) -> ShardReport:
    """Write `out/{prefix}-000000.tar`, ... from exactly one source; InputError for bad input."""
    if not prefix or "/" in prefix:
        raise InputError(f"--prefix {prefix!r}: must be a non-empty file name prefix without '/'")
    if samples_per_shard < 1:
        raise InputError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    skipped: List[str] = []
    samples, total, source = _open_source(images, captions, cc_sbu_align, synthetic, seed, image_size, skipped)
    _prepare_out_dir(out, prefix)
    count = [0]
    try:
        shards = write_shards(_counted(samples, count), out, prefix=prefix, samples_per_shard=samples_per_shard,
                              progress=progress, total=total)
    except CaptionsFileError as e:  # e.g. a captions file that is not UTF-8, found while reading it
        raise InputError(str(e)) from e
    except ShardUnavailableError as e:  # an upload to --out failed (credentials, bucket, endpoint)
        raise InputError(f"--out {out}: {e}") from e
    if not shards:
        raise InputError(f"no usable samples in {source} ({len(skipped)} skipped); nothing written")
    return ShardReport(out_dir=out, shards=shards, samples=count[0], skipped=len(skipped))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Write webdataset tar shards (KEY.jpg, KEY.json with the caption, KEY.txt) for mgpt4-train. "
                    "Captions are stored raw; cleaning happens at training time.",
        epilog=examples("mgpt4-make-shards --images DIR --captions captions.jsonl --out shards/",
                        "mgpt4-make-shards --cc-sbu-align cc_sbu_align/ --out shards/ --prefix cc_sbu_align",
                        "mgpt4-make-shards --synthetic 1000 --out shards/"))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="folder of images; needs --captions")
    source.add_argument("--cc-sbu-align", metavar="DIR",
                        help="MiniGPT-4 stage-2 folder: filter_cap.json and image/<image_id>.jpg")
    source.add_argument("--synthetic", type=_positive_int, metavar="N",
                        help="N generated pictures of coloured shapes with captions naming them")
    parser.add_argument("--captions", metavar="FILE",
                        help=".jsonl, .csv or .json records with an image file name (image, file, file_name or "
                             "image_id) and a caption (caption or text) or several reference captions "
                             "(captions: a list, .jsonl/.json; the first one trains)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder (created if missing) or object-store URL (s3://bucket/prefix)")
    parser.add_argument("--prefix", default="shard", help="shard file names are PREFIX-000000.tar, ...")
    parser.add_argument("--samples-per-shard", type=_positive_int, default=1000, help="samples per .tar file")
    parser.add_argument("--seed", type=int, default=0, help="--synthetic only")
    parser.add_argument("--image-size", type=_positive_int, default=64, help="--synthetic only: image side in pixels")
    return parser


@user_errors(PROG)
def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.images is None) != (args.captions is None):
        parser.error("--images and --captions go together")
    report = make_shards(args.out, images=args.images, captions=args.captions, cc_sbu_align=args.cc_sbu_align,
                         synthetic=args.synthetic, seed=args.seed, image_size=args.image_size,
                         prefix=args.prefix, samples_per_shard=args.samples_per_shard)
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
