"""Stage-1 training step: the upstream MiniGPT-4 code itself vs mgpt4_dist, side by side in one run.

    python tools/bench_original.py --upstream /work/upstream/MiniGPT-4 --upstream-python /work/upstream/venv/bin/python --write

Both sides train on the same weight files in the original layouts (an `eva_vit_g.pth`-style ViT
file, a BLIP-2 `{"model": ...}` Q-Former file, a Hugging Face LLaMA folder, a MiniGPT-4 `.pth` with
llama_proj), CPU fp32, the same torch threads, micro batch 8, captions of the same token lengths.

* upstream: Vision-CAIR/MiniGPT-4 at commit d94738a, unchanged, in its own venv. The step is what
  its runner does per iteration (`minigpt4/tasks/base_task.py::_train_inner_loop`): lr schedule,
  `model(samples)["loss"]` (no autocast on CPU: `maybe_autocast` is off there and the runner's amp
  needs CUDA), backward, AdamW (its two weight-decay groups) on llama_proj, zero_grad, `loss.item()`.
  Its images are ready-made tensors: the upstream side pays no data loading at all.
  Two substitutions, both outside the timed step: `create_eva_vit_g` hard-codes ViT-g and downloads
  its file, so the benchmark builds upstream's own `VisionTransformer` at the preset's size and loads
  the ViT file the way that function does; and `BertConfig.from_pretrained("bert-base-uncased")`
  resolves to a local folder (bert-base-uncased's config at the preset's Q-Former size).
* mgpt4_dist: `mgpt4-train` as users run it (one process, the tiny config's defaults: DeepSpeed
  ZeRO-2, 1 DataLoader worker, log every 5 steps, TensorBoard on) on JPEG shards of the same
  captions; `+compile`: the same with `train.compile_towers=true` (compiled at the first, untimed
  step); `+features`: the same on the output of `mgpt4-cache-features`.

Timing is from the outside: the driver stamps each progress line as it arrives ("step N" from the
upstream worker after every step, mgpt4-train's progress line every `train.log_every` steps) and
reports samples/s over the same steps (start-up and warm-up excluded). Runs alternate
(A B C, then C B A, ...) to cancel the machine's drift; the table gives the mean rate and ratio.

The two environments (see BENCHMARKS.md):

    # upstream code at the recorded commit, outside this repository
    git clone https://github.com/Vision-CAIR/MiniGPT-4 /work/upstream/MiniGPT-4
    git -C /work/upstream/MiniGPT-4 checkout d94738a
    # its own venv: the versions its environment.yml pins (transformers 4.30, timm 0.6.13, ...),
    # with the SAME torch build as ours, linked in from our venv rather than installed again
    python3.11 -m venv /work/upstream/venv
    M=$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
    U=/work/upstream/venv/lib/python3.11/site-packages
    for n in torch torch-*.dist-info torchgen functorch torchvision torchvision-*.dist-info torchvision.libs \\
             sympy sympy-*.dist-info mpmath mpmath-*.dist-info networkx networkx-*.dist-info jinja2 jinja2-*.dist-info \\
             markupsafe markupsafe-*.dist-info filelock filelock-*.dist-info fsspec fsspec-*.dist-info \\
             typing_extensions.py typing_extensions-*.dist-info triton triton-*.dist-info cuda nvidia* cuda_* \\
             PIL pillow-*.dist-info pillow.libs; do (cd $M && for m in $n; do ln -s $M/$m $U/$m; done); done
    /work/upstream/venv/bin/pip install "transformers==4.30.*" "tokenizers==0.13.3" "peft==0.2.0" \\
        "accelerate==0.20.3" omegaconf iopath "numpy==1.26.*" sentencepiece "pandas<2.3" \\
        "opencv-python-headless==4.7.0.72" "setuptools<81"  # imported by minigpt4.common / accelerate
    /work/upstream/venv/bin/pip install --no-deps "timm==0.6.13"

Ours is this repository's venv (`pip install -e '.[dev]'`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "mgpt4_dist", "configs", "tiny_stage1.yaml")
UPSTREAM_COMMIT = "d94738a"

# Sizes: (ViT width, depth, heads), (Q-Former width, layers, heads, intermediate), (LLaMA width, layers,
# heads, intermediate). "vit": the frozen ViT is most of the step, as in the real model's CPU profile;
# "llm": the LLaMA forward/backward is.
PRESETS = {
    "vit": {"vit": (384, 6, 6), "qformer": (384, 4, 6, 1536), "llm": (512, 4, 8, 1376)},
    "llm": {"vit": (256, 2, 4), "qformer": (256, 2, 4, 1024), "llm": (1024, 8, 16, 2752)},
}
VOCAB = 32000
NUM_QUERY = 32
IMG = 224


def preset_label(name: str) -> str:
    p = PRESETS[name]
    return (f"ViT {p['vit'][0]}x{p['vit'][1]} / Q-Former {p['qformer'][0]}x{p['qformer'][1]} / "
            f"LLaMA {p['llm'][0]}x{p['llm'][1]} (vocab {VOCAB})")


# --------------------------------------------------------------------------- assets (our venv)

def build_assets(root: str, preset: str, samples: int) -> dict:
    """Weight files in the original layouts, shards, and the caption list, for one preset."""
    import torch

    from mgpt4_dist.tiny.assets import (build_tiny_llm, build_tiny_qformer_checkpoint, build_tiny_tokenizer,
                                   build_tiny_vit_checkpoint)
    from mgpt4_dist.data.shards import write_shards
    from mgpt4_dist.tiny.scenes import synthetic_samples

    p = PRESETS[preset]
    os.makedirs(root, exist_ok=True)
    (vd, vl, vh), (qd, ql, qh, qi), (ld, ll, lh, li) = p["vit"], p["qformer"], p["llm"]
    tok = build_tiny_tokenizer(os.path.join(root, "tok"))
    llm = build_tiny_llm(os.path.join(root, "llm"), VOCAB, hidden_size=ld, num_layers=ll, num_heads=lh,
                         intermediate_size=li)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(tok, name), "rb") as src, open(os.path.join(llm, name), "wb") as dst:
            dst.write(src.read())
    vit = build_tiny_vit_checkpoint(os.path.join(root, "eva_vit_g.pth"), embed_dim=vd, depth=vl, num_heads=vh)
    qformer = build_tiny_qformer_checkpoint(os.path.join(root, "blip2_pretrained.pth"), vision_width=vd,
                                            hidden_size=qd, num_layers=ql, num_heads=qh, intermediate_size=qi,
                                            num_query_tokens=NUM_QUERY)
    gen = torch.Generator().manual_seed(3)
    proj = os.path.join(root, "minigpt4_proj.pth")
    torch.save({"model": {"llama_proj.weight": torch.randn(ld, qd, generator=gen) * 0.02,
                          "llama_proj.bias": torch.zeros(ld)}}, proj)
    # Upstream reads BertConfig.from_pretrained("bert-base-uncased"): bert-base-uncased's config
    # (its published values) at the preset's Q-Former size, in a folder of that name.
    bert = os.path.join(root, "bert-base-uncased")
    os.makedirs(bert, exist_ok=True)
    with open(os.path.join(bert, "config.json"), "w") as f:
        json.dump({"architectures": ["BertForMaskedLM"], "model_type": "bert", "attention_probs_dropout_prob": 0.1,
                   "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": qd, "initializer_range": 0.02,
                   "intermediate_size": qi, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
                   "num_attention_heads": qh, "num_hidden_layers": ql, "pad_token_id": 0, "type_vocab_size": 2,
                   "vocab_size": 30522}, f)
    items = list(synthetic_samples(samples, seed=0, image_size=256))
    shards = os.path.join(root, "shards")
    write_shards(iter(items), shards, samples_per_shard=64, progress=False)
    with open(os.path.join(root, "captions.json"), "w") as f:
        json.dump([caption for _, _, caption in items], f)
    return {"root": root, "llm": llm, "vit": vit, "qformer": qformer, "proj": proj, "shards": shards,
            "captions": os.path.join(root, "captions.json")}


def mgpt4_overrides(preset: str, assets: dict) -> list:
    p = PRESETS[preset]
    (vd, vl, vh), (qd, ql, qh, qi) = p["vit"], p["qformer"]
    return [f"model.vit.embed_dim={vd}", f"model.vit.depth={vl}", f"model.vit.num_heads={vh}",
            f"model.qformer.hidden_size={qd}", f"model.qformer.num_layers={ql}", f"model.qformer.num_heads={qh}",
            f"model.qformer.intermediate_size={qi}", f"model.qformer.num_query_tokens={NUM_QUERY}",
            f"model.vit_checkpoint={assets['vit']}", f"model.qformer_checkpoint={assets['qformer']}",
            f"model.llm_path={assets['llm']}", f"model.proj_checkpoint={assets['proj']}",
            "train.precision=fp32", f"data.shards=[{assets['shards']}/*.tar]"]


# --------------------------------------------------------------------------- upstream worker (upstream venv)

def upstream_worker(args: argparse.Namespace) -> None:
    """Build upstream's MiniGPT4 from the asset files and run its runner's train iteration."""
    import types
    from functools import partial

    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    # minigpt4/__init__.py (and models/__init__.py) import every dataset builder and processor;
    # the model modules need none of them, so the packages are entered without running those files.
    for name in ("minigpt4", "minigpt4.models"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(args.upstream, *name.split("."))]
        sys.modules[name] = pkg
    from minigpt4.common.optims import LinearWarmupCosineLRScheduler
    from minigpt4.models import base_model, eva_vit

    sys.modules["minigpt4.models"].BaseModel = base_model.BaseModel  # what the registry's check imports
    from minigpt4.models.minigpt4 import MiniGPT4
    from minigpt4.processors.blip_processors import BlipCaptionProcessor

    p = PRESETS[args.preset]
    vd, vl, vh = p["vit"]

    def create_vit(img_size=224, drop_path_rate=0.4, use_checkpoint=False, precision="fp16"):
        # upstream's create_eva_vit_g at the preset's size, reading the local file
        model = eva_vit.VisionTransformer(img_size=img_size, patch_size=14, use_mean_pooling=False, embed_dim=vd,
                                          depth=vl, num_heads=vh, mlp_ratio=4.3637, qkv_bias=True,
                                          drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                                          use_checkpoint=use_checkpoint)
        state_dict = torch.load(os.path.join(args.assets, "eva_vit_g.pth"), map_location="cpu", weights_only=True)
        eva_vit.interpolate_pos_embed(model, state_dict)
        model.load_state_dict(state_dict, strict=False)
        if precision == "fp16":
            eva_vit.convert_weights_to_fp16(model)
        return model

    base_model.create_eva_vit_g = create_vit
    os.chdir(args.assets)  # "bert-base-uncased" is the local folder of that name
    model = MiniGPT4(vit_model="eva_clip_g", q_former_model=os.path.join(args.assets, "blip2_pretrained.pth"),
                     img_size=IMG, drop_path_rate=0, use_grad_checkpoint=False, vit_precision="fp32",
                     freeze_vit=True, has_qformer=True, freeze_qformer=True, num_query_token=NUM_QUERY,
                     llama_model=os.path.join(args.assets, "llm"), prompt_path="", max_txt_len=32, end_sym="\n")
    # as MiniGPT4.from_config's `ckpt` (the stage-1 projection), then load_model's CPU cast
    model.load_state_dict(torch.load(os.path.join(args.assets, "minigpt4_proj.pth"), map_location="cpu",
                                     weights_only=True)["model"], strict=False)
    model = model.float()
    model.train()
    # runner_base.optimizer: AdamW, weight decay on matrices only
    wd, no_wd = [], []
    for n, prm in model.named_parameters():
        if prm.requires_grad:
            (no_wd if prm.ndim < 2 or "bias" in n or "ln" in n or "bn" in n else wd).append(prm)
    optimizer = torch.optim.AdamW([{"params": wd, "weight_decay": 0.05}, {"params": no_wd, "weight_decay": 0}],
                                  lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999))
    scheduler = LinearWarmupCosineLRScheduler(optimizer, max_epoch=4, iters_per_epoch=5000, min_lr=8e-5,
                                              init_lr=1e-4, warmup_steps=5000, warmup_start_lr=1e-6)
    text_processor = BlipCaptionProcessor()
    captions = [text_processor(c) for c in json.load(open(args.captions))]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.micro_batch, 3, IMG, IMG, generator=gen)
    print("ready", flush=True)
    for i in range(args.steps):
        start = i * args.micro_batch
        samples = {"image": images, "answer": [captions[(start + k) % len(captions)] for k in range(args.micro_batch)],
                   "epoch": 0, "num_iters_per_epoch": 5000, "iters": i}
        scheduler.step(cur_epoch=0, cur_step=i)
        loss = model(samples)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {i + 1} loss {loss.item():.4f}", flush=True)


# --------------------------------------------------------------------------- driver (our venv)

def timed_run(cmd: list, env: dict, cwd: str, log_path: str) -> dict:
    """Run cmd; stamp every 'step N' line as it arrives; return {step: wall time}."""
    stamps = {}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            now = time.perf_counter()
            log.write(line)
            words = line.split()
            if len(words) >= 2 and words[0] == "step":
                stamps[int(words[1].split("/")[0])] = now
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}); its output: {log_path}\n"
                           + open(log_path).read()[-3000:])
    return stamps


def rate_between(stamps: dict, first: int, last: int, batch: int) -> float:
    return batch * (last - first) / (stamps[last] - stamps[first])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["vit", "llm"])
    p.add_argument("--upstream", default="/work/upstream/MiniGPT-4", help="upstream checkout (commit d94738a)")
    p.add_argument("--upstream-python", default="/work/upstream/venv/bin/python",
                   help="python of the upstream venv (transformers 4.30, timm 0.6.13, our torch)")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides (OMP_NUM_THREADS)")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5, help="steps before the timed window (multiple of 5)")
    p.add_argument("--timed", type=int, default=10, help="timed steps (multiple of 5, mgpt4-train logs every 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (A B C, C B A, ...)")
    p.add_argument("--variants", nargs="+", default=["upstream", "mgpt4_dist", "mgpt4_dist+features"],
                   choices=["upstream", "mgpt4_dist", "mgpt4_dist+compile", "mgpt4_dist+features"])
    p.add_argument("--extra", nargs="*", default=[], help="extra mgpt4-train overrides for both mgpt4_dist variants")
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--keep", help="keep assets and logs in this folder")
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    p.add_argument("--captions", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker == "upstream":
        return upstream_worker(args)
    if args.warmup % 5 or args.timed % 5 or args.timed <= 0:
        p.error("--warmup and --timed must be multiples of 5 (mgpt4-train logs every 5 steps)")
    if "upstream" in args.variants:
        head = subprocess.run(["git", "-C", args.upstream, "rev-parse", "HEAD"], capture_output=True, text=True)
        if not head.stdout.startswith(UPSTREAM_COMMIT) or not os.path.isfile(args.upstream_python):
            p.error(f"--upstream must be a checkout of Vision-CAIR/MiniGPT-4 at {UPSTREAM_COMMIT} and "
                    f"--upstream-python its venv's python (recipe: the docstring of {__file__})")

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_md import machine_line, write_section

    from mgpt4_dist.cache_features import cache_features
    from mgpt4_dist.config import load_config

    steps = args.warmup + args.timed
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    up_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    train_bin = os.path.join(os.path.dirname(sys.executable), "mgpt4-train")
    tmp = args.keep or tempfile.mkdtemp(prefix="bench_original_")
    loads, results = [], {}
    for preset in args.presets:
        assets = build_assets(os.path.join(tmp, preset), preset, args.samples)
        base = mgpt4_overrides(preset, assets) + [f"train.micro_batch_size={args.micro_batch}", *args.extra]
        feats = os.path.join(assets["root"], "features")
        if "mgpt4_dist+features" in args.variants and not os.path.isdir(feats):
            cache_features(load_config(TINY, base), feats, store_dtype="fp32", progress=False)
        commands = {
            "upstream": [args.upstream_python, os.path.abspath(__file__), "--worker", "upstream", "--preset", preset,
                         "--upstream", args.upstream, "--assets", assets["root"], "--captions", assets["captions"],
                         "--steps", str(steps), "--micro-batch", str(args.micro_batch), "--threads", str(args.threads)],
            "mgpt4_dist": [train_bin, "--config", TINY, *base],
            "mgpt4_dist+compile": [train_bin, "--config", TINY, *base, "train.compile_towers=true"],
            "mgpt4_dist+features": [train_bin, "--config", TINY, *base, "data.features=true",
                                    f"data.shards=[{feats}/*.tar]"],
        }
        rates = {v: [] for v in args.variants}
        for r in range(args.rounds):
            order = args.variants if r % 2 == 0 else list(reversed(args.variants))
            for variant in order:
                cmd = list(commands[variant])
                if variant != "upstream":
                    run = os.path.join(tmp, preset, f"run_{variant}_{r}")
                    shutil.rmtree(run, ignore_errors=True)  # a kept folder's old run would resume as finished
                    cmd += [f"run_dir={run}", f"train.max_steps={steps}", "checkpoint.every_steps=100000"]
                try:
                    stamps = timed_run(cmd, up_env if variant == "upstream" else env, REPO,
                                       os.path.join(tmp, preset, f"log_{variant}_{r}.txt"))
                    rate = rate_between(stamps, args.warmup, steps, args.micro_batch)
                except (RuntimeError, KeyError) as e:  # one failed variant leaves the others' numbers standing
                    print(f"[{preset}] round {r + 1} {variant}: FAILED: {e!r}", flush=True)
                    continue
                rates[variant].append(rate)
                loads.append(os.getloadavg()[0])
                print(f"[{preset}] round {r + 1} {variant}: {rate:.2f} samples/s (load {loads[-1]:.2f})", flush=True)
        results[preset] = rates

    names = {"upstream": f"upstream MiniGPT-4 code ({UPSTREAM_COMMIT}; model forward + backward + AdamW on llama_proj)",
             "mgpt4_dist": "mgpt4_dist, default settings (ZeRO-2, 1 DataLoader worker)",
             "mgpt4_dist+compile": "mgpt4_dist + `train.compile_towers=true` (ZeRO-2, 1 DataLoader worker)",
             "mgpt4_dist+features": "mgpt4_dist + cached features (`mgpt4-cache-features`, ZeRO-2, 1 worker)"}
    command = ("python tools/bench_original.py" + (f" --presets {' '.join(args.presets)}" if args.presets != ["vit", "llm"] else "")
               + f" --variants {' '.join(args.variants)}"
               + f" --rounds {args.rounds} --warmup {args.warmup} --timed {args.timed}"
               + (f" --extra {' '.join(args.extra)}" if args.extra else "") + " --write")
    sections = []
    for preset, rates in results.items():
        ref = statistics.mean(rates["upstream"]) if rates.get("upstream") else None
        lines = ["| step | samples/s (mean) | per round | vs upstream code |", "| --- | --- | --- | --- |"]
        for variant, values in rates.items():
            if not values:
                lines.append(f"| {names[variant]} | failed (see its log in the output folder) | | |")
                continue
            mean = statistics.mean(values)
            # ratio per round (each round's runs ran back to back), then averaged
            ratio = (statistics.mean(v / u for v, u in zip(values, rates["upstream"])) if ref else None)
            lines.append(f"| {names[variant]} | {mean:.1f} | {' / '.join(f'{v:.1f}' for v in values)} | "
                         f"{'' if ratio is None else f'{ratio:.2f}x'} |")
        sections.append(f"Preset `{preset}`: {preset_label(preset)}.\n\n" + "\n".join(lines))
    body = (f"`{command}`\n\n{machine_line()}; 1 process, {args.threads} torch threads each side, fp32, micro "
            f"batch {args.micro_batch}, stage 1; samples/s over steps {args.warmup + 1}..{steps} timed from the "
            f"outside, {args.rounds} alternating rounds; load average (1 min) during the runs "
            f"{min(loads):.2f}-{max(loads):.2f} on {os.cpu_count()} cores.\n\n" + "\n\n".join(sections))
    print(body)
    if args.write:
        write_section("Training step vs the upstream code (CPU)", body)
    print(f"bench_original: {len(args.presets)} presets x {len(args.variants)} variants x {args.rounds} rounds; "
          f"assets and logs in {tmp}" + ("; table written to BENCHMARKS.md" if args.write else ""), flush=True)


if __name__ == "__main__":
    main()
