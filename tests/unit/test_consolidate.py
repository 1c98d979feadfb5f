"""The streaming checkpoint readers: DeepSpeed's against its own zero_to_fp32, on hand-built ZeRO layouts
with awkward sizes (parameters split across ranks, uneven partitions, several groups); FSDP's on a
torch.distributed.checkpoint folder in the layout FSDPEngine.save writes (real multi-rank FSDP
checkpoints: tests/e2e/test_consolidate_cli.py, tests/distributed/test_resume.py)."""
import math
import os
from collections import OrderedDict

import pytest
import torch

from mgpt4_dist.consolidate import DeepSpeedCheckpoint, resolve_step_dir

SHAPES = [OrderedDict([("llama_proj.weight", torch.Size([7, 5])), ("extra.weight", torch.Size([3]))]),
          OrderedDict([("llama_proj.bias", torch.Size([7]))])]


def full_tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for group in SHAPES for n, s in group.items()}


def write_checkpoint(step_dir, stage, world, fp16_scale=None):
    os.makedirs(step_dir)
    values = {kind: full_tensors(i) for i, kind in enumerate(("fp32", "exp_avg", "exp_avg_sq"))}
    model_name = "mp_rank_00_model_states.pt" if stage <= 2 else "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"module": {}, "buffer_names": [], "param_shapes": SHAPES, "frozen_param_shapes": None,
                "shared_params": {}, "ds_version": "0.19.8", "frozen_param_fragments": None,
                "dp_world_size": world, "lr_scheduler": {}, "global_steps": 5}, os.path.join(step_dir, model_name))
    per_rank = {kind: [[] for _ in range(world)] for kind in values}
    for kind, tensors in values.items():
        for group in SHAPES:
            if stage <= 2:  # one flat vector per group, padded, split in equal consecutive partitions
                flat = torch.cat([tensors[n].flatten() for n in group])
                size = 2 * world * math.ceil(flat.numel() / (2 * world))
                flat = torch.cat([flat, torch.zeros(size - flat.numel())])
                for r, part in enumerate(flat.chunk(world)):
                    per_rank[kind][r].append(part.clone())
            else:  # every parameter split in ceil(numel / world) pieces, one per rank
                pieces = [[] for _ in range(world)]
                for n in group:
                    t = tensors[n].flatten()
                    part = math.ceil(t.numel() / world)
                    t = torch.cat([t, torch.zeros(part * world - t.numel())])
                    for r in range(world):
                        pieces[r].append(t[r * part:(r + 1) * part])
                for r in range(world):
                    per_rank[kind][r].append(torch.cat(pieces[r]))
    for r in range(world):
        state = {g: {"step": torch.tensor(5.0), "exp_avg": per_rank["exp_avg"][r][g],
                     "exp_avg_sq": per_rank["exp_avg_sq"][r][g]} for g in range(len(SHAPES))}
        osd = {"zero_stage": stage, "partition_count": world}
        if fp16_scale is not None:
            from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

            osd.update(dynamic_loss_scale=True, loss_scaler=DynamicLossScaler(fp16_scale, 1000, 1, 2, False))
        if stage <= 2:
            osd.update(single_partition_of_fp32_groups=per_rank["fp32"][r],
                       base_optimizer_state={"state": state, "param_groups": []},
                       param_alignment_paddings=[[0] * len(g) for g in SHAPES])
        else:
            osd.update(fp32_flat_groups=per_rank["fp32"][r], optimizer_state_dict={"state": state, "param_groups": []})
        torch.save({"optimizer_state_dict": osd},
                   os.path.join(step_dir, f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"))
    return values


@pytest.mark.parametrize("stage,world", [(2, 1), (2, 2), (2, 3), (3, 2), (3, 3)])
def test_reader_equals_zero_to_fp32_and_recovers_moments(tmp_path, stage, world):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = tmp_path / "checkpoints"
    values = write_checkpoint(str(root / "step_00000005"), stage, world)
    (root / "latest").write_text("step_00000005")
    ref = get_fp32_state_dict_from_zero_checkpoint(str(root), exclude_frozen_parameters=True)
    reader = DeepSpeedCheckpoint(resolve_step_dir(str(root / "latest")))
    assert (reader.zero_stage, reader.world_size, reader.optimizer_step()) == (stage, world, 5)
    got = reader.tensors("fp32")
    assert list(got) == [n for g in SHAPES for n in g]
    for name in got:
        assert torch.equal(got[name], ref[name]) and torch.equal(got[name], values["fp32"][name])
    for kind in ("exp_avg", "exp_avg_sq"):
        for name, tensor in reader.iter_tensors(kind):
            assert torch.equal(tensor, values[kind][name]), (kind, name)
    assert reader.counters() == {"global_steps": 5, "global_samples": 0, "skipped_steps": 0, "loss_scale": None}


def test_deepspeed_reader_carries_the_fp16_loss_scale(tmp_path):
    write_checkpoint(str(tmp_path / "step_00000005"), 2, 2, fp16_scale=512.0)
    assert DeepSpeedCheckpoint(str(tmp_path / "step_00000005")).counters()["loss_scale"] == 512.0


def test_incomplete_checkpoint_is_reported(tmp_path):
    from mgpt4_dist.consolidate import CheckpointFormatError

    step = tmp_path / "step_00000005"
    write_checkpoint(str(step), 2, 2)
    os.remove(step / "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointFormatError, match="expected 2 .*found 1"):
        DeepSpeedCheckpoint(str(step))
    with pytest.raises(CheckpointFormatError, match="no DeepSpeed"):
        DeepSpeedCheckpoint(str(tmp_path))


def write_fsdp_checkpoint(step_dir):
    """The layout FSDPEngine.save writes: DCP {"model", "optim"} keyed by parameter name + engine_state.pt."""
    import json
    import warnings

    import torch.distributed.checkpoint as dcp

    values = {kind: full_tensors(i) for i, kind in enumerate(("fp32", "exp_avg", "exp_avg_sq"))}
    names = list(values["fp32"])
    state = {"model": dict(values["fp32"]),
             "optim": {"state": {n: {"exp_avg": values["exp_avg"][n], "exp_avg_sq": values["exp_avg_sq"][n],
                                     "step": torch.tensor(5.0)} for n in names},
                       "param_groups": [{"lr": 1e-3, "params": names}]}}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=step_dir, no_dist=True)
    schedule = {"last_epoch": 5, "base_lrs": [1e-3], "_last_lr": [4e-4]}
    torch.save({"scheduler": schedule, "scaler": {"scale": 256.0, "good_steps": 3}, "global_steps": 6,
                "skipped_steps": 1, "micro": 12}, os.path.join(step_dir, "engine_state.pt"))
    with open(os.path.join(step_dir, "meta.json"), "w") as f:
        json.dump({"step": 6, "world_size": 2, "backend": "fsdp", "zero_stage": 2}, f)
    return values, schedule


def test_fsdp_reader_gives_each_tensor_moments_and_counters(tmp_path):
    from mgpt4_dist.consolidate import FSDPCheckpoint, read_checkpoint

    step_dir = str(tmp_path / "step_00000006")
    values, schedule = write_fsdp_checkpoint(step_dir)
    reader = read_checkpoint(step_dir)
    assert isinstance(reader, FSDPCheckpoint)
    assert reader.names() == list(values["fp32"])
    assert reader.shapes() == {n: t.shape for n, t in values["fp32"].items()}
    for kind, tensors in values.items():
        got = reader.tensors(kind)
        assert list(got) == list(tensors)
        for name, tensor in tensors.items():
            assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), (kind, name)
    assert reader.optimizer_step() == 5
    assert reader.lr_scheduler == schedule
    assert reader.counters() == {"global_steps": 6, "skipped_steps": 1, "loss_scale": 256.0}


def test_read_checkpoint_picks_the_reader_from_meta(tmp_path):
    import json

    from mgpt4_dist.consolidate import CheckpointFormatError, read_checkpoint

    step_dir = tmp_path / "step_00000005"
    write_checkpoint(str(step_dir), 2, 1)
    assert isinstance(read_checkpoint(str(step_dir)), DeepSpeedCheckpoint)  # no meta.json: DeepSpeed
    (step_dir / "meta.json").write_text(json.dumps({"backend": "fsdp"}))
    with pytest.raises(CheckpointFormatError, match="no torch.distributed.checkpoint .metadata"):
        read_checkpoint(str(step_dir))
    (step_dir / "meta.json").write_text(json.dumps({"backend": "ddp"}))
    with pytest.raises(CheckpointFormatError, match="deepspeed, fsdp"):
        read_checkpoint(str(step_dir))


class _OpensAFile:
    """A pickled object that would create a file when unpickled: what a hostile checkpoint can do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_with_foreign_pickled_objects_is_refused_unrun(tmp_path):
    from mgpt4_dist.consolidate import CheckpointFormatError

    marker = tmp_path / "ran"
    step = tmp_path / "step_00000001"
    step.mkdir()
    torch.save({"param_shapes": [OrderedDict(w=torch.Size([2]))], "module": {}, "payload": _OpensAFile(str(marker))},
               step / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointFormatError, match="outside the DeepSpeed allowlist"):
        DeepSpeedCheckpoint(str(step))
    assert not marker.exists()
