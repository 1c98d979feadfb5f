"""Training step throughput: an original-style step vs mgpt4_dist's, side by side in one run.

    python tools/bench_train.py [--steps 15] [--nproc 2] [--variants zero2 zero2-features] [--write]
    python tools/bench_train.py --preset 7b --nproc 1 --precision bf16 --micro-batch 32 --peak-flops 989e12  # GPU

(a) original-style: the original MiniGPT-4's step reproduced on the same modules and data:
    plain DDP (find_unused_parameters=True) with the whole model on every rank, the LLM called
    with an attention mask and labels so that logits for every position are materialised in
    float and the loss is HF's, AdamW from torch. Autocast is off on CPU, as in the original.
(b) mgpt4_dist: `mgpt4-train` with each engine variant (same model, data, batch, precision).
Both run the same model on generated shards under torchrun: the "small" preset on CPU (bigger than
tiny: ViT 256x4, Q-Former 256x2, LLaMA 512x4 with a 32000-token vocabulary, gloo) or, on a GPU,
the "7b" preset: EVA ViT-g/14, the BLIP-2 Q-Former and a Vicuna-7B-shaped LLaMA (4096 x 32 layers)
with random weights (NCCL). On a GPU the original-style step autocasts as the original does (frozen
towers in the half precision, llama_proj in fp32) and MFU is reported for both, from the same
FLOPs formula (`mgpt4_dist/flops.py`) and `--peak-flops`.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "mgpt4_dist", "configs", "tiny_stage1.yaml")

# The 7b preset keeps the config's ViT-g / Q-Former defaults and a Vicuna-7B-shaped LLM.
PRESET_7B = ["model.vit.embed_dim=1408", "model.vit.depth=39", "model.vit.num_heads=16",
             "model.qformer.hidden_size=768", "model.qformer.num_layers=12", "model.qformer.num_heads=12",
             "model.qformer.intermediate_size=3072"]
SMALL = ["model.vit.embed_dim=256", "model.vit.depth=4", "model.vit.num_heads=4", "model.qformer.hidden_size=256",
         "model.qformer.num_layers=2", "model.qformer.num_heads=4", "model.qformer.intermediate_size=512"]

VARIANTS = {
    "zero0": ["parallel.zero_stage=0"],
    "zero1": ["parallel.zero_stage=1"],
    "zero2": ["parallel.zero_stage=2"],
    "zero2-offload": ["parallel.zero_stage=2", "parallel.offload=optimizer"],
    "zero3": ["parallel.zero_stage=3"],
    "zero3-offload": ["parallel.zero_stage=3", "parallel.offload=optimizer"],
    "fsdp": ["parallel.backend=fsdp"],
    "zero2-features": ["parallel.zero_stage=2", "data.features=true"],
    "zero2-compile": ["parallel.zero_stage=2", "train.compile=true"],
    "zero2-flash": ["parallel.zero_stage=2", "model.attn_impl=flash"],  # needs flash-attn on CUDA
    "zero2-compile-features": ["parallel.zero_stage=2", "train.compile=true", "data.features=true"],
    # the LLM's last layer over every position, as before model.trim_last_layer (default true)
    "zero2-untrimmed": ["parallel.zero_stage=2", "model.trim_last_layer=false"],
    # the padded batch through the whole LLM, as before model.padding_free (default true)
    "zero2-padded": ["parallel.zero_stage=2", "model.padding_free=false"],
    # neither: the step before both options (the GPU tables' step)
    "zero2-plain": ["parallel.zero_stage=2", "model.padding_free=false", "model.trim_last_layer=false"],
}


def build_llm_7b(out_dir: str) -> str:
    """A random Vicuna-7B-shaped LLaMA folder in bf16, initialised on the GPU (seconds, not minutes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=2048,
                         rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    del model
    torch.cuda.empty_cache()
    return out_dir


def build_assets(root: str, samples: int, preset: str = "small") -> dict:
    from mgpt4_dist.tiny.assets import build_tiny_llm, build_tiny_tokenizer
    from mgpt4_dist.data.shards import write_shards
    from mgpt4_dist.tiny.scenes import synthetic_samples

    tok = build_tiny_tokenizer(os.path.join(root, "tok"))
    if preset == "7b":
        llm = build_llm_7b(os.path.join(root, "llm"))
    else:
        llm = build_tiny_llm(os.path.join(root, "llm"), 32000, hidden_size=512, num_layers=4, num_heads=8,
                             intermediate_size=1376)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(tok, name)):
            with open(os.path.join(tok, name), "rb") as src, open(os.path.join(llm, name), "wb") as dst:
                dst.write(src.read())
    write_shards(synthetic_samples(samples, seed=0, image_size=256), os.path.join(root, "shards"),
                 samples_per_shard=64, progress=False)
    return {"llm": llm, "shards": os.path.join(root, "shards", "*.tar")}


def torchrun(nproc: int, args: list, env: dict) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--nproc-per-node", str(nproc),
           "--master-port", str(port)] + args
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


# --------------------------------------------------------------------------- (a) original-style worker

def original_worker(overrides: list, steps: int, warmup: int, out: str, peak_flops: float) -> None:
    import dataclasses

    import torch
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from mgpt4_dist import dist
    from mgpt4_dist.config import load_config, shard_sources
    from mgpt4_dist.config import precision_dtype
    from mgpt4_dist.data.pipeline import build_batch_loader, resolve_sources
    from mgpt4_dist.flops import FlopsModel
    from mgpt4_dist.models.llm import load_tokenizer
    from mgpt4_dist.models.minigpt4 import build_minigpt4
    from mgpt4_dist.models.sequence import SequenceBuilder

    cfg = load_config(TINY, overrides)
    info, device = dist.init_distributed()
    half = None if cfg.train.precision == "fp32" else precision_dtype(cfg.train.precision)
    on_gpu = device.type == "cuda"
    # As the original on a GPU: frozen towers and LLM in the half precision, llama_proj in fp32,
    # the forward under autocast. On CPU the original runs fp32 without autocast.
    model = build_minigpt4(cfg.model, seed=cfg.train.seed, dtype=half if (on_gpu and half) else torch.float32)
    model.llama_proj.float()
    model.to(device)
    flops = FlopsModel.from_model(model)

    class OriginalStep(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images, text):
            embeds = self.inner.embed_sequence(self.inner.encode_image(images), text)
            return self.inner.llm(inputs_embeds=embeds, attention_mask=text.attention_mask_BT,
                                  labels=text.labels_BT).loss

    ddp = DistributedDataParallel(OriginalStep(model), find_unused_parameters=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05)
    build = SequenceBuilder(load_tokenizer(cfg.model.llm_path), model.num_image_tokens, cfg.data.max_txt_len,
                            cfg.data.end_sym)
    data = dataclasses.replace(cfg.data, resample=True, clean_captions=True, max_caption_words=50)
    loader = build_batch_loader(data, resolve_sources([(s.pattern, s.weight) for s in shard_sources(cfg.data)]),
                                rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                                batch_size=cfg.train.micro_batch_size, image_size=cfg.model.vit.img_size)
    times, step_flops, step_tokens = [], [], []
    autocast = torch.autocast("cuda", dtype=half) if (on_gpu and half) else torch.autocast("cpu", enabled=False)
    for step in range(steps):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        batch = next(loader)
        text = build(batch["answers"])
        images = batch["images"].to(device)
        with autocast:
            loss = ddp(images.to(half) if (on_gpu and half) else images, text.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.llama_proj.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # the original logs the loss every step; this also waits for the GPU
        times.append(time.perf_counter() - start)
        step_flops.append(flops.step(len(batch["answers"]), text.input_ids_BT.shape[1], text.num_scored_tokens))
        step_tokens.append(text.num_scored_tokens)
    mem = torch.cuda.max_memory_allocated(device) if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mem = dist.all_reduce_max(mem)
    # Per device, as mgpt4-train logs them: this rank's FLOP/s; tokens summed over ranks.
    achieved = sum(step_flops[warmup:]) / sum(times[warmup:])
    tokens_per_s = dist.all_reduce_sum(sum(step_tokens[warmup:])) / sum(times[warmup:])
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump({"step_times": times[warmup:], "max_mem_bytes": mem, "flops_per_s": achieved,
                       "tokens_per_s": tokens_per_s, "mfu": achieved / peak_flops if peak_flops else None}, f)
    dist.cleanup()


# --------------------------------------------------------------------------- driver

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=["zero2", "zero2-features"], choices=sorted(VARIANTS))
    p.add_argument("--preset", choices=["small", "7b"], default="small", help="7b needs a GPU")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--peak-flops", type=float, default=0.0, help="device peak FLOP/s for MFU (H100 bf16: 989e12)")
    p.add_argument("--samples", type=int, default=256, help="generated image-text pairs")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--overrides", nargs="*", default=[], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "original":
        return original_worker(args.overrides, args.steps, args.warmup, args.out, args.peak_flops)

    from bench_md import machine_line, write_section

    import torch

    gpu = torch.cuda.is_available()
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))}
    with tempfile.TemporaryDirectory() as tmp:
        assets = build_assets(tmp, samples=args.samples, preset=args.preset)
        workers = 1 if args.preset == "small" else 6
        base = (SMALL if args.preset == "small" else PRESET_7B) + [
            f"model.llm_path={assets['llm']}", f"data.shards=[{assets['shards']}]",
            f"train.micro_batch_size={args.micro_batch}", f"data.num_workers={workers}",
            f"train.precision={args.precision}", f"logging.peak_flops={args.peak_flops}",
            "model.allow_random_weights=true"]  # random towers of the benchmark's shapes
        global_batch = args.micro_batch * args.nproc
        rows = []
        out = os.path.join(tmp, "original.json")
        torchrun(args.nproc, [os.path.abspath(__file__), "--worker", "original", "--steps", str(args.steps),
                              "--warmup", str(args.warmup), "--peak-flops", str(args.peak_flops), "--out", out,
                              "--overrides", *base], env)
        ref = json.load(open(out))
        ref_rate = global_batch * len(ref["step_times"]) / sum(ref["step_times"])
        rows.append(("original-style (DDP, full logits)", ref_rate, ref["tokens_per_s"], ref["max_mem_bytes"],
                     ref.get("mfu"), ref["flops_per_s"]))
        print(f"original-style: {ref_rate:.1f} samples/s", flush=True)
        for variant in args.variants:
            extra = list(VARIANTS[variant])
            if "data.features=true" in extra:
                from mgpt4_dist.cache_features import cache_features
                from mgpt4_dist.config import load_config

                feats = os.path.join(tmp, "features")
                if not os.path.isdir(feats):
                    cache_features(load_config(TINY, base), feats,
                                   store_dtype="fp32" if args.precision == "fp32" else "bf16", progress=False,
                                   device="cuda" if gpu else "cpu")
                extra += [f"data.shards=[{feats}/*.tar]"]
            run_dir = os.path.join(tmp, variant)
            torchrun(args.nproc, ["-m", "mgpt4_dist.train", "--config", TINY, *base, *extra, f"run_dir={run_dir}",
                                  f"train.max_steps={args.steps}", "train.log_every=1", "checkpoint.every_steps=100000",
                                  "logging.tensorboard=false", "logging.progress=false"], env)
            metrics = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))][args.warmup:]
            rate = global_batch * len(metrics) / sum(m["step_time_s"] for m in metrics)
            seconds = sum(m["step_time_s"] for m in metrics)
            tokens_per_s = sum(m["tokens_per_s"] * m["step_time_s"] for m in metrics) / seconds
            flops_per_s = sum(m["flops_per_s"] * m["step_time_s"] for m in metrics) / seconds
            rows.append((f"mgpt4_dist {variant}", rate, tokens_per_s, max(m["max_mem_bytes"] for m in metrics),
                         flops_per_s / args.peak_flops if args.peak_flops else None, flops_per_s))
            print(f"{variant}: {rate:.1f} samples/s; per step: time "
                  f"{[round(m['step_time_s'], 3) for m in metrics]}, data wait {[round(m['data_wait_s'], 3) for m in metrics]}",
                  flush=True)
    command = (f"python tools/bench_train.py --preset {args.preset} --precision {args.precision} --steps {args.steps} "
               f"--warmup {args.warmup} --nproc {args.nproc} --micro-batch {args.micro_batch} "
               f"--variants {' '.join(args.variants)}" + (f" --peak-flops {args.peak_flops:g}" if args.peak_flops else "")
               + " --write")
    mem_name = "peak GPU memory per rank" if gpu else "peak RSS per rank"
    lines = [f"| step | samples/s | answer tokens/s | ratio to original-style | {mem_name} | MFU (achieved FLOP/s per rank) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {name} | {rate:.1f} | {tokens:.0f} | {rate / ref_rate:.2f}x | {mem / 2**30:.2f} GiB | "
              f"{'' if mfu is None else f'{100 * mfu:.1f} % '}({flops / 1e9:.1f} GFLOP/s) |"
              for name, rate, tokens, mem, mfu, flops in rows]
    preset = ("small preset (ViT 256x4, Q-Former 256x2, LLaMA 512x4, vocab 32000)" if args.preset == "small" else
              "7b preset (EVA ViT-g/14, BLIP-2 Q-Former, Vicuna-7B-shaped LLaMA 4096x32, random weights)")
    body = (f"`{command}`\n\n{machine_line()}; {args.nproc} processes ({'nccl' if gpu else 'gloo'}), "
            f"{args.precision}, micro batch {args.micro_batch} per rank, {preset}, mean over steps "
            f"{args.warmup + 1}..{args.steps}.\n\n" + "\n".join(lines))
    print(body)
    if args.write:
        write_section("Extra: training step vs a re-created original-style step" + (" (GPU)" if gpu else ""), body)


if __name__ == "__main__":
    main()
