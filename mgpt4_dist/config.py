"""The typed configuration tree of a run.

A run is described by one `JobConfig`, read from YAML and then overridden by dotted
`key.sub=value` arguments. Every key is declared here with its type; unknown keys and values of
the wrong type fail with the key's full name. The resolved tree is written beside the run
(`RUN_DIR/config.yaml`) so a run can always be reproduced from its folder.

Override values are parsed by the *declared* type, not by YAML: a string field takes the text
literally (`data.end_sym=###`), a list field takes `[a,b]` with items kept literally (brace ranges
and globs in shard patterns are not YAML), numbers and booleans parse as such. A weighted shard
source is written as in YAML: `data.shards=[{pattern: a/{000..099}.tar, weight: 115}, b/*.tar]`.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from dataclasses import dataclass, field
from typing import Any, List, Union

import yaml

from mgpt4_dist.errors import MissingFileError, UserError


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the declared tree."""


@dataclass
class ViTConfig:
    """EVA ViT-g/14 as MiniGPT-4 uses it (39 of EVA-g's 40 blocks, no final norm)."""

    img_size: int = 224
    patch_size: int = 14
    embed_dim: int = 1408
    depth: int = 39
    num_heads: int = 16
    mlp_ratio: float = 4.3637
    norm_eps: float = 1e-6


@dataclass
class QFormerConfig:
    """BLIP-2 Q-Former (BERT-base with cross-attention every `cross_attention_freq` layers)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    cross_attention_freq: int = 2
    num_query_tokens: int = 32
    layer_norm_eps: float = 1e-12


@dataclass
class ModelConfig:
    vit: ViTConfig = field(default_factory=ViTConfig)
    # False: the Llama-2 variant: no Q-Former, 4 consecutive ViT patch tokens concatenated per image token.
    has_qformer: bool = True
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    # A Hugging Face LLaMA folder (config.json, weights, tokenizer.model).
    llm_path: str = ""
    # Original weight files. The frozen towers' files are required (mgpt4-train, eval-loss, chat,
    # cache-features refuse empty ones) unless allow_random_weights; proj_checkpoint is optional.
    vit_checkpoint: str = ""
    qformer_checkpoint: str = ""
    proj_checkpoint: str = ""
    # True: an empty vit_checkpoint/qformer_checkpoint means random towers seeded by train.seed
    # (tests, benchmarks); a warning says so.
    allow_random_weights: bool = False
    # ln_vision's eps is the BLIP-2 default, not the ViT's.
    ln_vision_eps: float = 1e-5
    # The original clips the condition (prompt + image tokens) to this many positions.
    max_context_len: int = 3800
    # auto | flash | sdpa | eager: attention kernel of the LLM.
    attn_impl: str = "auto"
    # In training the LLM's last decoder layer computes only the scored tail (from the first
    # position whose next token is scored): same loss and gradients, less work (the image and
    # prompt positions' last-layer outputs are never read). False: the plain layer everywhere.
    trim_last_layer: bool = True
    # In the loss forward (training, eval loss) the LLM runs over each row's real positions only (no
    # padding in its projections and MLP; attention, always SDPA there, still sees the padded layout,
    # where padding trails each row): same loss and gradients to float rounding. False: the padded
    # batch, as the original.
    padding_free: bool = True
    # train | fp32 | fp16 | bf16: dtype of the frozen ViT (the original runs it in fp16); `train`
    # follows train.precision. Its output is cast to the Q-Former's dtype (ln_vision runs there).
    vit_precision: str = "train"


@dataclass
class ShardSource:
    """One data source: a shard pattern and its sampling weight in the mix."""

    pattern: str = ""
    weight: float = 1.0


@dataclass
class DataConfig:
    # Each item is a pattern string (weight 1) or a {pattern, weight} mapping.
    shards: List[Union[str, ShardSource]] = field(default_factory=list)
    # True: endless resampled shards, as the original. False: plain passes (epochs) over the shards.
    resample: bool = True
    num_workers: int = 2
    max_txt_len: int = 32
    end_sym: str = "\n"
    prompt_template: str = ""
    # Instructions containing <ImageHere>; empty for stage 1.
    prompts: List[str] = field(default_factory=list)
    # The original prompts/alignment.txt format: one instruction per line.
    prompt_path: str = ""
    # Stage 1 cleans captions as BLIP does; stage 2 uses answers verbatim.
    clean_captions: bool = True
    max_caption_words: int = 50
    # True: shards hold precomputed vision features (mgpt4-cache-features) instead of images.
    features: bool = False
    # > 0: sort windows of this many batches by caption length so batches pad less (0 = random
    # order, as the original; see BENCHMARKS.md "Padding waste" for what it saves).
    group_by_length: int = 0
    # Remote shards (pipe:, http(s)://, s3://, ...): a broken read is retried this many times in a
    # row, waiting retry_backoff_s, then twice that, ...; a shard still failing is skipped and counted.
    retries: int = 3
    retry_backoff_s: float = 1.0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    min_lr: float = 8e-5
    warmup_start_lr: float = 1e-6
    warmup_steps: int = 5000
    weight_decay: float = 0.05
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # Max global gradient norm; 0 disables clipping (the original does not clip).
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    max_steps: int = 20000
    # End after this step with a checkpoint, as a preemption would (0 = run to max_steps).
    # The lr schedule still spans max_steps.
    stop_at_step: int = 0
    micro_batch_size: int = 64
    grad_accum_steps: int = 1
    # Optional: when > 0, grad_accum_steps is derived from it and the world size.
    global_batch_size: int = 0
    seed: int = 42
    precision: str = "bf16"
    log_every: int = 10
    # Consecutive micro-batches with a non-finite loss before the run aborts.
    max_nonfinite_in_row: int = 5
    # torch.compile each ViT block, Q-Former layer and LLM decoder layer (refused at ZeRO-3).
    compile: bool = False
    # torch.compile the frozen towers (ViT, ln_vision, Q-Former) as one no-grad graph, built at the
    # first batch (refused with sharded towers: ZeRO-3, FSDP). Same features to float rounding (rel < 1e-5).
    compile_towers: bool = False


@dataclass
class ParallelConfig:
    backend: str = "deepspeed"
    zero_stage: int = 2
    offload: str = "none"
    activation_checkpointing: bool = False
    # Used when backend=deepspeed and zero_stage=3: build the model under deepspeed.zero.Init, each
    # parameter partitioned as it is created and weight files loaded into the partitions, so no
    # rank ever holds the whole model. False: every rank builds it whole, ZeRO-3 partitions it after.
    zero_init: bool = True
    # backend=deepspeed: a DeepSpeed JSON of your own (bucket sizes, prefetching, ...) merged over the
    # shipped zero{stage}.json template; the values this config owns (batch sizes, accumulation,
    # precision, ZeRO stage, offload, gradient clipping, optimizer, schedule) are set from it, and a
    # JSON that states one of them otherwise is refused. The merged JSON is RUN_DIR/ds_config.json.
    deepspeed_config: str = ""
    # Collective timeout: a dead or hung rank ends the job after this, not after days.
    timeout_minutes: float = 10.0


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    # auto (continue from RUN_DIR/checkpoints/latest if present) | never | PATH
    resume: str = "auto"
    # True: resume even when the config changed in a way that breaks exact resume (micro batch,
    # accumulation, world size, precision, data sources...); the changes are printed either way.
    allow_changes: bool = False


@dataclass
class RunConfig:
    # True (with checkpoint.resume=never): clear RUN_DIR's checkpoints, metrics and TensorBoard
    # events of an earlier run before starting; without it such a run dir is refused.
    overwrite: bool = False


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    progress: bool = True
    # Peak FLOP/s of one device (e.g. 312e12 for A100 bf16) for `mfu`; 0 logs achieved FLOP/s only.
    peak_flops: float = 0.0


@dataclass
class EvalConfig:
    """Evaluation during training (`mgpt4_dist.evaluation`); off while `shards` is empty."""

    # Held-out shard patterns (like data.shards, without weights); samples may carry several
    # reference captions (`captions` in KEY.json, else `caption`).
    shards: List[str] = field(default_factory=list)
    # Evaluate every this many steps, and at the last step.
    every_steps: int = 1000
    # The fixed held-out set: the first this many good samples of the shards (sorted), for the loss.
    max_samples: int = 256
    # Images captioned each time (the first of the set) and written to TensorBoard and samples.jsonl.
    num_samples: int = 4
    # Greedy decoding length of the captions.
    max_new_tokens: int = 30
    # Captioned samples scored with BLEU-4 and CIDEr-D: -1 = all of max_samples, 0 = no metrics.
    metric_samples: int = -1


@dataclass
class JobConfig:
    run_dir: str = "runs/default"
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# MiniGPT-4 pads with this literal string (the tokenizer's pad token); in the real LLaMA vocab it is
# an ordinary piece, and the tiny tokenizer is trained to have it.
PAD_TOKEN = "$$"

PRECISIONS = ("fp32", "bf16", "fp16")
PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch's spellings

# Values allowed for enumerated string keys; checked after every load.
CHOICES = {
    "train.precision": PRECISIONS,
    "parallel.backend": ("deepspeed", "fsdp"),
    "parallel.offload": ("none", "optimizer", "optimizer+params"),
    "model.attn_impl": ("auto", "flash", "sdpa", "eager"),
    "model.vit_precision": ("train",) + PRECISIONS,
}


# The one table from precision names (train.precision, model.vit_precision, cache and inference
# dtypes) to torch dtypes; the long names are torch's own spellings.
def precision_dtype(name: str):
    """The torch dtype of a precision name (fp32 | bf16 | fp16, or float32 | bfloat16 | float16)."""
    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    short = PRECISION_ALIASES.get(name, name)
    if short not in dtypes:
        raise ConfigError(f"precision {name!r}: use one of {', '.join(PRECISIONS + tuple(PRECISION_ALIASES))}")
    return dtypes[short]


# --------------------------------------------------------------------------- building from dicts

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) a YAML value against a declared type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {_type_name(tp)}, got {value!r}")
        return _from_dict(tp, value, key + ".")
    if origin is Union:
        mappings = [t for t in typing.get_args(tp) if dataclasses.is_dataclass(t)]
        if isinstance(value, dict) and len(mappings) == 1:
            return _coerce(value, mappings[0], key)  # its own error names the bad sub-key
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} fits none of {[_type_name(t) for t in typing.get_args(tp)]}")
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise ConfigError(f"{key}: expected a string, got {value!r} (quote it in YAML)")
    raise ConfigError(f"{key}: unsupported declared type {tp}")


def _unknown_key_message(dotted: str, names: set, prefix: str, more: int = 0) -> str:
    """`unknown config key X; did you mean Y?; known keys under P: ...` (the same from YAML and from overrides)."""
    leaf, _, rest = dotted[len(prefix):].partition(".")
    close = difflib.get_close_matches(leaf, sorted(names), n=3, cutoff=0.6)
    return (f"unknown config key {dotted}" + (f" (and {more} more)" if more > 0 else "")
            + (f"; did you mean {' or '.join(prefix + c + ('.' + rest if rest else '') for c in close)}?"
               if close else "")
            + f"; known keys under {prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(_unknown_key_message(prefix + str(unknown[0]), names, prefix, len(unknown) - 1))
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------- overrides

def _split_top_level(text: str) -> List[str]:
    """Split `a,b,{c,d}` on commas that are not inside braces or brackets."""
    items, depth, current = [], 0, []
    for ch in text:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            items.append("".join(current))
            current = []
        else:
            current.append(ch)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip() != ""]


def _parse_scalar(text: str, tp: Any, key: str) -> Any:
    if tp is str or tp is Any:
        return text
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {text!r}") from None
    if typing.get_origin(tp) is Union:
        # Only shard sources mix types: a plain pattern, or `{pattern: P, weight: W}` as in YAML.
        return _parse_mapping(text, key) if _MAPPING_ITEM.match(text) else text
    raise ConfigError(f"{key}: cannot be set from the command line")


# `{pattern: ..., weight: ...}`; a brace range such as `{000..009}.tar` is a pattern, not a mapping.
_MAPPING_ITEM = re.compile(r"^\{\s*[A-Za-z_]+\s*:.*\}$", re.S)


def _parse_mapping(text: str, key: str) -> dict:
    """`{pattern: a/{000..009}.tar, weight: 115}` with values kept literally (braces and globs are not YAML)."""
    out = {}
    for item in _split_top_level(text.strip()[1:-1]):
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"{key}: {item!r} in {text!r} is not of the form name: value")
        out[name.strip()] = value.strip()
    return out


def _parse_override_value(text: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (list, List):
        (item_tp,) = typing.get_args(tp) or (Any,)
        body = text.strip()
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        return [_parse_scalar(item, item_tp, key) for item in _split_top_level(body)]
    if dataclasses.is_dataclass(tp):
        raise ConfigError(f"{key} is a section; set one of its keys, e.g. {key}.<name>=...")
    return _parse_scalar(text, tp, key)


def apply_override(cfg: Any, assignment: str) -> None:
    """Apply one `a.b.c=value` override in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} is not of the form key.sub=value")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node = cfg
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            prefix = "".join(p + "." for p in parts[:i])
            raise ConfigError(_unknown_key_message(dotted.strip(), names, prefix)
                              + f" (in the command-line override {assignment!r})")
        if i < len(parts) - 1:
            node = getattr(node, part)
            if not dataclasses.is_dataclass(node):
                raise ConfigError(f"unknown config key {dotted} ({'.'.join(parts[:i + 1])} has no sub-keys)")
    tp = typing.get_type_hints(type(node))[parts[-1]]
    value = _parse_override_value(text, tp, dotted)
    setattr(node, parts[-1], _coerce(value, tp, dotted))


# --------------------------------------------------------------------------- loading and saving

def validate(cfg: JobConfig) -> None:
    for dotted, allowed in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(allowed)}")
    if not 0 <= cfg.parallel.zero_stage <= 3:
        raise ConfigError(f"parallel.zero_stage: {cfg.parallel.zero_stage} is not in 0..3")
    for dotted in ("train.max_steps", "train.micro_batch_size", "train.grad_accum_steps", "train.log_every"):
        section, name = dotted.split(".")
        if getattr(getattr(cfg, section), name) < 1:
            raise ConfigError(f"{dotted} must be >= 1")
    if cfg.train.compile and cfg.parallel.backend == "deepspeed" and cfg.parallel.zero_stage == 3:
        raise ConfigError("train.compile=true with ZeRO-3: its parameter-gathering hooks break the compiled "
                          "blocks into pieces; use parallel.zero_stage<=2 or parallel.backend=fsdp, or compile=false")
    if cfg.train.compile_towers and (cfg.parallel.backend == "fsdp" or cfg.parallel.zero_stage == 3):
        raise ConfigError(f"train.compile_towers=true with {'FSDP' if cfg.parallel.backend == 'fsdp' else 'ZeRO-3'}: "
                          "the towers' sharded parameters are gathered by hooks that one compiled graph cannot run; "
                          "use parallel.backend=deepspeed with parallel.zero_stage<=2, or train.compile_towers=false")
    if cfg.data.group_by_length < 0:
        raise ConfigError("data.group_by_length must be >= 0 (batches per sorting window; 0 = off)")
    if cfg.data.retries < 0 or cfg.data.retry_backoff_s < 0:
        raise ConfigError("data.retries and data.retry_backoff_s must be >= 0")
    if cfg.train.stop_at_step < 0 or cfg.train.global_batch_size < 0:
        raise ConfigError("train.stop_at_step and train.global_batch_size must be >= 0")
    if cfg.eval.shards:
        for dotted in ("eval.every_steps", "eval.max_samples", "eval.max_new_tokens"):
            if getattr(cfg.eval, dotted.split(".")[1]) < 1:
                raise ConfigError(f"{dotted} must be >= 1 when eval.shards is set")
        if cfg.eval.num_samples < 0 or cfg.eval.metric_samples < -1:
            raise ConfigError("eval.num_samples must be >= 0 and eval.metric_samples >= -1 (-1 = all of "
                              "eval.max_samples, 0 = no caption metrics)")
    if cfg.checkpoint.every_steps < 1:
        raise ConfigError("checkpoint.every_steps must be >= 1")
    if cfg.run.overwrite and cfg.checkpoint.resume != "never":
        raise ConfigError(f"run.overwrite=true clears the run dir, which checkpoint.resume={cfg.checkpoint.resume} "
                          f"would continue from: add checkpoint.resume=never to start over")
    if cfg.parallel.deepspeed_config and cfg.parallel.backend != "deepspeed":
        raise ConfigError(f"parallel.deepspeed_config={cfg.parallel.deepspeed_config} is a DeepSpeed JSON, but "
                          f"parallel.backend={cfg.parallel.backend}: use parallel.backend=deepspeed, or drop "
                          f"parallel.deepspeed_config (FSDP takes its settings from the run config only)")
    own_vit_dtype = cfg.model.vit_precision not in ("train", cfg.train.precision)
    if own_vit_dtype and cfg.parallel.backend == "fsdp":
        raise ConfigError(
            f"model.vit_precision={cfg.model.vit_precision} with parallel.backend=fsdp: FSDP2 computes every unit in "
            f"train.precision={cfg.train.precision}; set model.vit_precision=train or use parallel.backend=deepspeed")
    if (own_vit_dtype and cfg.parallel.backend == "deepspeed" and cfg.parallel.zero_stage == 3
            and not cfg.parallel.zero_init and cfg.train.precision != "fp32"):
        raise ConfigError(
            f"model.vit_precision={cfg.model.vit_precision} at ZeRO-3 with train.precision={cfg.train.precision} needs "
            f"parallel.zero_init=true (without it DeepSpeed casts every parameter to {cfg.train.precision} as it "
            f"partitions them)")


def read_yaml(path: str, what: str) -> Any:
    """A YAML file's content; a missing file or a syntax error is a ConfigError naming the file (and line)."""
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise MissingFileError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path}: is a folder, not a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"{what} {path}: not valid YAML{where}: {problem}; fix the file (quote values "
                          f"holding ': ', '#', '{{' or '[')") from None


def load_config(path: str | None, overrides: List[str] | None = None) -> JobConfig:
    data: dict = {}
    if path:
        data = read_yaml(path, "--config")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    cfg = _from_dict(JobConfig, data)
    for assignment in overrides or []:
        apply_override(cfg, assignment)
    validate(cfg)
    return cfg


def save_config(cfg: JobConfig, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False, allow_unicode=True)
    os.replace(tmp, path)


def config_from_dict(data: dict) -> JobConfig:
    """Rebuild a JobConfig from `to_dict` output (e.g. a saved config.yaml)."""
    cfg = _from_dict(JobConfig, data)
    validate(cfg)
    return cfg


def shard_sources(cfg: DataConfig) -> List[ShardSource]:
    """data.shards as a list of (pattern, weight) sources."""
    return [s if isinstance(s, ShardSource) else ShardSource(pattern=s, weight=1.0) for s in cfg.shards]


def load_prompts(cfg: DataConfig) -> List[str]:
    """The instruction list: data.prompts plus the lines of data.prompt_path holding <ImageHere>,
    each formatted with data.prompt_template as the original does at load time."""
    raw = list(cfg.prompts)
    if cfg.prompt_path:
        try:
            with open(cfg.prompt_path) as f:
                raw += [line for line in f.read().splitlines() if "<ImageHere>" in line]
        except FileNotFoundError:
            raise MissingFileError(
                f"data.prompt_path={cfg.prompt_path}: no such file (relative paths are read from the current "
                f"folder, {os.getcwd()}); set data.prompt_path to the instruction file, e.g. the original's "
                f"prompts/alignment.txt") from None
    for p in raw:
        if "<ImageHere>" not in p:
            raise ConfigError(f"data.prompts: {p!r} has no <ImageHere> placeholder")
    template = cfg.prompt_template or "{}"
    return [template.format(p) for p in raw]
