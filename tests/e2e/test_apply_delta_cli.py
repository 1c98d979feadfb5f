"""mgpt4-apply-delta on tiny LLaMA folders: sharded .bin and safetensors inputs, Vicuna v0's extra pad row."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from mgpt4_dist.tiny.assets import build_tiny_llm, build_tiny_tokenizer
from mgpt4_dist.models.weights import ShardReader, weight_shards

CLI = [sys.executable, "-m", "mgpt4_dist.cli.apply_delta"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("delta")
    tok = build_tiny_tokenizer(str(root / "tok"))
    return build_tiny_llm(str(root / "base"), tok), tok


def write_delta(folder, state, fmt, tok_dir):
    """Split `state` over two shards with an index, as large checkpoints are."""
    os.makedirs(folder, exist_ok=True)
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    weight_map = {}
    for i, part in enumerate(halves, start=1):
        fname = f"model-0000{i}-of-00002.{ext}"
        tensors = {n: state[n].contiguous() for n in part}
        if ext == "safetensors":
            save_file(tensors, os.path.join(folder, fname))
        else:
            torch.save(tensors, os.path.join(folder, fname))
        weight_map.update({n: fname for n in part})
    index = "model.safetensors.index.json" if ext == "safetensors" else "pytorch_model.bin.index.json"
    with open(os.path.join(folder, index), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        with open(os.path.join(tok_dir, name), "rb") as src, open(os.path.join(folder, name), "wb") as dst:
            dst.write(src.read())


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_apply_delta_adds_every_tensor(base, tmp_path, fmt):
    base_dir, tok_dir = base
    base_state = load_file(os.path.join(base_dir, "model.safetensors"))
    torch.manual_seed(1)
    delta = {k: torch.randn_like(v) * 0.01 for k, v in base_state.items()}
    # Vicuna v0's delta has one more vocabulary row (the pad token) than LLaMA.
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        delta[key] = torch.randn(base_state[key].shape[0] + 1, base_state[key].shape[1]) * 0.01
    config = json.load(open(os.path.join(base_dir, "config.json")))
    config["vocab_size"] += 1
    write_delta(tmp_path / "delta", delta, fmt, tok_dir)
    json.dump(config, open(tmp_path / "delta" / "config.json", "w"))
    proc = subprocess.run(CLI + ["--base", base_dir, "--delta", str(tmp_path / "delta"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "in 2 shard(s)" in proc.stdout
    files, weight_map = weight_shards(str(tmp_path / "out"))
    reader = ShardReader(weight_map)
    for name, d in delta.items():
        expected = d.clone()
        expected[: base_state[name].shape[0]] += base_state[name]
        assert torch.equal(reader.get(name), expected), name
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.config.vocab_size == config["vocab_size"]
    assert os.path.isfile(tmp_path / "out" / "tokenizer.model")


def test_wrong_base_is_a_clear_error(base, tmp_path):
    base_dir, tok_dir = base
    write_delta(tmp_path / "delta", {"model.unknown.weight": torch.zeros(2, 2), "x.y": torch.zeros(1)}, "safetensors", tok_dir)
    proc = subprocess.run(CLI + ["--base", base_dir, "--delta", str(tmp_path / "delta"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "lacks 2 tensors" in proc.stderr
    proc = subprocess.run(CLI + ["--base", str(tmp_path), "--delta", str(tmp_path / "delta"), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no model.safetensors" in proc.stderr
