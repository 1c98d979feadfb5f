"""How much of a stage-1 step is padding, and whether length-grouped batching would pay.

    python tools/bench_padding.py --shards 'data/laion/{00000..00009}.tar' --llm weights/vicuna-7b [--write]
    python tools/bench_padding.py            # synthetic captions and the tiny tokenizer

The original pads each batch to its longest answer (after the max_txt_len cut). The sequence is
[BOS][32 image tokens][answer][padding], so padding only touches the LLM's share of the step;
the FLOPs column weighs it with a Vicuna-7B-shaped step (ViT-g + Q-Former + 7B LLM, no weight
gradients for frozen parts) from mgpt4_dist/flops.py.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mgpt4_dist.data.samples import raw_caption
from mgpt4_dist.data.shards import read_shard_samples, write_shards
from mgpt4_dist.tiny.scenes import synthetic_samples
from mgpt4_dist.data.text import blip_caption
from mgpt4_dist.flops import FlopsModel

VICUNA7B_STEP = FlopsModel(vit_tokens=257, vit_width=1408, vit_depth=39, vit_mlp=6144, patch_pixels=3 * 14 * 14,
                           has_qformer=True, queries=32, q_hidden=768, q_layers=12, q_intermediate=3072,
                           q_cross_layers=6, proj_in=768, llm_hidden=4096, llm_layers=32, llm_intermediate=11008,
                           llm_kv_hidden=4096, vocab=32000)


def batch_cost(lengths: list) -> tuple:
    """(padded LLM tokens, total LLM tokens, FLOPs, FLOPs without padding) of one batch."""
    width = max(lengths)
    seq = 1 + 32 + width
    padded = sum(width - n for n in lengths)
    flops = VICUNA7B_STEP.step(len(lengths), seq, sum(lengths))
    ideal = sum(VICUNA7B_STEP.step(1, 1 + 32 + n, n) for n in lengths)
    return padded, seq * len(lengths), flops, ideal


def measure(lengths: list, chars: list, batch: int, window: int) -> tuple:
    """Padded shares with batches in stream order (window 0) or as `data.group_by_length=window`
    forms them: the pipeline's own grouping, keyed on caption characters, costed in tokens."""
    from mgpt4_dist.data.pipeline import length_grouped_batches

    rng = random.Random(0)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    if window:
        size = window * batch
        for start in range(0, len(order) - size + 1, size):
            chunk = order[start:start + size]
            batches += [[chunk[i] for i in b] for b in length_grouped_batches([chars[j] for j in chunk], batch, rng)]
    else:
        batches = [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]
    totals = [batch_cost([lengths[i] for i in b]) for b in batches]
    padded, tokens, flops, ideal = (sum(t[i] for t in totals) for i in range(4))
    return padded / tokens, 1 - ideal / flops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", help="shard pattern with real captions (default: synthetic captions)")
    p.add_argument("--llm", help="LLaMA folder for its tokenizer (default: the tiny tokenizer)")
    p.add_argument("--max-txt-len", type=int, default=32)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--write", action="store_true")
    args = p.parse_args()
    from mgpt4_dist.data.shards import expand_shard_pattern
    from mgpt4_dist.models.llm import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        if args.llm:
            tok = load_tokenizer(args.llm)
        else:
            from mgpt4_dist.tiny.assets import build_tiny_tokenizer

            tok = load_tokenizer(build_tiny_tokenizer(os.path.join(tmp, "tok")))
        if args.shards:
            captions = []
            for shard in expand_shard_pattern(args.shards):
                for raw in read_shard_samples(shard):
                    try:
                        captions.append(raw_caption(raw, shard))
                    except ValueError:
                        continue
                    if len(captions) >= args.samples:
                        break
            source = args.shards
        else:
            captions = [c for _, _, c in synthetic_samples(args.samples, seed=0, image_size=8)]
            source = "synthetic captions (tools/bench_padding.py default)"
    answers = [blip_caption(c) + "\n" for c in captions]
    ids = tok(answers, add_special_tokens=False, truncation=True, max_length=args.max_txt_len)["input_ids"]
    lengths = [len(i) for i in ids]
    chars = [len(a) for a in answers]
    rows = []
    for window in (0, 4, 16, 64):
        pad_tokens, pad_flops = measure(lengths, chars, args.batch, window)
        label = f"`data.group_by_length={window}`" + (" (the original: random)" if window == 0 else "")
        rows.append(f"| {label} | {100 * pad_tokens:.1f} % | {100 * pad_flops:.2f} % |")
    mean = sum(lengths) / len(lengths)
    body = (f"`python tools/bench_padding.py{' --shards ' + repr(args.shards) if args.shards else ''} --write`\n\n"
            f"{len(lengths)} captions from {source}; answer tokens mean {mean:.1f}, max {max(lengths)} "
            f"(max_txt_len {args.max_txt_len}), batch {args.batch}.\n\n"
            "| batching | padded share of LLM tokens | padded share of a Vicuna-7B step's FLOPs |\n| --- | --- | --- |\n"
            + "\n".join(rows) + "\n\n"
            "Padding only costs LLM FLOPs, so the step share is below the token share. The FLOPs column is "
            "the padded step (`model.padding_free=false`, as the original runs it); with `model.padding_free` "
            "(the default) padding keeps only its share of attention, the projections and MLP skip it. Grouping is opt-in "
            "(`data.group_by_length`, windows in batches, sorted by caption characters): it changes which "
            "samples share a batch, which the original does not do, and its window holds "
            "group x batch resized uint8 images per DataLoader worker (16 x 64 at 224 px: 150 MB). "
            "Longer, more varied answers (stage 2, real web captions cut at max_txt_len) pad more; "
            "run the tool on your shards with `--shards` before choosing.")
    print(body)
    if args.write:
        from bench_md import write_section

        write_section("Padding waste", body)


if __name__ == "__main__":
    main()
