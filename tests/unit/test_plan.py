"""Memory planner: exact parameter counts, the ZeRO formulas, and activations against what autograd saves."""
import pytest
import torch

from helpers import TINY_STAGE1

from mgpt4_dist.config import load_config
from mgpt4_dist.plan import (GiB, ParamCounts, activation_bytes, count_params, measure_saved_activation_bytes,
                             parse_bytes, plan, rank_memory)


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GiB and parse_bytes("40GB") == 40 * 10 ** 9 and parse_bytes("512MiB") == 2 ** 29
    with pytest.raises(ValueError):
        parse_bytes("lots")


@pytest.mark.parametrize("stage,expected", [(0, 16), (1, 4 + 12 / 8), (2, 2 + 14 / 8), (3, 16 / 8)])
def test_trainable_part_follows_the_zero_formulas(stage, expected):
    counts = ParamCounts(frozen=0, trainable=1000, llm_hidden=1, llm_intermediate=1, llm_layers=1, vocab=1)
    mem = rank_memory(counts, "bf16", stage, "none", ranks=8)
    assert sum(mem.values()) == pytest.approx(expected * 1000)


def test_vicuna7b_counts_and_sharded_frozen_weights():
    cfg = load_config("mgpt4_dist/configs/stage1_vicuna7b.yaml", ["model.llm_path="])
    counts = count_params(cfg, llm="7b")
    assert counts.trainable == 768 * 4096 + 4096
    assert 7.7e9 < counts.frozen < 7.9e9  # LLaMA-7B 6.74 B + EVA ViT-g (39 blocks) ~1.0 B + Q-Former ~0.1 B
    rows = {r["choice"]: r for r in plan(cfg, ranks=8, gpu_mem=80 * GiB, llm="7b")["rows"]}
    assert rows["zero3"]["frozen"] == pytest.approx(rows["zero0"]["frozen"] / 8)
    assert rows["zero3"]["max_micro_batch"] > rows["zero2"]["max_micro_batch"] >= 64  # the original's 64 fits
    with pytest.raises(ValueError, match="--llm"):
        plan(cfg, ranks=8, gpu_mem=80 * GiB)


@pytest.mark.parametrize("micro", [2, 8])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_matches_saved_tensors(tiny_assets, micro, checkpointing):
    """Within 10 %: the estimate counts the saved tensors by formula; the measurement adds small
    per-layer items it leaves out (RoPE cos/sin, the rsqrt of each norm, masks, CE targets)."""
    from mgpt4_dist.models.llm import load_tokenizer
    from mgpt4_dist.models.minigpt4 import build_minigpt4
    from mgpt4_dist.models.sequence import SequenceBuilder
    from mgpt4_dist.parallel import apply_ac

    cfg = load_config(TINY_STAGE1, list(tiny_assets["overrides"]))
    counts = count_params(cfg)
    model = build_minigpt4(cfg.model, seed=0)
    if checkpointing:
        apply_ac(model.llm)
    caption = "a red cube on a small green table near the window with many more words to fill the caption up"
    text = SequenceBuilder(load_tokenizer(cfg.model.llm_path), model.num_image_tokens, 32, "\n", 3800)([caption] * micro)
    measured = measure_saved_activation_bytes(model, torch.randn(micro, 3, 224, 224), text)
    estimate = activation_bytes(counts, "fp32", micro, text.input_ids_BT.shape[1], text.num_scored_tokens // micro,
                                cfg.model.qformer.hidden_size, checkpointing, recompute_peak=False,
                                tail=text.input_ids_BT.shape[1] - text.score_from)
    assert estimate == pytest.approx(measured, rel=0.10)
