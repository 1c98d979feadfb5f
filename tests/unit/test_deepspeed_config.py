"""The DeepSpeed JSON of a run (`derive_ds_config`): the shipped template of the stage, the user's
`parallel.deepspeed_config` merged over it, and the values the run config owns on top; a user JSON
that contradicts the run config, and one given to FSDP, are refused naming both sides."""
import json
import os

import pytest

from mgpt4_dist.config import ConfigError, load_config
from mgpt4_dist.errors import MissingFileError
from mgpt4_dist.parallel.deepspeed_engine import TEMPLATE_DIR, derive_ds_config, load_template

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def user_json(tmp_path, content) -> str:
    path = str(tmp_path / "ds.json")
    with open(path, "w") as f:
        json.dump(content, f)
    return path


def test_templates_are_the_package_data_and_the_top_level_copies_match():
    assert os.path.realpath(TEMPLATE_DIR) == os.path.join(REPO, "mgpt4_dist", "ds_configs")
    for stage in range(4):
        template = load_template(stage)
        assert template["zero_optimization"]["stage"] == stage
        with open(os.path.join(REPO, "ds_configs", f"zero{stage}.json")) as f:  # the user-facing copy
            assert json.load(f) == template


def test_without_a_user_json_the_template_plus_the_run_config():
    cfg = load_config(None, ["parallel.zero_stage=2", "train.micro_batch_size=3", "train.precision=bf16",
                             "parallel.offload=optimizer"])
    ds = derive_ds_config(cfg, world_size=4, grad_accum_steps=2)
    assert ds["zero_optimization"]["reduce_bucket_size"] == load_template(2)["zero_optimization"]["reduce_bucket_size"]
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 24)
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["fp16"]["hysteresis"] == 2
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_param" not in ds["zero_optimization"]


def test_user_json_is_merged_under_the_run_config(tmp_path):
    path = user_json(tmp_path, {"zero_optimization": {"reduce_bucket_size": 1234, "stage": 2},
                                "train_micro_batch_size_per_gpu": "auto", "fp16": {"hysteresis": 4},
                                "wall_clock_breakdown": True, "gradient_clipping": 1.0})
    cfg = load_config(None, ["parallel.zero_stage=2", f"parallel.deepspeed_config={path}", "optim.grad_clip=1.0"])
    ds = derive_ds_config(cfg, world_size=2, grad_accum_steps=1)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1234  # the user's
    assert ds["zero_optimization"]["overlap_comm"] is True  # the template's, kept
    assert ds["wall_clock_breakdown"] is True and ds["fp16"]["hysteresis"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size and "auto" not in json.dumps(ds)


@pytest.mark.parametrize("content,message", [
    ({"train_micro_batch_size_per_gpu": 4}, r"sets train_micro_batch_size_per_gpu=4, but the run config gives 2 "
                                            r"\(train.micro_batch_size=2\)"),
    ({"gradient_accumulation_steps": 8}, r"gradient_accumulation_steps=8, but the run config gives 1 "
                                         r"\(train.grad_accum_steps=1\)"),
    ({"bf16": {"enabled": True}}, r"bf16.enabled=true, but the run config gives false \(train.precision=fp32\)"),
    ({"zero_optimization": {"stage": 3}}, r"zero_optimization.stage=3, but the run config gives 2 "
                                          r"\(parallel.zero_stage=2\)"),
    ({"zero_optimization": {"offload_optimizer": {"device": "nvme"}}},
     r"offload_optimizer.device=\"nvme\", but the run config gives \"none\" \(parallel.offload=none\)"),
    ({"gradient_clipping": 0.5}, r"gradient_clipping=0.5, but the run config gives 1.0 \(optim.grad_clip=1.0\)"),
    ({"optimizer": {"type": "Adam"}}, r"'optimizer' section, but the run config owns it"),
])
def test_a_user_json_contradicting_the_run_config_is_refused(tmp_path, content, message):
    path = user_json(tmp_path, content)
    cfg = load_config(None, ["parallel.zero_stage=2", "train.micro_batch_size=2", "train.grad_accum_steps=1",
                             "train.precision=fp32", "optim.grad_clip=1.0", f"parallel.deepspeed_config={path}"])
    with pytest.raises(ConfigError, match=f"parallel.deepspeed_config={path} .*{message}"):
        derive_ds_config(cfg, world_size=2, grad_accum_steps=1)


def test_a_missing_or_broken_user_json_and_fsdp_are_refused(tmp_path):
    cfg = load_config(None, [f"parallel.deepspeed_config={tmp_path / 'nope.json'}"])
    with pytest.raises(MissingFileError, match="nope.json: no such file"):
        derive_ds_config(cfg, 1, 1)
    (tmp_path / "bad.json").write_text("{not json")
    cfg = load_config(None, [f"parallel.deepspeed_config={tmp_path / 'bad.json'}"])
    with pytest.raises(ConfigError, match="bad.json: not a readable JSON file"):
        derive_ds_config(cfg, 1, 1)
    with pytest.raises(ConfigError, match="is a DeepSpeed JSON, but parallel.backend=fsdp"):
        load_config(None, ["parallel.backend=fsdp", f"parallel.deepspeed_config={user_json(tmp_path, {})}"])
