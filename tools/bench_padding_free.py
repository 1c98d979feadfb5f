"""The LLM's loss forward + backward with `model.padding_free` on and off, side by side in one run.

    python tools/bench_padding_free.py [--preset llm] [--rounds 3] [--write]

Same weights (tools/bench_original.py's preset files), same batches, fp32 CPU, 2 torch threads:
llama_proj + LLM forward and backward to llama_proj from fixed vision features (the towers are
the same either way, so they are left out), the loss checked equal on both sides. Two caption sets:
the benchmarks' synthetic captions (rows differ by a few tokens), and the same captions with a
seeded 0-12 extra words each, cut at max_txt_len like web captions (rows differ a lot).
Rounds alternate (on, off, then off, on, ...) against the machine's drift.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "mgpt4_dist", "configs", "tiny_stage1.yaml")
FILLER = "near a small old wooden table under the bright light of a quiet room by the window".split()


def spread(captions: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [c + " " + " ".join(rng.choice(FILLER) for _ in range(rng.randint(0, 12))) for c in captions]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="llm", help="a tools/bench_original.py size preset")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    from bench_md import machine_line, write_section
    from bench_original import NUM_QUERY, PRESETS, build_assets, mgpt4_overrides, preset_label

    from mgpt4_dist.config import load_config
    from mgpt4_dist.models.llm import load_tokenizer
    from mgpt4_dist.models.minigpt4 import build_minigpt4
    from mgpt4_dist.models.sequence import SequenceBuilder
    from mgpt4_dist.tiny.scenes import synthetic_samples

    torch.set_num_threads(args.threads)
    samples = args.batch * args.batches
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_assets(os.path.join(tmp, args.preset), args.preset, samples)
        base = mgpt4_overrides(args.preset, assets)
        models = {on: build_minigpt4(load_config(TINY, base + [f"model.padding_free={on}"]).model, seed=0)
                  for on in (True, False)}
        tok = load_tokenizer(assets["llm"])
    cfg = load_config(TINY, base)
    build = SequenceBuilder(tok, NUM_QUERY, cfg.data.max_txt_len, cfg.data.end_sym)
    features = torch.randn(args.batch, NUM_QUERY, PRESETS[args.preset]["qformer"][0],
                           generator=torch.Generator().manual_seed(0))
    captions = [c for _, _, c in synthetic_samples(samples, seed=0, image_size=8)]
    rows = []
    for name, caps in (("benchmark captions", captions), ("captions + 0-12 words", spread(captions, 1))):
        texts = [build(caps[i:i + args.batch]) for i in range(0, samples, args.batch)]
        fill = sum(sum(t.row_lengths) for t in texts) / sum(t.input_ids_BT.numel() for t in texts)
        seconds, losses = {True: [], False: []}, {True: [], False: []}
        for r in range(args.rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                model = models[on]
                start = time.perf_counter()
                for text in texts:
                    model.zero_grad(set_to_none=True)
                    loss = model.loss_terms_of_embeds(model.llama_proj(features), text).loss
                    loss.backward()
                    losses[on].append(loss.item())
                seconds[on].append((time.perf_counter() - start) / len(texts))
                print(f"[{name}] round {r + 1} padding_free={on}: {seconds[on][-1]:.3f} s per batch", flush=True)
        diff = max(abs(a - b) / abs(b) for a, b in zip(losses[True], losses[False]))
        on, off = statistics.mean(seconds[True]), statistics.mean(seconds[False])
        per_round = lambda xs: " / ".join(f"{x:.3f}" for x in xs)  # noqa: E731
        rows.append(f"| {name} | {100 * fill:.0f} % | {off:.3f} ({per_round(seconds[False])}) | "
                    f"{on:.3f} ({per_round(seconds[True])}) | {off / on:.2f}x | {diff:.1e} |")
    command = "python tools/bench_padding_free.py" + (f" --preset {args.preset}" if args.preset != "llm" else "") \
        + (f" --rounds {args.rounds}" if args.rounds != 3 else "") + " --write"
    body = (f"`{command}`\n\n{machine_line()}; {args.threads} torch threads, fp32, preset `{args.preset}`: "
            f"{preset_label(args.preset)}; {args.batches} batches of {args.batch}, stage 1, {args.rounds} "
            "alternating rounds. Seconds per batch: llama_proj + LLM loss forward and backward from fixed "
            "vision features.\n\n"
            "| captions | real share of the padded batch | padded (`model.padding_free=false`) | "
            "padding-free (default) | speed-up | loss rel. diff |\n| --- | --- | --- | --- | --- | --- |\n"
            + "\n".join(rows) + "\n")
    print(body)
    if args.write:
        write_section("LLM loss forward: padding-free vs padded (CPU)", body)
    print(f"bench_padding_free: {len(rows)} caption sets x 2 settings x {args.rounds} rounds"
          + ("; table written to BENCHMARKS.md" if args.write else ""))


if __name__ == "__main__":
    main()
