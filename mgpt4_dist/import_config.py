"""Translate an original MiniGPT-4 YAML (`train_configs/*.yaml`, `eval_configs/*.yaml`) into ours.

The original files state only what differs from its model defaults
(`minigpt4/configs/models/minigpt4_{vicuna0,llama2}.yaml`) and its code defaults (max_txt_len 32,
end_sym "\\n", no prompt); settings a file leaves out take those defaults here too. Every setting
is either mapped, deliberately ignored with a reason, or reported as not mappable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

from mgpt4_dist.config import ConfigError, JobConfig, ShardSource, read_yaml, validate

# The original's model defaults (model yaml + MiniGPT4.__init__ / from_config defaults).
ORIGINAL_MODEL_DEFAULTS = {"image_size": 224, "num_query_token": 32, "max_txt_len": 32, "end_sym": "\n",
                           "prompt_template": "", "prompt_path": "", "freeze_vit": True, "freeze_qformer": True,
                           "vit_precision": "fp16"}
# Where the original's dataset builders read shards when a config does not say (their defaults yaml).
ORIGINAL_DATASET_STORAGE = {"laion": "/path/to/laion_dataset/{00000..10488}.tar",
                            "cc_sbu": "/path/to/cc_sbu_dataset/{00000..01255}.tar",
                            "cc_sbu_align": "/path/to/cc_sbu_align/"}
# Settings that only concern the original's own runner.
IGNORED = {"arch": "one architecture here", "task": "one task here", "evaluate": "use mgpt4-eval-loss",
           "train_splits": "webdataset shards have no splits", "device": "chosen per rank by the launcher",
           "world_size": "set by the launcher", "dist_url": "set by the launcher",
           "distributed": "always distributed (a world of one included)", "wandb_log": "TensorBoard here",
           "job_name": "run_dir names the run", "low_resource": "mgpt4-chat loads 8-bit on request",
           "drop_path_rate": "frozen ViT runs in eval mode", "use_grad_checkpoint": "parallel.activation_checkpointing",
           "prompt": "unused by MiniGPT4 training", "vit_model": "model.vit_checkpoint names the weight file",
           "vis_processor": "one image transform (square bicubic 224)",
           "text_processor": "data.clean_captions", "data_type": "images only", "device_8bit": "mgpt4-chat option"}


@dataclass
class ImportReport:
    config: JobConfig
    mapped: List[Tuple[str, str, Any]] = field(default_factory=list)  # (original key, our key, value)
    ignored: List[Tuple[str, str]] = field(default_factory=list)  # (original key, why)
    unmapped: List[Tuple[str, str]] = field(default_factory=list)  # (original key, why not)


def import_original(original: Dict[str, Any]) -> ImportReport:
    model = {**ORIGINAL_MODEL_DEFAULTS, **(original.get("model") or {})}
    run = original.get("run") or {}
    datasets = original.get("datasets") or {}
    cfg = JobConfig()
    report = ImportReport(cfg)

    def put(src: str, dotted: str, value: Any) -> None:
        section, _, name = dotted.rpartition(".")
        node = cfg
        for part in section.split(".") if section else []:
            node = getattr(node, part)
        setattr(node, name, value)
        report.mapped.append((src, dotted, value))

    handled = set()
    for key, value in model.items():
        src = f"model.{key}"
        handled.add(src)
        if key in ("llama_model",):
            put(src, "model.llm_path", value)
        elif key == "ckpt":
            put(src, "model.proj_checkpoint", value)
        elif key == "q_former_model":
            put(src, "model.qformer_checkpoint", value)
            if "://" in str(value):
                report.unmapped.append((src, "a URL: download the file and set model.qformer_checkpoint to its path"))
        elif key in ("max_txt_len", "end_sym", "prompt_template", "prompt_path"):
            put(src, f"data.{key}", value)
        elif key == "image_size":
            put(src, "model.vit.img_size", int(value))
        elif key == "num_query_token":
            put(src, "model.qformer.num_query_tokens", int(value))
        elif key == "has_qformer":
            put(src, "model.has_qformer", bool(value))
        elif key == "vit_precision":
            if value in ("fp16", "fp32", "bf16"):
                put(src, "model.vit_precision", value)
            else:
                report.unmapped.append((src, f"{value!r}: model.vit_precision takes fp16, fp32, bf16 or train"))
        elif key == "model_type":
            if str(value).endswith("llama2"):
                put(src, "model.has_qformer", False)
            elif not str(value).endswith(("vicuna0", "vicuna")):  # pretrain_vicuna: the first release's name
                report.unmapped.append((src, f"unknown model_type {value!r} (pretrain_vicuna0 or pretrain_llama2)"))
        elif key in ("freeze_vit", "freeze_qformer"):
            if not value:
                report.unmapped.append((src, "only llama_proj trains here; unfreezing the towers is not supported"))
        elif key in ("lora_r",) and value:
            report.unmapped.append((src, "LoRA is not supported"))
        elif key in IGNORED:
            report.ignored.append((src, IGNORED[key]))
        else:
            report.unmapped.append((src, "no counterpart"))
    if not cfg.model.has_qformer:
        cfg.model.qformer_checkpoint = ""  # the Llama-2 variant loads no BLIP-2 weights
    elif not cfg.model.qformer_checkpoint or "://" in cfg.model.qformer_checkpoint:
        # The original downloads BLIP-2's checkpoint by URL; we read a local file.
        cfg.model.qformer_checkpoint = "weights/blip2_pretrained_flant5xxl.pth"
        report.mapped.append(("model.q_former_model (downloaded by the original)", "model.qformer_checkpoint",
                              cfg.model.qformer_checkpoint))
    cfg.model.vit_checkpoint = "weights/eva_vit_g.pth"
    report.mapped.append(("model.vit_model (eva_clip_g, downloaded by the original)", "model.vit_checkpoint",
                          cfg.model.vit_checkpoint))
    # Stage 2 (an instruction template or the aligned dataset): answers verbatim, as the original.
    stage2 = bool(cfg.data.prompt_template or cfg.data.prompt_path or "cc_sbu_align" in datasets)
    cfg.data.clean_captions = not stage2

    sources, batch_sizes = [], []
    for name, spec in datasets.items():
        spec = spec or {}
        storage = (spec.get("build_info") or {}).get("storage") or ORIGINAL_DATASET_STORAGE.get(name, f"data/{name}/*.tar")
        pattern = storage
        if name == "cc_sbu_align" or storage.endswith("/"):
            pattern = storage.rstrip("/") + "_shards/*.tar"
            report.unmapped.append((f"datasets.{name}.build_info.storage",
                                    f"{storage} is a filter_cap.json folder: make shards with "
                                    f"`mgpt4-make-shards --cc-sbu-align {storage} --out {pattern.rsplit('/', 1)[0]}`"))
        sources.append(ShardSource(pattern=pattern, weight=float(spec.get("sample_ratio", 1))))
        report.mapped.append((f"datasets.{name}", "data.shards", f"{pattern} (weight {spec.get('sample_ratio', 1)})"))
        if "batch_size" in spec:
            batch_sizes.append(int(spec["batch_size"]))
        for key in spec:
            if key not in ("batch_size", "sample_ratio", "build_info", "vis_processor", "text_processor", "data_type"):
                report.unmapped.append((f"datasets.{name}.{key}", "no counterpart"))
    if sources:
        cfg.data.shards = sources
    if not batch_sizes and "batch_size_train" in run:
        # Files of the original's first release give the batch size only here; later ones per source.
        batch_sizes = [int(run["batch_size_train"])]
        report.mapped.append(("run.batch_size_train", "train.micro_batch_size", batch_sizes[0]))
    elif batch_sizes:
        report.mapped.append(("datasets.*.batch_size", "train.micro_batch_size", max(batch_sizes)))
    if batch_sizes:
        cfg.train.micro_batch_size = max(batch_sizes)
        if len(set(batch_sizes)) > 1:
            report.unmapped.append(("datasets.*.batch_size", f"sources use different batch sizes {batch_sizes}; "
                                                             f"one micro batch ({max(batch_sizes)}) is used for all"))

    run_map = {"init_lr": "optim.lr", "min_lr": "optim.min_lr", "warmup_lr": "optim.warmup_start_lr",
               "warmup_steps": "optim.warmup_steps", "weight_decay": "optim.weight_decay", "seed": "train.seed",
               "output_dir": "run_dir", "num_workers": "data.num_workers"}
    for key, value in run.items():
        src = f"run.{key}"
        if key in run_map:
            dotted = run_map[key]
            put(src, dotted, float(value) if dotted.startswith("optim.") and key != "warmup_steps" else
                (int(value) if key in ("warmup_steps", "seed", "num_workers") else value))
        elif key in ("max_epoch", "iters_per_epoch"):
            pass  # combined below
        elif key == "batch_size_train":
            if any("batch_size" in (spec or {}) for spec in datasets.values()):
                report.ignored.append((src, "the sources' own datasets.*.batch_size is used"))
        elif key == "batch_size_eval":
            report.ignored.append((src, "no evaluation during training (mgpt4-eval-loss scores a run separately)"))
        elif key == "amp":
            # The original autocasts to fp16 with a GradScaler; fp16 with dynamic loss scaling matches it.
            put(src, "train.precision", "fp16" if value else "fp32")
        elif key == "lr_sched":
            if value != "linear_warmup_cosine_lr":
                report.unmapped.append((src, f"{value!r}: only linear_warmup_cosine_lr exists here"))
        elif key == "resume_ckpt_path":
            if value:
                report.unmapped.append((src, "original training checkpoints cannot be resumed; load its llama_proj "
                                             "with model.proj_checkpoint instead"))
        elif key in IGNORED:
            report.ignored.append((src, IGNORED[key]))
        else:
            report.unmapped.append((src, "no counterpart"))
    if "max_epoch" in run or "iters_per_epoch" in run:
        steps = int(run.get("max_epoch", 1)) * int(run.get("iters_per_epoch", 1))
        put("run.max_epoch x run.iters_per_epoch", "train.max_steps", steps)
    for section in original:
        if section not in ("model", "datasets", "run", "preprocess"):
            report.unmapped.append((section, "unknown section"))
    validate(cfg)
    return report


def import_original_file(path: str) -> ImportReport:
    data = read_yaml(path, "original config")
    if not isinstance(data, dict):
        raise ConfigError(f"original config {path}: not a MiniGPT-4 config (the top level must be a mapping)")
    return import_original(data)
