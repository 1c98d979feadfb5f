"""mgpt4-import-config on copies of the original configs' fields."""
import subprocess
import sys


from mgpt4_dist.config import load_config, shard_sources

CLI = [sys.executable, "-m", "mgpt4_dist.cli.import_config"]

STAGE1 = """
model:
  arch: minigpt4
  model_type: pretrain_vicuna0
datasets:
  laion:
    batch_size: 64
    vis_processor: {train: {name: "blip2_image_train", image_size: 224}}
    text_processor: {train: {name: "blip_caption"}}
    sample_ratio: 115
  cc_sbu:
    batch_size: 64
    vis_processor: {train: {name: "blip2_image_train", image_size: 224}}
    text_processor: {train: {name: "blip_caption"}}
    sample_ratio: 14
run:
  task: image_text_pretrain
  lr_sched: "linear_warmup_cosine_lr"
  init_lr: 1e-4
  min_lr: 8e-5
  warmup_lr: 1e-6
  weight_decay: 0.05
  max_epoch: 4
  batch_size_train: 64
  num_workers: 4
  warmup_steps: 5000
  iters_per_epoch: 5000
  seed: 42
  output_dir: "output/minigpt4_stage1_pretrain"
  amp: True
  resume_ckpt_path: null
  evaluate: False
  train_splits: ["train"]
  device: "cuda"
  world_size: 1
  dist_url: "env://"
  distributed: True
  wandb_log: True
"""

STAGE2_LLAMA2 = """
model:
  arch: minigpt4
  model_type: pretrain_llama2
  max_txt_len: 160
  end_sym: "</s>"
  prompt_path: "prompts/alignment.txt"
  prompt_template: '[INST] {} [/INST] '
  ckpt: '/path/to/stage1/checkpoint/'
datasets:
  cc_sbu_align:
    batch_size: 12
    vis_processor: {train: {name: "blip2_image_train", image_size: 224}}
    text_processor: {train: {name: "blip_caption"}}
run:
  task: image_text_pretrain
  init_lr: 3e-5
  min_lr: 1e-5
  warmup_lr: 1e-6
  weight_decay: 0.05
  max_epoch: 5
  iters_per_epoch: 200
  warmup_steps: 200
  seed: 42
  amp: True
"""

EVAL = """
model:
  arch: minigpt4
  model_type: pretrain_vicuna0
  max_txt_len: 160
  end_sym: "###"
  low_resource: True
  prompt_template: '###Human: {} ###Assistant: '
  ckpt: 'please set this value to the path of pretrained checkpoint'
datasets:
  cc_sbu_align:
    vis_processor: {train: {name: "blip2_image_eval", image_size: 224}}
    text_processor: {train: {name: "blip_caption"}}
run:
  task: image_text_pretrain
"""


def convert(tmp_path, text):
    src, out = tmp_path / "orig.yaml", tmp_path / "ours.yaml"
    src.write_text(text)
    proc = subprocess.run(CLI + [str(src), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return load_config(str(out)), proc.stdout


def test_stage1_recipe_and_defaults(tmp_path):
    cfg, out = convert(tmp_path, STAGE1)
    assert (cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_start_lr) == (1e-4, 8e-5, 1e-6)
    assert (cfg.optim.warmup_steps, cfg.optim.weight_decay, cfg.train.max_steps) == (5000, 0.05, 20000)
    assert cfg.train.micro_batch_size == 64 and cfg.train.seed == 42 and cfg.train.precision == "fp16"
    # left out by the file: the original's defaults
    assert (cfg.data.max_txt_len, cfg.data.end_sym, cfg.data.prompt_template, cfg.data.prompts) == (32, "\n", "", [])
    assert cfg.data.clean_captions and cfg.model.has_qformer
    assert [(s.pattern, s.weight) for s in shard_sources(cfg.data)] == [
        ("/path/to/laion_dataset/{00000..10488}.tar", 115.0), ("/path/to/cc_sbu_dataset/{00000..01255}.tar", 14.0)]
    assert "ignored  run.batch_size_train: the sources' own datasets.*.batch_size is used" in out
    assert "ignored  run.wandb_log" in out
    assert cfg.run_dir == "output/minigpt4_stage1_pretrain"


def test_stage2_llama2(tmp_path):
    cfg, out = convert(tmp_path, STAGE2_LLAMA2)
    assert not cfg.model.has_qformer and cfg.model.qformer_checkpoint == ""
    assert (cfg.data.max_txt_len, cfg.data.end_sym, cfg.data.prompt_template) == (160, "</s>", "[INST] {} [/INST] ")
    assert cfg.data.prompt_path == "prompts/alignment.txt" and not cfg.data.clean_captions
    assert cfg.model.proj_checkpoint == "/path/to/stage1/checkpoint/"
    assert (cfg.train.max_steps, cfg.train.micro_batch_size, cfg.optim.lr) == (1000, 12, 3e-5)
    assert "mgpt4-make-shards --cc-sbu-align /path/to/cc_sbu_align/" in out


def test_eval_config(tmp_path):
    cfg, out = convert(tmp_path, EVAL)
    assert (cfg.data.max_txt_len, cfg.data.end_sym, cfg.data.prompt_template) == (160, "###", "###Human: {} ###Assistant: ")
    assert cfg.model.qformer_checkpoint.endswith("blip2_pretrained_flant5xxl.pth")
    assert "ignored  model.low_resource" in out


def test_not_a_config_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    proc = subprocess.run(CLI + [str(bad), "--out", str(tmp_path / "o.yaml")], capture_output=True, text=True)
    assert proc.returncode == 2 and "not a MiniGPT-4 config" in proc.stderr
    proc = subprocess.run(CLI + [str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr


def test_first_release_batch_size_from_run_section(tmp_path):
    """The original's first-release stage-2 file gives its batch size only as run.batch_size_train."""
    cfg, out = convert(tmp_path, """
model:
  arch: mini_gpt4
  model_type: pretrain_vicuna
  max_txt_len: 160
  end_sym: "###"
  prompt_path: "prompts/alignment.txt"
  prompt_template: '###Human: {} ###Assistant: '
  ckpt: '/path/to/stage1/checkpoint.pth'
datasets:
  cc_sbu_align:
    vis_processor: {train: {name: "blip2_image_train", image_size: 224}}
    text_processor: {train: {name: "blip_caption"}}
run:
  task: image_text_pretrain
  init_lr: 3e-5
  batch_size_train: 12
  batch_size_eval: 12
""")
    assert cfg.train.micro_batch_size == 12
    assert "mapped   run.batch_size_train -> train.micro_batch_size = 12" in out
    assert "ignored  run.batch_size_eval" in out
    assert "NOT MAPPED model.model_type" not in out  # pretrain_vicuna is Vicuna v0
