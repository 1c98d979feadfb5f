"""Stage-1 data pipeline throughput vs the decode floor, and its scaling with DataLoader workers.

    python tools/bench_data.py [--samples 2000] [--image-size 384] [--write]

The floor is the bare work every sample needs: PIL decode + square bicubic resize to 224 + CLIP
normalization (per batch, as the pipeline does it) of the same JPEGs in a loop, on one thread. The pipeline adds tar reading, caption
cleaning, batching and worker hand-off; per worker it should stay near the floor. The same shards
are also read over local HTTP from `python -m http.server` (a plain server without Range support,
started on a free port): the remote-shard stream (`mgpt4_dist.data.remote`) against local files.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_md import machine_line, write_section  # noqa: E402

from mgpt4_dist.config import DataConfig
from mgpt4_dist.data.pipeline import build_batch_loader, resolve_sources
from mgpt4_dist.data.shards import read_shard_samples, write_shards
from mgpt4_dist.tiny.scenes import synthetic_samples
from mgpt4_dist.data.transforms import build_resize_transform, decode_image, normalize_images


def floor(jpegs: list, image_size: int, batch_size: int) -> float:
    """The same arithmetic as the pipeline at its cheapest: decode + resize per image, CLIP
    normalization per batch, one thread (DataLoader workers run torch single-threaded too)."""
    resize = build_resize_transform(image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for i in range(0, len(jpegs), batch_size):
            normalize_images(torch.stack([resize(decode_image(data)) for data in jpegs[i:i + batch_size]]))
        return len(jpegs) / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)


def pipeline(pattern: str, workers: int, batches: int, batch_size: int, image_size: int) -> float:
    data = DataConfig(num_workers=workers, resample=True, clean_captions=True, max_caption_words=50)
    loader = build_batch_loader(data, resolve_sources([(pattern, 1.0)]), rank=0, world_size=1, seed=0,
                                batch_size=batch_size, image_size=image_size)
    next(loader)  # workers started, first batch in hand
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_size / (time.perf_counter() - start)


def http_server(root: str):
    """`python -m http.server` on a free port serving `root`: (process, base URL)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", root],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(base + "/", timeout=1).close()
            return proc, base
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("python -m http.server did not start")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=2000)
    p.add_argument("--image-size", type=int, default=384, help="side of the generated JPEGs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--repeats", type=int, default=3, help="measure each row this many times, keep the best")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(synthetic_samples(args.samples, seed=0, image_size=args.image_size), tmp,
                              samples_per_shard=250, progress=False)
        jpegs = [raw["jpg"] for raw in read_shard_samples(shards[0])]
        # Best of --repeats for every row: the first passes pay for cold caches and clock ramp-up,
        # and a shared machine only ever makes a rate lower.
        floor_rate = max(floor(jpegs, 224, args.batch_size) for _ in range(args.repeats))
        rows = [f"| decode floor (1 core, no pipeline) | - | {floor_rate:.0f} | 100 % |"]
        batches = max(4, args.samples // args.batch_size // 2)
        for workers in args.workers:
            rate = max(pipeline(os.path.join(tmp, "*.tar"), workers, batches, args.batch_size, 224)
                       for _ in range(args.repeats))
            per_worker = rate / max(workers, 1)
            rows.append(f"| pipeline, {workers} DataLoader workers | {rate:.0f} | {per_worker:.0f} | "
                        f"{100 * per_worker / floor_rate:.0f} % |")
        server, base = http_server(tmp)
        try:
            names = sorted(os.path.basename(s) for s in shards)
            pattern = f"{base}/{names[0]}" if len(names) == 1 else f"{base}/{{{','.join(names)}}}"
            for workers in args.workers:
                rate = max(pipeline(pattern, workers, batches, args.batch_size, 224) for _ in range(args.repeats))
                per_worker = rate / max(workers, 1)
                rows.append(f"| pipeline over local HTTP (`python -m http.server`), {workers} DataLoader workers | "
                            f"{rate:.0f} | {per_worker:.0f} | {100 * per_worker / floor_rate:.0f} % |")
        finally:
            server.terminate()
            server.wait()
    command = (f"python tools/bench_data.py --samples {args.samples} --image-size {args.image_size} "
               f"--repeats {args.repeats} --write")
    body = (f"`{command}`\n\n{machine_line()}; {args.image_size}x{args.image_size} JPEGs resized to 224, "
            f"batch {args.batch_size}, best of {args.repeats}.\n\n| what | samples/s | samples/s per worker | of the floor |\n"
            "| --- | --- | --- | --- |\n" + "\n".join(rows))
    print(body)
    if args.write:
        write_section("Data pipeline", body)


if __name__ == "__main__":
    main()
