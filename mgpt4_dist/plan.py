"""Memory planner: per-rank memory of a run for every ZeRO stage / offload choice and FSDP.

Parameter counts are exact: the ViT, Q-Former and LLM are built on the meta device from the config
(the LLM from `model.llm_path/config.json`, else a built-in Vicuna 7B/13B shape). Per rank, with
Ψf frozen and Ψt trainable parameters, b bytes per element of the training precision, N ranks:

  frozen weights   b·Ψf (stage 0-2)           b·Ψf/N (stage 3, FSDP)       0 (params offloaded)
  trainable        b·Ψt (stage 0-2)           b·Ψt/N (stage 3, FSDP)
  grads            b·Ψt (stage 0-1)           b·Ψt/N (stage 2-3, FSDP)
  optimizer        K·Ψt (stage 0)             K·Ψt/N (stage 1-3, FSDP)      0 (optimizer offloaded)
with K = 12 (fp32 master + Adam m, v) in bf16/fp16 and 8 (m, v) in fp32: the reference's
16Ψ / 4Ψ+12Ψ/N / 2Ψ+14Ψ/N / 16Ψ/N for the trainable part.
The stage-3 figures hold from the model build on with `parallel.zero_init=true` (the default;
the build adds one module's weights while it is gathered); with `false` every rank first builds
the whole model, b·(Ψf+Ψt), before `deepspeed.initialize` partitions it.

Activations: the towers run without autograd and the frozen linears save no inputs (autograd
keeps a matmul's input only to form a weight gradient), so what backward keeps per LLM layer and
token is: two RMSNorm inputs upcast to fp32 (2·4·D), SDPA's q, k, v and output (4·b·D), the MLP's
gate, up and silu(gate) (3·b·I); plus llama_proj's input and the fp32 log-softmax of the scored
tokens. With activation checkpointing a layer keeps only its input (b·D) and one layer's full set
is live during its recomputation. `measure_saved_activation_bytes` counts what autograd really
saves (saved-tensor hooks), which the tests compare with this estimate.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from mgpt4_dist.config import JobConfig
from mgpt4_dist.errors import InvalidInputError

GiB = 1024 ** 3
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# Vicuna v0 (LLaMA-1) shapes, used when model.llm_path has no config.json.
BUILTIN_LLMS = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40, vocab_size=32000),
}

# (name, backend, zero stage, offload)
CHOICES = [
    ("zero0", "deepspeed", 0, "none"), ("zero1", "deepspeed", 1, "none"), ("zero2", "deepspeed", 2, "none"),
    ("zero2+off-opt", "deepspeed", 2, "optimizer"), ("zero3", "deepspeed", 3, "none"),
    ("zero3+off-opt", "deepspeed", 3, "optimizer"), ("zero3+off-opt+params", "deepspeed", 3, "optimizer+params"),
    ("fsdp", "fsdp", 3, "none"),
]


# Memory size units; a bare number is GiB (how GPU memory is quoted: "80" means an 80 GiB GPU).
SIZE_UNITS = {"tib": 2 ** 40, "t": 2 ** 40, "tb": 10 ** 12, "gib": GiB, "g": GiB, "gb": 10 ** 9, "mib": 2 ** 20,
              "m": 2 ** 20, "mb": 10 ** 6, "": GiB}


def parse_bytes(text: str, what: str = "a memory size") -> int:
    """'80GiB', '80G' (GiB), '40GB' (10^9), '512MiB', or a bare number of GiB ('80')."""
    t = text.strip().lower().replace(" ", "")
    for unit in sorted(SIZE_UNITS, key=len, reverse=True):
        if t.endswith(unit):
            try:
                value = float(t[: len(t) - len(unit)])
            except ValueError:
                break
            if value < 0:
                break
            return int(value * SIZE_UNITS[unit])
    raise InvalidInputError(f"cannot read {what} from {text!r}: give a size such as 80GiB, 80G or 80 (GiB), "
                     f"40GB, 512MiB")


def llm_shape(cfg: JobConfig, llm: Optional[str] = None) -> dict:
    path = os.path.join(cfg.model.llm_path or "", "config.json")
    if llm is None and cfg.model.llm_path and os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    if llm is None:
        raise InvalidInputError(f"model.llm_path={cfg.model.llm_path!r} has no config.json: pass --llm 7b or "
                                f"--llm 13b")
    return dict(BUILTIN_LLMS[llm.lower()])


@dataclass
class ParamCounts:
    frozen: int
    trainable: int
    llm_hidden: int
    llm_intermediate: int
    llm_layers: int
    vocab: int


def count_params(cfg: JobConfig, llm: Optional[str] = None) -> ParamCounts:
    from transformers import LlamaConfig, LlamaForCausalLM

    from mgpt4_dist.models.qformer import QFormer
    from mgpt4_dist.models.vit import EvaViT

    shape = llm_shape(cfg, llm)
    with torch.device("meta"):
        vit = EvaViT(cfg.model.vit)
        tower = (QFormer(cfg.model.qformer, vision_width=cfg.model.vit.embed_dim) if cfg.model.has_qformer
                 else torch.nn.LayerNorm(cfg.model.vit.embed_dim))
        lcfg = LlamaConfig(**{k: v for k, v in shape.items() if k in LlamaConfig().to_dict() or k in BUILTIN_LLMS["7b"]})
        lm = LlamaForCausalLM(lcfg)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    D = lcfg.hidden_size
    if cfg.model.has_qformer:
        proj_in = cfg.model.qformer.hidden_size
    else:
        proj_in = cfg.model.vit.embed_dim * 4
    return ParamCounts(frozen=n(vit) + n(tower) + n(lm), trainable=proj_in * D + D, llm_hidden=D,
                       llm_intermediate=lcfg.intermediate_size, llm_layers=lcfg.num_hidden_layers,
                       vocab=lcfg.vocab_size)


def sequence_len(cfg: JobConfig) -> int:
    """Longest LLM sequence of a micro-batch: BOS + image tokens + prompt allowance + max_txt_len."""
    image_tokens = cfg.model.qformer.num_query_tokens if cfg.model.has_qformer else \
        ((cfg.model.vit.img_size // cfg.model.vit.patch_size) ** 2) // 4
    prompt = 0 if not (cfg.data.prompt_template or cfg.data.prompts or cfg.data.prompt_path) else 32
    return 1 + image_tokens + prompt + cfg.data.max_txt_len


def activation_bytes(counts: ParamCounts, precision: str, micro: int, seq: int, scored: int,
                     proj_in: int, checkpointing: bool = False, recompute_peak: bool = True,
                     tail: Optional[int] = None) -> int:
    """Bytes autograd keeps for backward; with checkpointing, plus one layer being recomputed
    (`recompute_peak`), which is live only inside backward. `tail`: positions per row the last
    layer computes (model.trim_last_layer); the others keep only what their keys and values need."""
    b = BYTES[precision]
    D, I, L = counts.llm_hidden, counts.llm_intermediate, counts.llm_layers
    per_token_layer = 8 * D + 4 * b * D + 3 * b * I
    tokens = micro * seq
    if checkpointing:
        layers = L * b * D * tokens + (per_token_layer * tokens if recompute_peak else 0)
    else:
        tail_tokens = micro * min(seq, tail if tail is not None else seq)
        # the last layer: for every position its norm input, keys and values (~4 b D, a bound); the rest for the tail
        last = per_token_layer * tail_tokens + 4 * b * D * (tokens - tail_tokens)
        layers = (L - 1) * per_token_layer * tokens + last
    head = micro * scored * (counts.vocab * 4 + 4 * D)  # fp32 log-softmax of scored tokens, final norm input
    proj = micro * seq * proj_in * b
    return int(layers + head + proj)


def rank_memory(counts: ParamCounts, precision: str, stage: int, offload: str, ranks: int) -> dict:
    b = BYTES[precision]
    k = 8 if precision == "fp32" else 12
    pf, pt = counts.frozen, counts.trainable
    return {
        "frozen": 0 if offload == "optimizer+params" else (b * pf / ranks if stage == 3 else b * pf),
        "trainable": 0 if offload == "optimizer+params" else (b * pt / ranks if stage == 3 else b * pt),
        "grads": b * pt / ranks if stage >= 2 else b * pt,
        "optimizer": 0 if offload != "none" else (k * pt if stage == 0 else k * pt / ranks),
    }


def plan(cfg: JobConfig, ranks: int, gpu_mem: int, llm: Optional[str] = None, overhead: int = 2 * GiB) -> dict:
    """Rows for every choice: bytes per rank, total, fits, and the largest micro-batch that fits.

    `overhead` stands for the CUDA context, allocator fragmentation and communication buffers.
    """
    counts = count_params(cfg, llm)
    precision, micro, seq = cfg.train.precision, cfg.train.micro_batch_size, sequence_len(cfg)
    proj_in = counts.trainable // counts.llm_hidden - 1
    ckpt = cfg.parallel.activation_checkpointing
    # the scored tail: the answer and the position before it
    tail = cfg.data.max_txt_len + 1 if cfg.model.trim_last_layer else None
    act = lambda m: activation_bytes(counts, precision, m, seq, cfg.data.max_txt_len, proj_in, ckpt, tail=tail)  # noqa: E731
    rows = []
    for name, backend, stage, offload in CHOICES:
        mem = rank_memory(counts, precision, stage, offload, ranks)
        fixed = sum(mem.values()) + overhead
        total = fixed + act(micro)
        best = 0
        if fixed + act(1) <= gpu_mem:
            lo, hi = 1, 1
            while fixed + act(hi * 2) <= gpu_mem and hi < 2 ** 16:
                hi *= 2
            lo, hi = hi, hi * 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if fixed + act(mid) <= gpu_mem else (lo, mid)
            best = lo
        rows.append({"choice": name, "backend": backend, "zero_stage": stage, "offload": offload, **mem,
                     "activations": act(micro), "overhead": overhead, "total": total, "fits": total <= gpu_mem,
                     "max_micro_batch": best, "total_at_micro_batch_1": fixed + act(1)})
    return {"ranks": ranks, "gpu_mem": gpu_mem, "precision": precision, "micro_batch_size": micro, "seq_len": seq,
            "frozen_params": counts.frozen, "trainable_params": counts.trainable,
            "activation_checkpointing": ckpt, "rows": rows}


def format_plan(result: dict) -> str:
    g = lambda x: f"{x / GiB:7.2f}"  # noqa: E731
    lines = [f"{result['ranks']} ranks, {result['gpu_mem'] / GiB:.0f} GiB each, {result['precision']}, micro batch "
             f"{result['micro_batch_size']} x {result['seq_len']} tokens, {result['frozen_params'] / 1e9:.2f} B frozen + "
             f"{result['trainable_params'] / 1e6:.2f} M trainable parameters"
             + (", activation checkpointing" if result["activation_checkpointing"] else ""),
             "GiB per rank:",
             f"{'choice':22} {'frozen':>7} {'train':>7} {'grads':>7} {'optim':>7} {'activ':>7} {'other':>7} "
             f"{'total':>7}  fits  max micro"]
    for r in result["rows"]:
        lines.append(f"{r['choice']:22} {g(r['frozen'])} {g(r['trainable'])} {g(r['grads'])} {g(r['optimizer'])} "
                     f"{g(r['activations'])} {g(r['overhead'])} {g(r['total'])}  {'yes' if r['fits'] else 'NO ':4}"
                     f"  {r['max_micro_batch']}")
    lines.append(recommendation(result))
    return "\n".join(lines)


def recommendation(result: dict) -> str:
    """The choice to run: never one that does not fit. Without offload if any fits, else the
    offload choice that fits the largest micro-batch, else what GPU memory would do."""
    rows = result["rows"]
    other = f"'other' = {rows[0]['overhead'] / GiB:.0f} GiB allowance for CUDA context, buffers, fragmentation"
    for offload_ok in (False, True):
        fitting = [r for r in rows if r["max_micro_batch"] > 0 and (offload_ok or r["offload"] == "none")]
        if fitting:
            best = max(fitting, key=lambda r: (r["max_micro_batch"], -r["zero_stage"], r["offload"] == "none"))
            how = "with offload: nothing fits without it" if offload_ok else "without offload"
            return (f"recommended: {best['choice']} with train.micro_batch_size={best['max_micro_batch']} "
                    f"(largest that fits {how}; {other})")
    least = min(rows, key=lambda r: r["total_at_micro_batch_1"])
    return (f"nothing fits in {result['gpu_mem'] / GiB:.2f} GiB per GPU, not even {least['choice']} at micro batch 1, "
            f"which needs {least['total_at_micro_batch_1'] / GiB:.1f} GiB: use GPUs with at least that much, or more "
            f"GPUs (ZeRO-3/FSDP shard the frozen weights across them); {other}")


def measure_saved_activation_bytes(model, images, text) -> int:
    """Bytes autograd keeps for backward during one forward (unique storages, parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(images, text)
    loss.backward()
    return sum(seen.values())
