"""`mgpt4-train`: the training loop.

    mgpt4-train --config mgpt4_dist/configs/tiny_stage1.yaml train.max_steps=50 run_dir=/tmp/r

Runs as one process, under `torchrun`, under the `deepspeed` launcher or under `srun`; rank and
world come from `mgpt4_dist.dist`. The loop: draw a micro-batch, build its token layout, forward,
backward, step; log every `train.log_every` steps; evaluate every `eval.every_steps` steps and at
the last one (when `eval.shards` is set); checkpoint every `checkpoint.every_steps` steps
and at the last one.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import resource
import signal
import sys
import time
from typing import List, Optional

import numpy as np
import torch

from mgpt4_dist import dist, envreport
from mgpt4_dist.checkpoint import run_dir
from mgpt4_dist.checkpoint.layout import checkpoints_dir, find_resume_point, read_latest, step_tag
from mgpt4_dist.checkpoint.manager import load_checkpoint, save_checkpoint
from mgpt4_dist.checkpoint.state import proj_state_for, set_rng_state
from mgpt4_dist.cache_features import check_sources_kind
from mgpt4_dist.cli import ArgumentParser, examples, report_user_error
from mgpt4_dist.config import ConfigError, JobConfig, load_config, load_prompts, save_config, shard_sources
from mgpt4_dist.data.pipeline import build_batch_loader, resolve_sources
from mgpt4_dist.evaluation.evaluate import Evaluator, check_eval_config
from mgpt4_dist.errors import EXIT_COLLECTIVE_FAILURE, EXIT_PREEMPTED, DiskFullError, UserError, disk_full_cause
from mgpt4_dist.flops import FlopsModel
from mgpt4_dist.metrics import MetricsLogger
from mgpt4_dist.profiling import StepProfiler
from mgpt4_dist.models.llm import load_tokenizer
from mgpt4_dist.models.sequence import SequenceBuilder
from mgpt4_dist.models.weights import require_frozen_weights
from mgpt4_dist.parallel import build_engine, build_model

log = logging.getLogger("mgpt4_dist.train")


class TrainingAborted(RuntimeError):
    pass


def resolve_grad_accum(cfg: JobConfig, world_size: int) -> int:
    """train.global_batch_size, when set, fixes accumulation for the world size at hand."""
    if not cfg.train.global_batch_size:
        return cfg.train.grad_accum_steps
    per_step = cfg.train.micro_batch_size * world_size
    if cfg.train.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x world size = {cfg.train.micro_batch_size} x {world_size}")
    return cfg.train.global_batch_size // per_step


def choose_instruction(prompts: List[str], seed: int, rank: int, step: int, micro: int) -> Optional[str]:
    """One instruction per micro-batch, drawn as the original's random.choice, but reproducibly."""
    if not prompts:
        return None
    return random.Random(f"{seed}:{rank}:{step}:{micro}").choice(prompts)


def flops_metrics(flops_per_s: float, world: int, peak_flops: float) -> dict:
    """Achieved model FLOP/s per device, and MFU against the configured peak (see mgpt4_dist/flops.py)."""
    per_device = flops_per_s / world
    return {"flops_per_s": per_device, "mfu": per_device / peak_flops if peak_flops > 0 else None}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class StopSignal:
    """SIGUSR1, SIGTERM and SIGINT (Ctrl-C) ask for a checkpoint and an exit at the end of the current step.

    Slurm sends USR1 before the time limit and TERM on preemption, torchrun and the deepspeed launcher
    pass TERM/INT on; the ranks finish the step, agree, checkpoint and exit EXIT_PREEMPTED (75). A second
    Ctrl-C stops at once: after the first, SIGINT has its default action again, which ends the process
    even inside a collective or a checkpoint write (no checkpoint then; a half-written one is discarded
    on resume). Installed by main() before anything starts, so a signal that arrives while the model
    builds is not lost. DataLoader workers ignore these signals (mgpt4_dist.data.pipeline.STOP_SIGNALS).
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        if self.received is None:
            print(f"[rank {os.environ.get('RANK', '0')}] got {signal.Signals(signum).name}: checkpointing at the "
                  f"end of this step, then exiting with {EXIT_PREEMPTED}"
                  + (" (Ctrl-C again to stop at once, without a checkpoint)" if signum == signal.SIGINT else ""),
                  file=sys.stderr, flush=True)
        self.received = signum

    def restore(self) -> None:
        """Give the signals back to whoever had them (a caller of main() in the same process)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self) -> bool:
        # Every rank must stop at the same step, so the ranks agree on it collectively.
        return dist.all_reduce_max(1.0 if self.received else 0.0) > 0


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"[%(asctime)s rank{rank}] %(message)s", datefmt="%H:%M:%S", force=True)
    for noisy in ("deepspeed", "DeepSpeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train(cfg: JobConfig, profile: bool = False, stop: Optional[StopSignal] = None) -> dict:
    info, device = dist.init_distributed(cfg.parallel.timeout_minutes)
    envreport.report_environment(info, device)
    rank, world = info.rank, info.world_size
    setup_logging(rank)
    accum = resolve_grad_accum(cfg, world)
    sources = resolve_sources([(s.pattern, s.weight) for s in shard_sources(cfg.data)], cfg.data.retries,
                              cfg.data.retry_backoff_s)
    prompts = load_prompts(cfg.data)
    require_frozen_weights(cfg.model)
    check_sources_kind(sources, cfg.data.features, cfg.model)
    check_eval_config(cfg)
    point = find_resume_point(cfg)
    # Before anything is written: no second run over an earlier one, no silent change on resume.
    if run_dir.prepare(cfg, point, rank, world, accum) == "finished":
        return {"step": point.step, "loss": None, "checkpoint": point.path,
                "run_dir": cfg.run_dir, "preempted": False}
    if rank == 0:
        os.makedirs(cfg.run_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.run_dir, "config.yaml"))
    log.info("world %d (%s launcher, %s), micro batch %d x accum %d x %d ranks = %d per step",
             world, info.launcher, device, cfg.train.micro_batch_size, accum, world,
             cfg.train.micro_batch_size * accum * world)

    model = build_model(cfg, world, accum, device, proj_state_for(cfg.model))
    flops_model = FlopsModel.from_model(model)
    tokenizer = load_tokenizer(cfg.model.llm_path)
    build_text = SequenceBuilder(tokenizer, model.num_image_tokens, cfg.data.max_txt_len, cfg.data.end_sym,
                                 cfg.model.max_context_len)
    engine = build_engine(cfg, model, world, accum)
    backend_config = engine.backend_config()
    if rank == 0 and backend_config is not None:
        name, content = backend_config
        with open(os.path.join(cfg.run_dir, name), "w") as f:
            json.dump(content, f, indent=2)

    # Per-rank RNG streams; replaced by the checkpoint's states on resume.
    random.seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)
    torch.manual_seed(cfg.train.seed + rank)
    step, nonfinite_steps, data_start = 0, 0, None
    if point is not None:
        state = load_checkpoint(engine, point, cfg, rank, world)
        step, nonfinite_steps, data_start = state["step"], state.get("nonfinite_steps", 0), state["data"]
        set_rng_state(state["rng"])
        log.info("resumed from %s at step %d", point.path, step)

    loader = build_batch_loader(
        cfg.data, sources, rank=rank, world_size=world, seed=cfg.train.seed, batch_size=cfg.train.micro_batch_size,
        image_size=cfg.model.vit.img_size, start=data_start, pin_memory=device.type == "cuda")
    metrics = MetricsLogger(cfg.run_dir, cfg.train.max_steps, enabled=rank == 0,
                            tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress, resume_step=step)
    evaluator = Evaluator(cfg, build_text, rank, world, device, metrics, step) if cfg.eval.shards else None
    last_step = min(cfg.train.stop_at_step or cfg.train.max_steps, cfg.train.max_steps)
    stop = stop or StopSignal()
    ckpt_dir = None
    last_loss = float("nan")

    def checkpoint(at_step: int) -> str:
        trainer_state = {"data": loader.state_dict(), "nonfinite_steps": nonfinite_steps, "world_size": world}
        try:
            return save_checkpoint(engine, cfg, at_step, trainer_state, rank)
        except BaseException as e:  # torch.distributed.checkpoint's CheckpointException is a BaseException
            cause = disk_full_cause(e, cfg.run_dir)
            if cause is None:
                raise
            # The save writes a temp folder and renames it, so the previous checkpoint is whole.
            root = checkpoints_dir(cfg.run_dir)
            tag = read_latest(root)
            last = os.path.join(root, tag) if tag else None
            raise DiskFullError(
                f"the disk under run_dir={cfg.run_dir} is full: the checkpoint of step {at_step} could not be "
                f"written ({' '.join(str(cause).split())[:160]}); "
                + (f"the last complete checkpoint is {last}: free space there (or move the run to a larger disk) "
                   f"and run the same command to resume from it" if last else
                   "no complete checkpoint exists yet: free space there or set run_dir to a larger disk")) from e

    profiler = StepProfiler(cfg.run_dir, rank, enabled=profile)
    while step < last_step:
        dist.mark_step(rank, step + 1)  # liveness record for the hung-rank error (and MGPT4_TEST_HANG)
        step_start, step_lr = time.perf_counter(), engine.lr()
        data_wait, losses, tokens, samples, micro, in_row, step_flops = 0.0, [], 0, 0, 0, 0, 0.0
        while micro < accum:
            wait_start = time.perf_counter()
            batch = next(loader)
            data_wait += time.perf_counter() - wait_start
            text = build_text(batch["answers"], choose_instruction(prompts, cfg.train.seed, rank, step, micro))
            loss = engine.forward(batch["images"].to(device, non_blocking=True), text.to(device))
            # Every rank must skip together, or the gradient collectives would hang.
            if dist.all_reduce_max(0.0 if torch.isfinite(loss).item() else 1.0) > 0:
                nonfinite_steps += 1
                in_row += 1
                log.warning("non-finite loss at step %d; batch dropped (%d in a row)", step + 1, in_row)
                if in_row >= cfg.train.max_nonfinite_in_row:
                    raise TrainingAborted(
                        f"{in_row} non-finite losses in a row at step {step + 1}: aborting. The last good "
                        f"checkpoint is intact under {os.path.join(cfg.run_dir, 'checkpoints')}; lower optim.lr "
                        f"or check the data and precision (train.precision={cfg.train.precision})")
                continue
            in_row = 0
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach())  # read once per step, below: no host sync per micro-batch
            tokens += text.num_scored_tokens
            step_flops += flops_model.step(len(batch["answers"]), text.input_ids_BT.shape[1], text.num_scored_tokens,
                                           cached_features=cfg.data.features)
            samples += len(batch["answers"])
            micro += 1
        step += 1
        profiler.step()
        last_loss = dist.all_reduce_sum(float(torch.stack(losses).double().sum()) / len(losses)) / world

        if step % cfg.train.log_every == 0 or step == last_step:
            step_time = time.perf_counter() - step_start
            metrics.log(step, {
                "loss": last_loss, "lr": step_lr, "grad_norm": engine.grad_norm(),
                "samples_per_s": dist.all_reduce_sum(samples) / step_time,
                "tokens_per_s": dist.all_reduce_sum(tokens) / step_time,
                **flops_metrics(dist.all_reduce_sum(step_flops) / step_time, world, cfg.logging.peak_flops),
                "step_time_s": step_time, "data_wait_s": dist.all_reduce_max(data_wait),
                "max_mem_bytes": int(dist.all_reduce_max(peak_memory_bytes(device))),
                "skipped": int(dist.all_reduce_sum(loader.skipped)), "nonfinite_steps": nonfinite_steps,
                "skipped_shards": int(dist.all_reduce_sum(loader.skipped_shards)),
                "fp16_skipped_steps": engine.skipped_steps(),
            })
        if evaluator is not None and evaluator.due(step, last_step):
            # After the step's record, so eval time counts in neither step_time_s nor samples_per_s.
            evaluator.run(engine.module, step)
        preempted = stop.agreed()
        if step % cfg.checkpoint.every_steps == 0 or step == last_step or preempted:
            ckpt_dir = checkpoint(step)
        if preempted:
            log.info("signal %s: checkpoint written at step %d, exiting for requeue", stop.received, step)
            break

    profiler.stop()
    loader.close()
    metrics.close()
    summary = {"step": step, "loss": last_loss, "checkpoint": ckpt_dir, "run_dir": cfg.run_dir,
               "preempted": stop.received is not None and step < last_step}
    if rank == 0:
        print(f"done: step {step}/{cfg.train.max_steps}, loss {last_loss:.4f}; wrote {cfg.run_dir}/metrics.jsonl, "
              f"{cfg.run_dir}/tb/, checkpoint {ckpt_dir or step_tag(step) + ' (none written)'}", flush=True)
        print(f"view with: tensorboard --logdir {os.path.join(cfg.run_dir, 'tb')}", flush=True)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="mgpt4-train",
        description="Train MiniGPT-4 (stage 1 or 2) with DeepSpeed ZeRO 0-3 or FSDP2 (parallel.backend), as one "
                    "process or under torchrun, the deepspeed launcher or srun. Config keys can be overridden with "
                    "dotted key=value arguments; keys left unset take the defaults declared in mgpt4_dist/config.py "
                    "(--print-config shows every resolved value). Resumes from RUN_DIR/checkpoints/latest "
                    "(checkpoint.resume=auto, the default).",
        epilog=examples(
            "mgpt4-train --config mgpt4_dist/configs/tiny_stage1.yaml train.max_steps=50 run_dir=/tmp/r",
            "torchrun --nproc-per-node 8 -m mgpt4_dist.train --config mgpt4_dist/configs/stage1_vicuna7b.yaml "
            "parallel.backend=fsdp",
            "deepspeed --num_gpus 8 --module mgpt4_dist.train --config mgpt4_dist/configs/stage2_vicuna7b.yaml "
            "'data.shards=[{pattern: cc_sbu_align_shards/*.tar, weight: 1}]'"))
    p.add_argument("--config", required=True, help="YAML config (see mgpt4_dist/configs/)")
    p.add_argument("overrides", nargs="*",
                   help="key.sub=value overrides, parsed by the key's declared type, e.g. train.max_steps=50 "
                        "'data.shards=[a/{000..009}.tar,{pattern: b/*.tar, weight: 2}]'")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--profile", action="store_true",
                   help="trace steps 3-5 with torch.profiler into RUN_DIR/profile/ (Chrome/Perfetto JSON per rank)")
    # The deepspeed launcher appends --local_rank; ranks are read from the environment instead.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # Every rank sees the same user error; rank 0 says it once and every rank exits 2.
    rank0 = dist.world_info_from_env().rank == 0
    try:
        cfg = load_config(args.config, args.overrides)
    except UserError as e:
        return report_user_error("mgpt4-train", e, show=rank0)
    if args.print_config:
        import yaml

        from mgpt4_dist.config import to_dict

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    stop = StopSignal()
    try:
        summary = train(cfg, profile=args.profile, stop=stop)
        if summary["preempted"]:
            # A rank that leaves non-zero makes srun --kill-on-bad-exit and the deepspeed launcher kill
            # the others: wait until every rank is done (checkpoint, metrics, workers) before leaving.
            dist.barrier()
            print(f"mgpt4-train: stopped by {signal.Signals(stop.received).name} at step {summary['step']}: "
                  f"checkpointed, resume with the same command (exit {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
            return EXIT_PREEMPTED
    except TrainingAborted as e:
        print(f"mgpt4-train: error: {e}", file=sys.stderr)
        return 3
    except (UserError, FileNotFoundError) as e:
        # FileNotFoundError: checkpoint.resume paths and step files are still reported with it.
        return report_user_error("mgpt4-train", e, show=rank0)
    except (torch.distributed.DistError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not dist.is_collective_failure(e):
            raise
        # A peer died or hung past parallel.timeout_minutes. Exit at once, skipping the process
        # group teardown (it can block on the dead peer); the launcher (srun --kill-on-bad-exit,
        # torchrun, deepspeed) then stops the other ranks.
        print(f"mgpt4-train: error: {dist.describe_collective_failure(e, cfg.parallel.timeout_minutes)}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_COLLECTIVE_FAILURE)
    finally:
        dist.cleanup()
        stop.restore()
    return 0


if __name__ == "__main__":
    exit_code = main()
    # Every launcher runs ranks as `python -m mgpt4_dist.train`. Leave without the interpreter's
    # teardown: a native thread left by the comm extensions can abort a rank there ("terminate called
    # without an active exception", SIGABRT, seen once after a finished ZeRO-3 run), and the launcher
    # would then report a failed run whose checkpoint, metrics and events were all written and closed.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
