"""Every `mgpt4-*` command refuses bad input as a user would meet it: exit status 2 and one line
`mgpt4-X: error: ...` naming the bad key, path or value, and no traceback. Real processes, tiny inputs."""
import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import REPO, TINY_STAGE1, free_port

BIN = os.path.dirname(sys.executable)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# A tiny single-process run: FSDP needs no compiled DeepSpeed ops, so it starts in seconds.
FAST_TRAIN = ["train.max_steps=2", "checkpoint.every_steps=1", "train.micro_batch_size=2",
              "logging.tensorboard=false", "logging.progress=false", "parallel.backend=fsdp"]


def run(prog, *args, cwd=None, env=None, timeout=300):
    return subprocess.run([os.path.join(BIN, prog), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO, env={**ENV, **(env or {})})


def train(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "mgpt4_dist.train", *args], capture_output=True, text=True,
                          timeout=kwargs.pop("timeout", 300), cwd=REPO, env=ENV, **kwargs)


def error_line(proc, prog):
    """The one error line of a refused command; fails on a traceback, another exit status or more lines."""
    out = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    assert proc.returncode == 2, out
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, out
    lines = [line for line in proc.stderr.splitlines() if line.startswith(f"{prog}: error: ")]
    assert len(lines) == 1, out
    assert proc.stderr.rstrip().endswith(lines[0]), out  # nothing after it
    return lines[0]


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "bad.json").write_text('{"answers": ')
    (d / "bad.yaml").write_text("run_dir: x\nmodel:\n  llm_path: [unclosed\n")
    (d / "file").write_text("a file, not a folder")
    (d / "images").mkdir()
    (d / "outdir").mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 10, 10)).save(d / "red.png")
    # What a training step folder holds next to its weights: its config and meta.json.
    step = d / "run" / "checkpoints" / "step_00000002"
    step.mkdir(parents=True)
    shutil.copy(TINY_STAGE1, step / "config.yaml")
    (step / "meta.json").write_text(json.dumps({"step": 2}))
    return d


# One typical bad input per command: (command, arguments, what the error line must name).
CASES = [
    ("mgpt4-train", ["--config", "{d}/bad.yaml"], ["bad.yaml", "not valid YAML at line 4"]),
    ("mgpt4-make-shards", ["--images", "{d}/images", "--captions", "{d}/nope.jsonl", "--out", "{d}/s"],
     ["nope.jsonl"]),
    ("mgpt4-make-tiny-assets", ["--out", "{d}/file"], ["--out", "not a directory"]),
    ("mgpt4-eval-loss", ["--config", TINY_STAGE1, "--images", "{d}/red.png", "--answers", "{d}/bad.json"],
     ["--answers", "bad.json", "not valid JSON"]),
    ("mgpt4-export", ["{d}/run", "--out", "{d}/outdir/"], ["--out", "outdir/", "a folder", "pretrained_minigpt4.pth"]),
    ("mgpt4-apply-delta", ["--base", "{d}/no-llama", "--delta", "{d}/no-delta", "--out", "{d}/v"],
     ["--base", "no-llama", "no such folder"]),
    ("mgpt4-import-config", ["{d}/bad.yaml", "--out", "{d}/ours.yaml"], ["bad.yaml", "not valid YAML"]),
    ("mgpt4-consolidate", ["{d}/no-run", "--out", "{d}/c"], ["no-run"]),
    ("mgpt4-chat", ["--model", "{d}/run/checkpoints/step_00000002", "--image", "{d}/red.png", "--prompt", "hi"],
     ["step_00000002", "not a consolidated model", "mgpt4-consolidate"]),
    ("mgpt4-demo", ["--model", "{d}/run", "--port", "0"], ["--port 0", "1..65535"]),
    ("mgpt4-plan", ["--config", TINY_STAGE1, "--gpu-mem", "lots"], ["--gpu-mem", "'lots'"]),
    ("mgpt4-eval", ["--model", "{d}/run/checkpoints/step_00000002", "--shards", "{d}/none-*.tar"],
     ["--shards", "none-*.tar", "matches no file"]),
    ("mgpt4-cache-features", ["--config", TINY_STAGE1, "data.shards=[{d}/none-*.tar]", "model.allow_random_weights=true", "--out", "{d}/f",
                              "--device", "cpu"], ["data.shards", "none-*.tar"]),
]


@pytest.mark.parametrize("prog,args,names", CASES, ids=[c[0] for c in CASES])
def test_every_command_refuses_bad_input_in_one_line(bad_inputs, prog, args, names):
    line = error_line(run(prog, *[a.format(d=bad_inputs) for a in args]), prog)
    for name in names:
        assert name in line, line


def test_usage_errors_are_one_line_too(tmp_path):
    line = error_line(run("mgpt4-make-shards", "--out", str(tmp_path)), "mgpt4-make-shards")
    assert "--images --cc-sbu-align --synthetic is required (see mgpt4-make-shards --help)" in line


def test_help_of_every_command_states_defaults_and_an_example():
    modules = {"train": "mgpt4_dist.train", **{name: f"mgpt4_dist.cli.{name}" for name in (
        "make_shards", "make_tiny_assets", "eval_loss", "export", "apply_delta", "import_config", "consolidate",
        "chat", "demo", "plan", "cache_features", "eval")}}
    for name, module in modules.items():
        parser = importlib.import_module(module).build_parser()
        assert "\nexamples:\n  mgpt4-" in parser.format_help(), name
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or action.dest == "help":
                continue
            assert action.help, f"{name}: {action.option_strings or action.dest} has no help text"
            if action.default not in (None, False, []) and not action.required:
                assert "(default: " in parser._get_formatter()._expand_help(action), \
                    f"{name}: {action.option_strings} does not state its default"
    assert "FSDP" in importlib.import_module("mgpt4_dist.train").build_parser().format_help()


# ----------------------------------------------------------------------------------- mgpt4-train

def test_typo_on_the_command_line_lists_the_closest_keys():
    line = error_line(run("mgpt4-train", "--config", TINY_STAGE1, "train.max_stepz=3"), "mgpt4-train")
    assert "unknown config key train.max_stepz; did you mean train.max_steps?" in line
    # The same parser in-process (a subprocess each would add seconds, not coverage).
    from mgpt4_dist.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"trian.max_steps; did you mean train.max_steps\?"):
        load_config(TINY_STAGE1, ["trian.max_steps=3"])


def test_weighted_shard_sources_from_the_command_line():
    """The README's `[{pattern: ..., weight: 115}, ...]` form, as mgpt4-train parses its arguments."""
    from mgpt4_dist.config import ConfigError, ShardSource, load_config

    cfg = load_config(TINY_STAGE1, ["data.shards=[{pattern: a/{000..009}.tar, weight: 115}, b/*.tar, "
                                    "{pattern: c/{x,y}.tar, weight: 2}]"])
    assert cfg.data.shards == [ShardSource("a/{000..009}.tar", 115.0), "b/*.tar", ShardSource("c/{x,y}.tar", 2.0)]
    assert load_config(TINY_STAGE1, ["data.shards=[a/{000..009}.tar]"]).data.shards == ["a/{000..009}.tar"]
    with pytest.raises(ConfigError, match=r"data.shards\[0\].patern; did you mean data.shards\[0\].pattern\?"):
        load_config(TINY_STAGE1, ["data.shards=[{patern: a.tar, weight: 1}]"])
    with pytest.raises(ConfigError, match=r"data.shards\[0\].weight: expected a number, got 'lots'"):
        load_config(TINY_STAGE1, ["data.shards=[{pattern: a.tar, weight: lots}]"])


@pytest.mark.parametrize("case", ["shards_empty", "llm_path_empty", "weights_mismatch", "prompt_file_missing"])
def test_training_refuses_bad_settings_in_one_line(tiny_assets, tmp_path, case):
    overrides = [o for o in tiny_assets["overrides"]
                 if not (case == "shards_empty" and o.startswith("data.shards")
                         or case == "llm_path_empty" and o.startswith("model.llm_path"))]
    extra, names = {
        "shards_empty": ([], ["data.shards is empty"]),
        "llm_path_empty": ([], ["model.llm_path is empty"]),
        # The tiny ViT file has 2 blocks; a 3-block ViT does not fit it (a strict load).
        "weights_mismatch": (["model.vit.depth=3"], [tiny_assets["vit_checkpoint"], "missing 13 keys", "blocks.2"]),
        # What an imported original config holds: a path relative to the original's checkout.
        "prompt_file_missing": (["data.prompt_path=prompts/alignment.txt"],
                                ["data.prompt_path=prompts/alignment.txt", "no such file"]),
    }[case]
    proc = train("--config", TINY_STAGE1, *overrides, *FAST_TRAIN, *extra, f"run_dir={tmp_path / 'r'}")
    line = error_line(proc, "mgpt4-train")
    for name in names:
        assert name in line, line
    assert not os.path.exists(tmp_path / "r" / "checkpoints")


def test_under_a_launcher_every_rank_exits_2_and_rank_0_alone_prints(tiny_assets, tmp_path):
    overrides = [o for o in tiny_assets["overrides"] if not o.startswith("data.shards")]
    proc = subprocess.run([os.path.join(BIN, "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
                           "-m", "mgpt4_dist.train", "--config", TINY_STAGE1, *overrides, *FAST_TRAIN,
                           f"run_dir={tmp_path / 'r'}"], capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV)
    assert proc.returncode != 0
    assert proc.stderr.count("mgpt4-train: error: data.shards is empty") == 1, proc.stderr[-4000:]
    assert proc.stderr.count("error:") == 1, proc.stderr[-4000:]
    # torchrun's own summary (its traceback included) is the launcher's; no rank prints a traceback.
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File") and "mgpt4_dist" in line]
    assert proc.stderr.count("exitcode  : 2") == 2, proc.stderr[-3000:]


def _can_mount_tmpfs() -> bool:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and unshare to mount a private tmpfs")
def test_full_disk_during_a_checkpoint_names_the_step_and_keeps_the_last_checkpoint(tiny_assets, tmp_path):
    """A real full filesystem: RUN_DIR on a 220 KiB tmpfs (private to this process tree) holds the
    step-1 checkpoint but not step 2's. The run says so in one line; after the disk grows, the same
    command resumes from step 1 and finishes."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    run_dir = mnt / "run"
    cmd = " ".join([sys.executable, "-m", "mgpt4_dist.train", "--config", TINY_STAGE1,
                    *[f"'{o}'" for o in tiny_assets["overrides"]], *FAST_TRAIN, f"run_dir={run_dir}"])
    script = (f"mount -t tmpfs -o size=220k tmpfs {mnt} || exit 99\n"
              f"{cmd} 2>{tmp_path}/full.err; echo $? > {tmp_path}/full.rc\n"
              f"cat {run_dir}/checkpoints/latest > {tmp_path}/latest\n"
              f"mount -o remount,size=4m {mnt}\n"
              f"{cmd}\n")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=ENV)
    full = subprocess.CompletedProcess([], int((tmp_path / "full.rc").read_text()), "",
                                       (tmp_path / "full.err").read_text())
    line = error_line(full, "mgpt4-train")
    assert f"the disk under run_dir={run_dir} is full" in line
    assert "the checkpoint of step 2 could not be written" in line
    assert f"the last complete checkpoint is {run_dir}/checkpoints/step_00000001" in line
    assert (tmp_path / "latest").read_text().strip() == "step_00000001"
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step_00000001 at step 1" in proc.stdout
    assert "done: step 2/2" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_chat_on_cuda_without_a_gpu(bad_inputs):
    line = error_line(run("mgpt4-chat", "--model", str(bad_inputs / "run"), "--image", str(bad_inputs / "red.png"),
                          "--prompt", "hi", "--device", "cuda"), "mgpt4-chat")
    assert "device cuda: no CUDA GPU is visible here" in line and "use cpu" in line


def test_readme_lists_the_tensorboard_tags_a_run_writes():
    import re

    from mgpt4_dist.metrics import TB_TAGS

    readme = open(os.path.join(REPO, "README.md")).read()
    block = readme[readme.index("  tb/ "):readme.index("  profile/ ")]
    assert set(re.findall(r"\b(?:train|perf|data|val)/\w+", block)) == set(TB_TAGS.values())
