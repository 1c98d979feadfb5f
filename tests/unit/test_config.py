"""Config tree: YAML loading, typed dotted overrides, unknown keys, shipped configs."""
import glob
import os

import pytest
import yaml

from mgpt4_dist.config import (ConfigError, ShardSource, config_from_dict, load_config, load_prompts, save_config,
                               shard_sources, to_dict)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "mgpt4_dist", "configs", "tiny_stage1.yaml")


def test_overrides_parse_by_declared_type():
    cfg = load_config(TINY, ["train.max_steps=50", "run_dir=/tmp/r", "optim.lr=3e-4", "data.resample=false",
                             "data.end_sym=###", "train.precision=bf16", "optim.betas=[0.8,0.95]"])
    assert cfg.train.max_steps == 50 and isinstance(cfg.train.max_steps, int)
    assert cfg.run_dir == "/tmp/r"
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.resample is False
    assert cfg.data.end_sym == "###"  # literal, not a YAML comment
    assert cfg.optim.betas == [0.8, 0.95]


def test_string_override_is_literal():
    cfg = load_config(TINY, ["data.prompt_template=[INST] {} [/INST] ", "data.end_sym=true", "model.llm_path=123"])
    assert cfg.data.prompt_template == "[INST] {} [/INST] "
    assert cfg.data.end_sym == "true"
    assert cfg.model.llm_path == "123"


def test_shard_list_keeps_braces_and_globs():
    cfg = load_config(TINY, ["data.shards=[/d/a-{000..007}.tar,/e/*.tar,/f/{x,y}.tar]"])
    assert cfg.data.shards == ["/d/a-{000..007}.tar", "/e/*.tar", "/f/{x,y}.tar"]
    assert [s.weight for s in shard_sources(cfg.data)] == [1.0, 1.0, 1.0]


def test_weighted_sources_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"shards": [{"pattern": "/a/{0..3}.tar", "weight": 115}, "/b/*.tar"]}}))
    sources = shard_sources(load_config(str(path)).data)
    assert sources == [ShardSource("/a/{0..3}.tar", 115.0), ShardSource("/b/*.tar", 1.0)]


@pytest.mark.parametrize("override, key", [
    ("train.max_stepz=5", "train.max_stepz"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("model.vit.widht=3", "model.vit.widht"),
])
def test_unknown_override_key_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, [override])


def test_unknown_yaml_key_names_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(str(path))


@pytest.mark.parametrize("override, key", [
    ("train.max_steps=ten", "train.max_steps"),
    ("data.resample=maybe", "data.resample"),
    ("train.precision=fp8", "train.precision"),
    ("parallel.zero_stage=4", "parallel.zero_stage"),
])
def test_wrong_type_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(TINY, [override])


def test_wrong_type_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  micro_batch_size: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size"):
        load_config(str(path))


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(TINY, ["data.end_sym=\n", "data.shards=[/a/{0..1}.tar]"])
    save_config(cfg, str(tmp_path / "config.yaml"))
    again = config_from_dict(yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "mgpt4_dist", "configs", "*.yaml"))))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    name = os.path.basename(path)
    if name.startswith("stage1"):
        assert (cfg.data.max_txt_len, cfg.data.end_sym, cfg.optim.lr, cfg.optim.min_lr) == (32, "\n", 1e-4, 8e-5)
        assert (cfg.optim.warmup_steps, cfg.train.max_steps, cfg.train.micro_batch_size) == (5000, 20000, 64)
        assert [s.weight for s in shard_sources(cfg.data)] == [115.0, 14.0]
    if name.startswith("stage2"):
        end_sym, template = ("</s>", "[INST] {} [/INST] ") if "llama2" in name else ("###", "###Human: {} ###Assistant: ")
        assert (cfg.data.max_txt_len, cfg.data.end_sym, cfg.optim.lr, cfg.optim.min_lr) == (160, end_sym, 3e-5, 1e-5)
        assert (cfg.optim.warmup_steps, cfg.train.max_steps, cfg.train.micro_batch_size) == (200, 1000, 12)
        assert cfg.data.prompt_template == template
        assert not cfg.data.clean_captions
    assert cfg.model.has_qformer == ("llama2" not in name)
    if "vicuna13b" in name:
        assert "13b" in cfg.model.llm_path
    assert cfg.optim.weight_decay == 0.05


def test_tiny_stage2_towers_match_tiny_stage1():
    # Stage 2 resumes stage 1's towers: the sizes are written twice in YAML, so they must not drift.
    stage1 = load_config(TINY)
    stage2 = load_config(os.path.join(os.path.dirname(TINY), "tiny_stage2.yaml"))
    assert to_dict(stage2)["model"]["vit"] == to_dict(stage1)["model"]["vit"]
    assert to_dict(stage2)["model"]["qformer"] == to_dict(stage1)["model"]["qformer"]


def test_prompts_formatted_with_template(tmp_path):
    prompt_file = tmp_path / "alignment.txt"
    prompt_file.write_text("<Img><ImageHere></Img> Describe this image in detail.\nno placeholder here\n")
    cfg = load_config(TINY, ["data.prompt_template=###Human: {} ###Assistant: ", f"data.prompt_path={prompt_file}"])
    assert load_prompts(cfg.data) == ["###Human: <Img><ImageHere></Img> Describe this image in detail. ###Assistant: "]
    cfg = load_config(TINY, ["data.prompts=[no image here]"])
    with pytest.raises(ConfigError, match="ImageHere"):
        load_prompts(cfg.data)


def test_vit_precision_choices_and_refused_combinations():
    assert load_config(TINY).model.vit_precision == "train"
    assert load_config(TINY).parallel.zero_init is True
    assert load_config(TINY, ["model.vit_precision=fp16"]).model.vit_precision == "fp16"
    with pytest.raises(ConfigError, match="model.vit_precision: 'fp8'"):
        load_config(TINY, ["model.vit_precision=fp8"])
    # FSDP computes every unit in train.precision: an own ViT dtype is refused with the fix named
    with pytest.raises(ConfigError, match="set model.vit_precision=train or use parallel.backend=deepspeed"):
        load_config(TINY, ["parallel.backend=fsdp", "model.vit_precision=bf16"])
    load_config(TINY, ["parallel.backend=fsdp", "model.vit_precision=fp32"])  # = train.precision of the tiny config
    with pytest.raises(ConfigError, match="needs parallel.zero_init=true"):
        load_config(TINY, ["parallel.zero_stage=3", "parallel.zero_init=false", "train.precision=bf16",
                           "model.vit_precision=fp16"])


def test_original_vit_precision_is_imported():
    from mgpt4_dist.import_config import import_original

    report = import_original({"model": {"arch": "minigpt4"}, "run": {"amp": True}})
    assert report.config.model.vit_precision == "fp16"  # the original's default, mapped, not ignored
    assert ("model.vit_precision", "model.vit_precision", "fp16") in report.mapped
    assert not any(src == "model.vit_precision" for src, _ in report.ignored)
    report = import_original({"model": {"vit_precision": "fp32"}})
    assert report.config.model.vit_precision == "fp32"


@pytest.mark.parametrize("sharding", [["parallel.zero_stage=3"], ["parallel.backend=fsdp"]])
def test_compiled_towers_are_refused_with_sharded_towers(sharding):
    with pytest.raises(ConfigError, match=r"train\.compile_towers"):
        load_config(TINY, ["train.compile_towers=true", *sharding])


def test_eval_section_is_off_by_default_and_checked_when_on():
    from mgpt4_dist.config import ConfigError, load_config

    assert load_config(None).eval.shards == []
    cfg = load_config(None, ["eval.shards=[held/{0..3}.tar]", "eval.every_steps=50", "eval.metric_samples=0"])
    assert cfg.eval.shards == ["held/{0..3}.tar"] and cfg.eval.every_steps == 50 and cfg.eval.metric_samples == 0
    with pytest.raises(ConfigError, match="eval.every_steps must be >= 1"):
        load_config(None, ["eval.shards=[h.tar]", "eval.every_steps=0"])
    with pytest.raises(ConfigError, match="eval.metric_samples"):
        load_config(None, ["eval.shards=[h.tar]", "eval.metric_samples=-2"])
