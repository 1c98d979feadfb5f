"""The FLOPs formula against a count of a real forward pass (torch.utils.flop_counter)."""
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mgpt4_dist.tiny.assets import build_tiny_llm, build_tiny_tokenizer
from mgpt4_dist.config import load_config
from mgpt4_dist.flops import FlopsModel
from mgpt4_dist.models.llm import load_tokenizer
from mgpt4_dist.models.minigpt4 import build_minigpt4
from mgpt4_dist.models.sequence import SequenceBuilder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def model_and_text(tmp_path_factory):
    root = tmp_path_factory.mktemp("flops")
    llm = build_tiny_llm(str(root / "llm"), build_tiny_tokenizer(str(root / "tok")))
    cfg = load_config(os.path.join(REPO, "mgpt4_dist", "configs", "tiny_stage1.yaml"), [f"model.llm_path={llm}"])
    model = build_minigpt4(cfg.model, seed=0)
    # FlopCounterMode does not count fused SDPA kernels on CPU: count attention as plain matmuls.
    for block in model.visual_encoder.eva.blocks:
        block.attn.fused_attn = False
    model.qformer.bert.config._attn_implementation = "eager"
    model.llm.config._attn_implementation = "eager"
    text = SequenceBuilder(load_tokenizer(llm), model.num_image_tokens, 32, "\n")(
        ["a red circle on a blue background", "a small green square"])
    return model, text


def test_forward_flops_match_the_measured_count(model_and_text):
    model, text = model_and_text
    images = torch.randn(2, 3, 224, 224)
    fm = FlopsModel.from_model(model)
    with FlopCounterMode(display=False) as counter:
        model.vision_features(images)
    assert fm.vision_forward() * 2 == pytest.approx(counter.get_total_flops(), rel=0.02)
    embeds = model.embed_sequence(model.encode_image(images), text)
    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            hidden = model.llm.model(inputs_embeds=embeds).last_hidden_state
            scored = hidden[:, :-1][text.labels_BT[:, 1:] != -100]
            model.llm.lm_head(scored)
    T, n = text.input_ids_BT.shape[1], text.num_scored_tokens
    # The counter counts full (non-causal) attention scores; ours counts the causal half.
    d, L = model.llm.config.hidden_size, model.llm.config.num_hidden_layers
    expected = 2 * fm.llm_forward(T, n / 2) + 2 * L * 2 * T * T * d
    assert expected == pytest.approx(counter.get_total_flops(), rel=0.02)


def test_cached_features_skip_the_vision_flops(model_and_text):
    model, _ = model_and_text
    fm = FlopsModel.from_model(model)
    assert fm.step(4, 50, 40) - fm.step(4, 50, 40, cached_features=True) == pytest.approx(4 * fm.vision_forward())
