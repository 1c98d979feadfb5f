"""The training stream: webdataset shards → decoded, cleaned samples → batches, per rank.

Every (rank, DataLoader worker) pair reads its own *stream*. A stream's content is a pure function
of (seed, stream id, position), which gives exact resume without replaying data:

- `data.resample=true` (the original): an endless sequence of shard picks; pick i chooses a source
  by weight and a shard of it with an RNG seeded by (seed, stream, i). Streams differ, so no two
  ranks follow the same shard sequence.
- `data.resample=false`: epochs; each epoch shuffles all shards (seeded by the epoch) and stream g
  of G reads shards g, g+G, ... so within a pass every sample is read exactly once.

A stream's position is `{epoch, index, offset, skipped, skipped_shards}`: the shard it is in, how
many raw samples of that shard it has consumed, how many bad samples it has skipped so far, and how
many shards it skipped because their source failed (missing, or still failing after
`data.retries`; see `remote`). Every shard URL form (local, `pipe:`, HTTP(S), object store) is
read the same way, so mixing, splitting and resume do not depend on where shards live; a resume
inside a remote shard re-reads that shard from its start up to the offset (no decoding). Workers attach the
position after each batch; the main process keeps the position of the last batch it consumed from
each stream. DataLoader hands out batches from workers round-robin, so on resume the workers are
rotated to continue exactly where the previous run's next batch would have come from.

Length-grouped batching (`data.group_by_length=N`, off by default as in the original): a stream
fills a window of N batches, sorts it by caption length, cuts it into batches and yields them in
a seeded random order, so a batch pads its answers to a length close to their own. Its position
inside a window is `{window start..., window_done: k, window_shape, window_end}`: a resume
re-reads the window from its start (deterministic), regroups it identically and skips the k
batches already consumed; a rescaled or reconfigured resume starts after `window_end` instead.
"""
from __future__ import annotations

import logging
import random
import signal
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mgpt4_dist.config import DataConfig
from mgpt4_dist.data import BadSampleError
from mgpt4_dist.data.remote import ShardMissingError, ShardUnavailableError, is_remote_url
from mgpt4_dist.data.samples import decode_feature_sample, decode_sample
from mgpt4_dist.data.shards import expand_shard_pattern, read_shard_samples
from mgpt4_dist.data.transforms import build_resize_transform, normalize_images
from mgpt4_dist.errors import InvalidInputError, MissingFileError, UserError

log = logging.getLogger(__name__)

# A stream that visits this many shards in a row without one good sample gives up.
MAX_EMPTY_SHARDS_IN_ROW = 64
# A source whose shards fail (missing, or failing after the retries) this many times in a row in a
# stream, with no shard of it read in between (or all of its shards, if it has fewer), has failed
# as a whole: the run stops with the cause instead of training on the other sources only.
MAX_FAILED_SHARDS_IN_ROW = 8
# Bad samples a stream names in the log; later ones are only counted. A bad sample met again on a
# later resampled pass is never named twice. The count itself is printed once, in the progress line,
# metrics.jsonl (`skipped`) and TensorBoard (data/skipped): the bad samples in the batches consumed
# so far, all ranks together (workers read ahead, so their own running counts would disagree).
MAX_SKIP_WARNINGS = 20


# The signals that ask a run to stop (preemption, time limit, Ctrl-C). Launchers deliver them to every
# process: Slurm to every process of the step, torchrun and `kill -TERM -PGID` to the rank's process
# group, a terminal to its foreground group. A DataLoader worker has no use for them and would die of
# USR1/TERM (default action), which makes the rank raise "DataLoader worker (pid N) is killed by
# signal" instead of checkpointing. Workers ignore them; the rank handles them (mgpt4_dist.train.
# StopSignal) and shuts its workers down (BatchLoader.close). SIGKILL, which nothing can ignore, still
# ends them, and a worker whose rank is gone exits by itself (torch's worker watchdog).
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def _ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn: runs in the worker after torch installed its own (SIGBUS/SIGSEGV/SIGFPE) handlers."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    # Blocked by the rank around the fork (see BatchLoader): a signal that arrived in between is
    # pending here and is discarded now that it is ignored.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class DataSourceError(UserError, RuntimeError):
    """A shard source that cannot be read at all (wrong URL, missing credentials or tool, every shard failing)."""


@dataclass
class Source:
    shards: List[str]
    weight: float
    pattern: str = ""


def resolve_sources(patterns_and_weights: List[tuple], retries: int = 3, retry_backoff_s: float = 1.0) -> List[Source]:
    """Expand shard patterns (listing object-store globs) and open the first shard of each remote
    source, so a pattern that matches nothing, a wrong URL, missing credentials or a missing tool in
    a `pipe:` command is an error naming the cause before training starts."""
    if not patterns_and_weights:
        raise InvalidInputError("data.shards is empty: give at least one shard pattern, e.g. "
                                "data.shards=[/data/cc_sbu/{00000..01255}.tar] (mgpt4-make-shards writes shards)")
    sources = []
    for pattern, weight in patterns_and_weights:
        if weight <= 0:
            raise InvalidInputError(f"data.shards: weight of {pattern!r} must be > 0")
        try:
            shards = expand_shard_pattern(pattern)
        except ShardUnavailableError as e:  # listing an object-store glob failed
            raise DataSourceError(f"data.shards: {e}") from None
        except FileNotFoundError as e:
            raise MissingFileError(f"data.shards: {e}; check the path, or write shards with "
                                   f"mgpt4-make-shards") from None
        if is_remote_url(shards[0]):
            _check_first_shard(pattern, shards[0], retries, retry_backoff_s)
        sources.append(Source(shards, float(weight), pattern))
    return sources


def _check_first_shard(pattern: str, shard: str, retries: int, retry_backoff_s: float) -> None:
    try:
        next(iter(read_shard_samples(shard, retries, retry_backoff_s)), None)
    except (BadSampleError, OSError) as e:
        raise DataSourceError(f"data.shards: {pattern!r}: cannot read its first shard: {e}") from None


class ShardStream(IterableDataset):
    """Batches of one rank; each DataLoader worker runs one stream."""

    def __init__(self, sources: List[Source], *, rank: int, world_size: int, num_workers: int, seed: int,
                 resample: bool, batch_size: int, image_size: int, clean_captions: bool,
                 max_caption_words: int, start: Optional[dict] = None, features: bool = False,
                 group_by_length: int = 0, retries: int = 3, retry_backoff_s: float = 1.0):
        self.sources = sources
        self.retries, self.retry_backoff_s = retries, retry_backoff_s
        self.source_of = {shard: source for source in sources for shard in source.shards}
        self.group_by_length = group_by_length  # window in batches; 0 = batches in stream order
        self.features = features  # samples hold cached vision features instead of images
        self.rank, self.world_size = rank, world_size
        self.num_workers = max(1, num_workers)
        self.seed, self.resample = seed, resample
        self.batch_size = batch_size
        self.image_size = image_size
        self.clean_captions, self.max_caption_words = clean_captions, max_caption_words
        self.start = start or {"positions": {}, "batches": 0}
        self.all_shards = sorted({s for src in sources for s in src.shards})
        num_streams = world_size * self.num_workers
        if not resample and len(self.all_shards) < num_streams:
            raise InvalidInputError(
                f"data.resample=false needs at least world_size x num_workers = {num_streams} shards "
                f"so every stream reads a distinct split; found {len(self.all_shards)}. "
                f"Write smaller shards, lower data.num_workers, or use data.resample=true")

    # ------------------------------------------------------------------ stream content
    def stream_id(self, worker: int) -> int:
        # Rotation: after n consumed batches the next one comes from old worker n mod W.
        role = (worker + self.start.get("batches", 0)) % self.num_workers
        return self.rank * self.num_workers + role

    def shard_at(self, stream: int, epoch: int, index: int) -> Optional[str]:
        if self.resample:
            rng = random.Random(f"{self.seed}:{stream}:{index}")
            total = sum(s.weight for s in self.sources)
            pick, acc = rng.random() * total, 0.0
            for source in self.sources:
                acc += source.weight
                if pick < acc:
                    return rng.choice(source.shards)
            return rng.choice(self.sources[-1].shards)
        mine = self.epoch_split(stream, epoch)
        return mine[index] if index < len(mine) else None

    def epoch_split(self, stream: int, epoch: int) -> List[str]:
        order = list(self.all_shards)
        random.Random(f"{self.seed}:epoch:{epoch}").shuffle(order)
        return order[stream::self.world_size * self.num_workers]

    def samples(self, stream: int, position: dict) -> Iterator[tuple]:
        """Yield (image, caption, key, position-after-this-sample) forever from `position`.

        Images are resized uint8 tensors (normalized per batch in `_batch`); features as stored."""
        transform = build_resize_transform(self.image_size)
        pos = dict(position)
        pos.setdefault("skipped_shards", 0)
        empty_in_row = 0
        failed_in_row: Dict[str, int] = {}  # per source pattern: failed shards since its last readable one
        warned: set = set()

        def warn(what: tuple, message: str) -> None:
            if what in warned or len(warned) > MAX_SKIP_WARNINGS:
                return
            warned.add(what)
            if len(warned) > MAX_SKIP_WARNINGS:
                log.warning("stream %d: more bad samples; they are counted (`skipped` in the progress line and "
                            "metrics.jsonl) but no longer named", stream)
            else:
                log.warning("stream %d: skipping %s", stream, message)

        while True:
            shard = self.shard_at(stream, pos["epoch"], pos["index"])
            if shard is None:  # end of this stream's split for the epoch
                pos.update(epoch=pos["epoch"] + 1, index=0, offset=0)
                continue
            good = 0
            source = self.source_of.get(shard)
            try:
                for n, raw in enumerate(read_shard_samples(shard, self.retries, self.retry_backoff_s)):
                    if n < pos["offset"]:
                        continue  # already consumed before a resume: skip without decoding
                    pos["offset"] = n + 1
                    try:
                        if self.features:
                            image, caption = decode_feature_sample(raw, self.clean_captions, self.max_caption_words)
                        else:
                            image, caption = decode_sample(raw, transform, self.clean_captions, self.max_caption_words)
                    except BadSampleError as e:
                        pos["skipped"] += 1
                        warn((shard, n), f"bad sample: {e}")
                        continue
                    good += 1
                    yield image, caption, raw.get("__key__", ""), dict(pos)
            except (ShardMissingError, ShardUnavailableError) as e:
                pos["skipped_shards"] += 1
                # One warning per failed shard URL: its URL and cause are in the message.
                if (shard, "failed") not in warned:
                    warned.add((shard, "failed"))
                    log.warning("stream %d: skipping a shard (counted in skipped_shards): %s", stream, e)
                if source is not None:
                    failed = failed_in_row[source.pattern] = failed_in_row.get(source.pattern, 0) + 1
                    if failed >= min(len(source.shards), MAX_FAILED_SHARDS_IN_ROW):
                        raise DataSourceError(f"data.shards: source {source.pattern!r} failed: {failed} of its "
                                              f"shards in a row could not be read; last: {e}") from None
            except (BadSampleError, OSError) as e:
                pos["skipped"] += 1
                warn((shard, "rest"), f"rest of shard {shard}: {e}")
            if source is not None and good:
                failed_in_row[source.pattern] = 0
            empty_in_row = 0 if good else empty_in_row + 1
            if empty_in_row >= MAX_EMPTY_SHARDS_IN_ROW:
                raise RuntimeError(f"stream {stream}: {empty_in_row} shards in a row gave no usable sample "
                                   f"(last: {shard}); check data.shards")
            pos.update(index=pos["index"] + 1, offset=0)

    # ------------------------------------------------------------------ batching
    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        stream = self.stream_id(worker)
        position = self.start.get("positions", {}).get(str(stream)) or {"epoch": 0, "index": 0, "offset": 0, "skipped": 0}
        if self.group_by_length > 0:
            yield from self._grouped_batches(stream, position)
            return
        if "window_done" in position:
            position = _after_window(position, "data.group_by_length was switched off")
        batch = []
        for sample in self.samples(stream, position):
            batch.append(sample)
            if len(batch) == self.batch_size:
                yield self._batch(batch, stream, batch[-1][3])
                batch = []

    def _grouped_batches(self, stream: int, position: dict) -> Iterator[dict]:
        shape = [self.group_by_length, self.batch_size]
        if "window_done" in position and position.get("window_shape") != shape:
            position = _after_window(position, f"the grouping window changed from (batches, batch size) "
                                                f"{position.get('window_shape')} to {shape}")
        window_start = _window_start(position)
        done = int(position.get("window_done", 0))  # batches of this window consumed before a resume
        samples = self.samples(stream, window_start)
        size = self.group_by_length * self.batch_size
        while True:
            window = [next(samples) for _ in range(size)]
            # Seeded by where the window starts, so a resume regroups it identically.
            rng = random.Random(f"{self.seed}:{stream}:group:{window_start['epoch']}:{window_start['index']}:"
                                f"{window_start['offset']}")
            batches = length_grouped_batches([len(caption) for _, caption, _, _ in window], self.batch_size, rng)
            window_end = window[-1][3]
            for k in range(done, len(batches)):
                last = k + 1 == len(batches)
                # Inside a window: where it starts (to regroup it), how far it reaches (so a
                # rescaled resume starts past it) and its shape (to notice a changed config).
                pos = window_end if last else {**window_start, "window_done": k + 1, "window_shape": shape,
                                               "window_end": _window_start(window_end)}
                yield self._batch([window[i] for i in batches[k]], stream, pos)
            window_start, done = dict(window_end), 0

    def _batch(self, samples: list, stream: int, position: dict) -> dict:
        images = torch.stack([image for image, _, _, _ in samples])
        if not self.features:
            images = normalize_images(images)
        return {"images": images, "answers": [caption for _, caption, _, _ in samples],
                "keys": [key for _, _, key, _ in samples], "stream": stream, "position": dict(position)}


def _window_start(position: dict) -> dict:
    return {k: v for k, v in position.items() if not k.startswith("window_")}


def _after_window(position: dict, why: str) -> dict:
    """A position inside a grouping window that can no longer be regrouped as it was: continue
    after the window (its unconsumed rest is skipped, nothing is read twice)."""
    end = position.get("window_end")
    log.warning("%s since the checkpoint: the stream continues after its interrupted window; up to one "
                "window of samples is skipped", why)
    return _window_start(end) if end else _window_start(position)


def length_grouped_batches(lengths: List[int], batch_size: int, rng: random.Random) -> List[List[int]]:
    """Indices of a window cut into batches of similar length, the batches in random order.

    Length is the caption's character count: the stream has no tokenizer, and characters track
    tokens closely enough to group by (tools/bench_padding.py measures the padding left)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


class BatchLoader:
    """Iterates batches and tracks the data position of what has been consumed."""

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool):
        self.stream = stream
        self.positions: Dict[str, dict] = dict(stream.start.get("positions", {}))
        self.batches = int(stream.start.get("batches", 0))
        loader = DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                            persistent_workers=False, prefetch_factor=4 if num_workers > 0 else None,
                            worker_init_fn=_ignore_stop_signals if num_workers > 0 else None)
        # A worker inherits the rank's handlers until its worker_init_fn runs, and a USR1/TERM in that
        # window would kill it. Blocked during the fork, the signal waits: the rank gets it right after,
        # the worker discards it once it ignores it.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self._iter = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def close(self) -> None:
        """Stop the DataLoader workers now (the rank may leave with os._exit, which skips their shutdown)."""
        shutdown = getattr(self._iter, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()

    def __next__(self) -> dict:
        try:
            batch = next(self._iter)
        except DataSourceError as e:
            # From a worker, torch re-raises it with the worker's whole traceback as the message;
            # the user needs the cause: the original message, the traceback's last line.
            last = str(e).strip().splitlines()[-1]
            prefix = f"{DataSourceError.__module__}.{DataSourceError.__name__}: "
            raise DataSourceError(last[len(prefix):] if last.startswith(prefix) else str(e)) from None
        self.positions[str(batch["stream"])] = batch["position"]
        self.batches += 1
        return batch

    def __iter__(self):
        return self

    @property
    def skipped(self) -> int:
        return sum(p.get("skipped", 0) for p in self.positions.values())

    @property
    def skipped_shards(self) -> int:
        """Shards skipped because their source failed, in the streams' consumed positions."""
        return sum(p.get("skipped_shards", 0) for p in self.positions.values())

    def state_dict(self) -> dict:
        return {"positions": dict(self.positions), "batches": self.batches,
                "num_workers": self.stream.num_workers, "world_size": self.stream.world_size}


def rescale_data_state(old_states: List[dict], rank: int, world_size: int, num_workers: int,
                       resample: bool) -> dict:
    """The data position of `rank` when resuming with another world size or data.num_workers.

    Streams are numbered rank x workers + worker, so a new layout maps new stream ids onto
    content other streams already read; carrying positions over by id would replay data. Instead
    every new stream starts from a fresh, deterministic position derived from what the old run
    consumed (all old ranks' positions, so every new rank computes the same answer):

    - data.resample=true: a stream's shard picks are a pure function of (seed, stream, pick
      index). Every new stream starts at pick index 1 + the largest pick index any old stream had
      reached, offset 0: no (stream, pick) pair is read twice, so nothing is replayed. The unread
      rest of the shard each old stream was in is left behind (at most one shard per old stream;
      with resampling every shard can be drawn again later, so no sample is lost for good).
    - data.resample=false (passes over the shards): the split of a pass depends on the number of
      streams, so the new streams start the next pass (1 + the latest pass any old stream was
      in); the rest of the interrupted pass is skipped and a warning says so.

    Bad-sample counts are summed into the new stream 0 of rank 0, so `skipped` stays cumulative.
    """
    workers = max(1, num_workers)
    # A position inside a grouping window has already consumed samples up to the window's end.
    positions = [p.get("window_end", p) for s in old_states for p in s.get("positions", {}).values()]
    skipped = sum(p.get("skipped", 0) for p in positions)
    skipped_shards = sum(p.get("skipped_shards", 0) for p in positions)
    if resample:
        start = {"epoch": 0, "index": 1 + max((p["index"] for p in positions), default=-1), "offset": 0}
    else:
        epoch = 1 + max((p["epoch"] for p in positions), default=-1)
        start = {"epoch": epoch, "index": 0, "offset": 0}
        if positions:
            log.warning("data.resample=false and the stream layout changed: streams restart at pass %d; "
                        "the rest of the interrupted pass is skipped", epoch)
    new = {}
    for role in range(workers):
        stream = rank * workers + role
        new[str(stream)] = {**start, "skipped": skipped if stream == 0 else 0}
        if stream == 0 and skipped_shards:  # absent means 0 (checkpoints from before remote shards)
            new[str(stream)]["skipped_shards"] = skipped_shards
    return {"positions": new, "batches": 0, "num_workers": workers, "world_size": world_size}


def build_batch_loader(data: DataConfig, sources: List[Source], *, rank: int, world_size: int, seed: int,
                       batch_size: int, image_size: int, start: Optional[dict] = None,
                       pin_memory: bool = False) -> BatchLoader:
    """The batches of `rank` from `sources` (see `resolve_sources`) as `data` configures them."""
    num_workers = data.num_workers
    if start and start.get("num_workers", num_workers or 1) != max(1, num_workers):
        log.warning("data.num_workers changed since the checkpoint (%s -> %s): streams restart from their "
                    "recorded positions where they exist", start.get("num_workers"), num_workers)
    stream = ShardStream(sources, rank=rank, world_size=world_size, num_workers=num_workers, seed=seed,
                         resample=data.resample, batch_size=batch_size, image_size=image_size,
                         clean_captions=data.clean_captions, max_caption_words=data.max_caption_words, start=start,
                         features=data.features, group_by_length=data.group_by_length, retries=data.retries,
                         retry_backoff_s=data.retry_backoff_s)
    return BatchLoader(stream, num_workers, pin_memory)
