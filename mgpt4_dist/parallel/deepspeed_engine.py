"""DeepSpeed backend: ZeRO stage 0-3 around MiniGPT4, and its DeepSpeed JSON: the shipped template of
the stage (package data `mgpt4_dist/ds_configs/zero{N}.json`), the user's `parallel.deepspeed_config`
merged over it, and every value the run config owns set last (`derive_ds_config`)."""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Optional

import torch
from torch import nn

from mgpt4_dist.config import ConfigError, JobConfig, precision_dtype
from mgpt4_dist.errors import MissingFileError
from mgpt4_dist.optim import build_optimizer, build_scheduler
from mgpt4_dist.parallel.base import Engine, layout_name
from mgpt4_dist.checkpoint.state import MOMENTS, FullState

log = logging.getLogger(__name__)

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")


def load_template(stage: int) -> dict:
    """The shipped DeepSpeed template of a ZeRO stage (package data `mgpt4_dist/ds_configs/zero{N}.json`)."""
    path = os.path.join(TEMPLATE_DIR, f"zero{stage}.json")
    if not os.path.isfile(path):  # an install without its package data: refuse, never guess a config
        raise MissingFileError(f"{path}: the DeepSpeed template of ZeRO-{stage} is missing from this mgpt4_dist "
                               f"install; reinstall the package")
    with open(path) as f:
        return json.load(f)


def read_user_ds_config(path: str) -> dict:
    """parallel.deepspeed_config: the user's DeepSpeed JSON."""
    try:
        with open(path) as f:
            user = json.load(f)
    except FileNotFoundError:
        raise MissingFileError(f"parallel.deepspeed_config={path}: no such file") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"parallel.deepspeed_config={path}: not a readable JSON file ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"parallel.deepspeed_config={path}: a JSON object is expected, not {type(user).__name__}")
    return user


def _merge(base: dict, over: dict) -> dict:
    """`over` merged into a copy of `base`, section by section."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else copy.deepcopy(value)
    return out


def _owned_values(cfg: JobConfig, world_size: int, grad_accum_steps: int) -> list:
    """(JSON path, value, the config key that sets it) of every DeepSpeed setting the run config owns."""
    micro = cfg.train.micro_batch_size
    accum_key = "train.global_batch_size" if cfg.train.global_batch_size else "train.grad_accum_steps"
    offload_opt = cfg.parallel.offload in ("optimizer", "optimizer+params")
    offload_params = cfg.parallel.offload == "optimizer+params"
    return [
        (("train_micro_batch_size_per_gpu",), micro, "train.micro_batch_size"),
        (("gradient_accumulation_steps",), grad_accum_steps, accum_key),
        (("train_batch_size",), micro * grad_accum_steps * world_size,
         "train.micro_batch_size x accumulation x world size"),
        (("gradient_clipping",), cfg.optim.grad_clip, "optim.grad_clip"),
        (("bf16", "enabled"), cfg.train.precision == "bf16", "train.precision"),
        (("fp16", "enabled"), cfg.train.precision == "fp16", "train.precision"),
        (("zero_optimization", "stage"), cfg.parallel.zero_stage, "parallel.zero_stage"),
        (("zero_optimization", "offload_optimizer", "device"), "cpu" if offload_opt else "none", "parallel.offload"),
        (("zero_optimization", "offload_param", "device"), "cpu" if offload_params else "none", "parallel.offload"),
    ]


# Sections the run config owns whole: the engine hands DeepSpeed its own optimizer and schedule.
OWNED_SECTIONS = {"optimizer": "optim.*", "scheduler": "optim.* (the warmup + cosine schedule)"}


_ABSENT = object()


def _lookup(tree: dict, path: tuple):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return _ABSENT
        tree = tree[key]
    return tree


def check_user_ds_config(user: dict, cfg: JobConfig, world_size: int, grad_accum_steps: int) -> None:
    """Refuse a user DeepSpeed JSON that states a value the run config owns otherwise, naming both."""
    source = f"parallel.deepspeed_config={cfg.parallel.deepspeed_config}"
    for section, owner in OWNED_SECTIONS.items():
        if section in user:
            raise ConfigError(f"{source} has an {section!r} section, but the run config owns it ({owner}): "
                              f"remove the section from the JSON")
    for path, want, owner in _owned_values(cfg, world_size, grad_accum_steps):
        got = _lookup(user, path)
        if got is _ABSENT or got == want or (got == "auto" and path[-1] != "device"):
            continue
        shown = ".".join(path)
        config_value = f"{owner}={_config_value(cfg, owner)}" if "=" not in owner and " " not in owner else owner
        raise ConfigError(f"{source} sets {shown}={json.dumps(got)}, but the run config gives {json.dumps(want)} "
                          f"({config_value}): remove {shown} from the JSON or change the config")


def _config_value(cfg: JobConfig, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def derive_ds_config(cfg: JobConfig, world_size: int, grad_accum_steps: int) -> dict:
    """The DeepSpeed JSON of a run: the stage template, the user's JSON (parallel.deepspeed_config)
    merged over it, then every value the run config states."""
    ds = load_template(cfg.parallel.zero_stage)
    if cfg.parallel.deepspeed_config:
        user = read_user_ds_config(cfg.parallel.deepspeed_config)
        check_user_ds_config(user, cfg, world_size, grad_accum_steps)
        ds = _merge(ds, user)
    micro = cfg.train.micro_batch_size
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = grad_accum_steps
    ds["train_batch_size"] = micro * grad_accum_steps * world_size
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": cfg.train.precision == "bf16"}
    # fp16's loss-scale settings may come from the user's JSON; these are the defaults.
    fp16 = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
            "min_loss_scale": 1, **ds.get("fp16", {})}
    ds["fp16"] = {**fp16, "enabled": cfg.train.precision == "fp16"}
    zero = ds.setdefault("zero_optimization", {})
    zero["stage"] = cfg.parallel.zero_stage
    if cfg.parallel.zero_stage == 3:
        # Otherwise zero.Init swaps torch.nn.functional.linear, process-wide and for good, for
        # DeepSpeed's own autograd function, so every Linear in the process (inference helpers,
        # tests) would run through it. ZeRO-3's module hooks already re-gather the frozen weights
        # for the backward pass, which is all this run needs.
        zero.setdefault("memory_efficient_linear", False)
    for key, on in (("offload_optimizer", cfg.parallel.offload in ("optimizer", "optimizer+params")),
                    ("offload_param", cfg.parallel.offload == "optimizer+params")):
        if on:
            zero[key] = {"pin_memory": torch.cuda.is_available(), **zero.get(key, {}), "device": "cpu"}
        else:
            zero.pop(key, None)
    return ds


def build_offload_optimizer(model: nn.Module, cfg: JobConfig):
    """AdamW on the CPU for offloaded optimizer state: DeepSpeed's vectorised CPU Adam (it refuses
    torch optimizers with offload). Same groups, betas, eps and decoupled weight decay as
    `build_optimizer`. Its C++ op is JIT-compiled once (~1 min, cached in ~/.cache/torch_extensions)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from mgpt4_dist.optim import param_groups

    groups = [g for g in param_groups(model, cfg.optim.weight_decay) if g["params"]]
    return DeepSpeedCPUAdam(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            adamw_mode=True)


class DeepSpeedEngine(Engine):
    def __init__(self, cfg: JobConfig, model: nn.Module, world_size: int, grad_accum_steps: int):
        import deepspeed

        self.cfg = cfg
        self.ds_config = derive_ds_config(cfg, world_size, grad_accum_steps)
        optimizer = build_offload_optimizer(model, cfg) if cfg.parallel.offload != "none" else \
            build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        # initialize casts every parameter of a whole model to bf16/fp16: keep the ViT's own
        # tensors to put back, rather than casting the rounded ones back (fp16 -> bf16 -> fp16 loses bits).
        vit_tensors = [(p, p.data) for p in model.visual_encoder.parameters() if not hasattr(p, "ds_id")]
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.module = self.engine.module
        self._restore_vit(cfg, vit_tensors)

    def _restore_vit(self, cfg: JobConfig, vit_tensors: list) -> None:
        """Put the frozen ViT's tensors (already in model.vit_precision) back after initialize cast
        them. It is outside the optimizer, so nothing else holds a copy. (ZeRO-3 without zero.Init
        and its own ViT dtype is refused by the config check: its parameters are partitioned by then.)"""
        from mgpt4_dist.models.minigpt4 import vit_dtype

        want = vit_dtype(cfg.model, precision_dtype(cfg.train.precision))
        for p, data in vit_tensors:
            if p.dtype != want and data.dtype == want:
                p.data = data.to(p.device)

    def backend_config(self) -> Optional[tuple[str, dict]]:
        return "ds_config.json", self.ds_config

    def layout(self) -> str:
        return layout_name("deepspeed", self.cfg.parallel.zero_stage)

    def forward(self, images: torch.Tensor, text) -> torch.Tensor:
        return self.engine(images, text)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def grad_norm(self) -> Optional[float]:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def skipped_steps(self) -> int:
        return int(getattr(self.engine, "skipped_steps", 0))

    def param_bytes(self) -> int:
        # ZeRO-3 leaves an empty placeholder in `param.data`; the rank's partition is `ds_tensor`.
        total = 0
        for p in self.module.parameters():
            local = p.ds_tensor if hasattr(p, "ds_tensor") else p
            total += local.numel() * local.element_size()
        return total

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, ckpt_root: str, tag: str) -> None:
        # Frozen weights are never copied into checkpoints: only llama_proj + optimizer state.
        self.engine.save_checkpoint(ckpt_root, tag=tag, save_latest=False, exclude_frozen_parameters=True)

    def load(self, ckpt_root: str, tag: str) -> None:
        path, _ = self.engine.load_checkpoint(ckpt_root, tag=tag, load_module_strict=False)
        if path is None:
            raise MissingFileError(f"DeepSpeed found no checkpoint at {os.path.join(ckpt_root, tag)}")

    # ------------------------------------------------------------------ the engine-neutral state
    # ZeRO 1-3 (and DeepSpeed's bf16 optimizer at ZeRO-1) map every parameter onto the flat fp32
    # partitions: DeepSpeed's tensor-fragment API (`safe_get_full_*` / `safe_set_full_*`) reads and
    # writes a whole tensor through that map, collectively. ZeRO-0 keeps no such map: every rank
    # holds every master tensor whole, found by `_zero0_masters`.

    def _base_optimizer(self) -> torch.optim.Optimizer:
        """The torch (or CPU) AdamW that holds the moments, inside DeepSpeed's wrapper if any."""
        opt = self.engine.optimizer
        return opt if isinstance(opt, torch.optim.Optimizer) else opt.optimizer

    def _zero0_masters(self) -> dict:
        """ZeRO-0: {id(module parameter): the fp32 tensor AdamW updates}. In fp32 DeepSpeed hands
        AdamW the module's own parameters; in fp16/bf16 it wraps AdamW in FP16_UnfusedOptimizer,
        which keeps one fp32 copy per parameter."""
        opt = self.engine.optimizer
        if isinstance(opt, torch.optim.Optimizer):
            return {id(p): p for group in opt.param_groups for p in group["params"]}
        if hasattr(opt, "fp16_groups") and hasattr(opt, "fp32_groups"):
            return {id(lp): hp for lps, hps in zip(opt.fp16_groups, opt.fp32_groups) for lp, hp in zip(lps, hps)}
        # FP16_Optimizer (flat fp32 groups) is only chosen for DeepSpeed's FusedAdam, which we never build.
        raise NotImplementedError(f"ZeRO-0 with DeepSpeed's {type(opt).__name__}: its fp32 master layout is not read")

    def _adam_step(self) -> Optional[int]:
        """AdamW's step counter (the same for every tensor); None before its first step made any state."""
        for state in self._base_optimizer().state.values():
            if "step" in state:
                step = state["step"]
                return int(step.item() if torch.is_tensor(step) else step)
        return None

    def _link_moments(self) -> None:
        """ZeRO-1/2 and the bf16 optimizer: point every parameter's fragment at AdamW's current state.
        DeepSpeed links them once, right after the first step of the first param group, when the other
        groups (llama_proj.bias: no weight decay) have no state yet, and never again; linking anew
        after a step or after filling the state makes every fragment see its moments."""
        opt = self.engine.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def _trainable(self) -> list:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def _full(self, param: nn.Parameter, kind: str, masters: Optional[dict]) -> torch.Tensor:
        """The whole fp32 tensor of `param` (kind "fp32") or of its Adam moment; collective at ZeRO 1-3."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if masters is not None:
            master = masters[id(param)]
            got = master if kind == "fp32" else self._base_optimizer().state[master][kind]
        else:
            got = safe_get_full_fp32_param(param) if kind == "fp32" else safe_get_full_optimizer_state(param, kind)
        if got is None:
            raise RuntimeError(f"DeepSpeed gave no full {kind} tensor for a trainable parameter")
        return got.detach().float().cpu().clone()

    def _loss_scale(self) -> Optional[float]:
        opt = self.engine.optimizer
        config = getattr(opt, "loss_scale_config", None)  # FP16_UnfusedOptimizer keeps the flag there
        dynamic = getattr(opt, "dynamic_loss_scale", getattr(config, "dynamic_loss_scale", False))
        return float(opt.loss_scale) if self.cfg.train.precision == "fp16" and dynamic else None

    def get_full_state(self) -> FullState:
        ds = self.engine
        masters = self._zero0_masters() if self.cfg.parallel.zero_stage == 0 else None
        adam_step = self._adam_step()
        if adam_step is not None:
            self._link_moments()
        weights, moments = {}, {kind: {} for kind in MOMENTS}
        for name, p in self._trainable():
            weights[name] = self._full(p, "fp32", masters)
            for kind in MOMENTS:
                # Before AdamW's first step (every fp16 step skipped so far) it has no moments: zeros are
                # what it would start from.
                moments[kind][name] = (self._full(p, kind, masters) if adam_step is not None
                                       else torch.zeros_like(weights[name]))
        schedule = None
        if ds.lr_scheduler is not None:  # its config object stays behind: the run config rebuilds it
            schedule = {k: v for k, v in ds.lr_scheduler.state_dict().items() if k != "cfg"}
        counters = {"global_steps": int(ds.global_steps), "global_samples": int(ds.global_samples),
                    "skipped_steps": int(ds.skipped_steps), "loss_scale": self._loss_scale()}
        return FullState(weights, moments, adam_step or 0, schedule, counters)

    def load_full_state(self, state: FullState) -> None:
        """Any ZeRO stage: through the tensor-fragment API at ZeRO 1-3, into the whole master
        tensors and AdamW's state at ZeRO-0."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        weights, moments, adam_step, scheduler_state, counters = state
        ds = self.engine
        base = self._base_optimizer()
        params = dict(self._trainable())
        if set(params) != set(weights):
            raise RuntimeError(f"resharded resume: the checkpoint holds {sorted(weights)}, the model trains "
                               f"{sorted(params)}")
        masters = self._zero0_masters() if self.cfg.parallel.zero_stage == 0 else None
        # Adam creates its state lazily: create it to fill it. ZeRO-3 swaps its flat fp32 partitions
        # into the param groups only during a step, so they are listed separately.
        flat_params = list(getattr(ds.optimizer, "fp32_partitioned_groups_flat", None) or
                           [p for group in base.param_groups for p in group["params"]])
        for p in flat_params:
            st = base.state[p]
            for kind in moments:
                st.setdefault(kind, torch.zeros_like(p, memory_format=torch.preserve_format))
            st["step"] = torch.tensor(float(adam_step or 0))
        self._link_moments()
        with torch.no_grad():
            for name, value in weights.items():
                p = params[name]
                if masters is not None:
                    master = masters[id(p)]
                    master.copy_(value.to(master.device))
                    for kind in moments:
                        base.state[master][kind].copy_(moments[kind][name].to(master.device))
                else:
                    safe_set_full_fp32_param(p, value)
                    for kind in moments:
                        safe_set_full_optimizer_state(p, moments[kind][name], kind)
        # The bit16 / module copy of the weights follows the fp32 master.
        for name, value in weights.items():
            p = params[name]
            if hasattr(p, "ds_id"):  # ZeRO-3: gather, set on every rank, re-partition (collective)
                from deepspeed.runtime.zero import GatheredParameters

                with GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(value.to(p.dtype))
            else:
                p.data.copy_(value.to(p.dtype))
        if scheduler_state is not None and ds.lr_scheduler is not None:
            ds.lr_scheduler.load_state_dict(scheduler_state)
        ds.global_steps = int(counters.get("global_steps", 0))
        # An FSDP checkpoint does not count samples; every step consumed one global batch.
        ds.global_samples = int(counters.get("global_samples") or ds.global_steps * ds.train_batch_size())
        ds.skipped_steps = int(counters.get("skipped_steps", 0))
        if counters.get("loss_scale") is not None and self._loss_scale() is not None:
            ds.optimizer.loss_scale = float(counters["loss_scale"])
        # Read back: the new partitions must hold exactly the saved tensors.
        for name, value in weights.items():
            for kind, want in [("fp32", value)] + [(k, moments[k][name]) for k in moments]:
                if not torch.equal(self._full(params[name], kind, masters), want):
                    raise RuntimeError(f"resharded resume: {kind} of {name} did not round-trip into the engine")
