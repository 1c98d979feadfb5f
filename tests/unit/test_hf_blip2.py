"""The transformers export's pure parts: the tensor-name mapping both ways and the chat template
against our conversation (`mgpt4_dist.inference.conversation`), multi-turn and with a system message."""
import pytest
import torch

from mgpt4_dist.models.hf_blip2 import from_hf_tensors, to_hf_tensors


def test_mapping_round_trips_and_fuses_the_qv_biases():
    ours = {
        "visual_encoder.eva.cls_token": torch.randn(1, 1, 4),
        "visual_encoder.eva.blocks.3.attn.q_bias": torch.randn(4),
        "visual_encoder.eva.blocks.3.attn.v_bias": torch.randn(4),
        "visual_encoder.eva.blocks.3.norm2.weight": torch.randn(4),
        "qformer.ln_vision.bias": torch.randn(4),
        "qformer.query_tokens": torch.randn(1, 2, 4),
        "qformer.bert.encoder.layer.0.crossattention.attention.key.weight": torch.randn(4, 4),
        "llama_proj.weight": torch.randn(6, 4),
        "llm.model.embed_tokens.weight": torch.randn(10, 6),
        "llm.lm_head.weight": torch.randn(10, 6),
        "llm.model.layers.0.self_attn.rotary_emb.inv_freq": torch.randn(3),  # old folders: computed, not exported
    }
    theirs = dict(to_hf_tensors(iter(ours.items())))
    bias = theirs["vision_model.encoder.layers.3.self_attn.qkv.bias"]
    assert torch.equal(bias, torch.cat([ours["visual_encoder.eva.blocks.3.attn.q_bias"], torch.zeros(4),
                                        ours["visual_encoder.eva.blocks.3.attn.v_bias"]]))
    assert "vision_model.post_layernorm.bias" in theirs and "query_tokens" in theirs
    assert "qformer.encoder.layer.0.crossattention.attention.key.weight" in theirs
    assert theirs["language_model.model.embed_tokens.weight"].shape == (11, 6)
    assert torch.equal(theirs["language_model.lm_head.weight"][10], torch.zeros(6))  # the image token: logit 0
    back = dict(from_hf_tensors(iter(theirs.items()), vocab_size=10))
    ours.pop("llm.model.layers.0.self_attn.rotary_emb.inv_freq")
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)

    bias[4] = 1.0  # EVA has no k bias: a folder that has one is not ours
    with pytest.raises(ValueError, match="k part"):
        dict(from_hf_tensors(iter(theirs.items()), vocab_size=10))


def render(messages, **kwargs):
    from transformers.utils.chat_template_utils import render_jinja_template

    from mgpt4_dist.export.hf import chat_template

    prompts, _ = render_jinja_template([messages], chat_template=chat_template(), **kwargs)
    return prompts[0]


def test_chat_template_is_our_conversation_multi_turn():
    from mgpt4_dist.inference.conversation import new_conversation

    conv = new_conversation("vicuna0")
    conv.add_image()
    conv.ask("What is it?")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    expected = conv.prompt_for_answer().replace("<ImageHere>", "<image>")
    assert render(messages, add_generation_prompt=True) == expected
    conv.add_answer("A cat.")
    conv.ask("Color?")
    messages += [{"role": "assistant", "content": "A cat."}, {"role": "user", "content": [{"type": "text", "text": "Color?"}]}]
    assert render(messages, add_generation_prompt=True) == conv.prompt_for_answer().replace("<ImageHere>", "<image>")
    system = [{"role": "system", "content": "Be brief."}] + messages[:1]
    assert render(system, add_generation_prompt=True) == "Be brief.###Human: <Img><image></Img> What is it?###Assistant: "
