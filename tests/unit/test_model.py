"""MiniGPT-4 module: loss against an independent computation, freezing, strict original-layout loading."""
import os

import pytest
import torch
import torch.nn.functional as F

from mgpt4_dist.tiny.assets import build_tiny_llm, build_tiny_qformer_checkpoint, build_tiny_tokenizer, build_tiny_vit_checkpoint
from mgpt4_dist.config import load_config
from mgpt4_dist.models.llm import load_tokenizer
from mgpt4_dist.errors import CheckpointMismatchError
from mgpt4_dist.models.weights import load_proj_checkpoint
from mgpt4_dist.models.minigpt4 import audit_trainable, build_minigpt4
from mgpt4_dist.parallel import apply_compile_towers
from mgpt4_dist.models.sequence import IGNORE_INDEX, SequenceBuilder

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "mgpt4_dist", "configs", "tiny_stage1.yaml")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_assets")
    tok = build_tiny_tokenizer(str(root / "tok"))
    llm = build_tiny_llm(str(root / "llm"), tok)
    build_tiny_vit_checkpoint(str(root / "vit.pth"))
    build_tiny_qformer_checkpoint(str(root / "qformer.pth"))
    return {"llm": llm, "vit": str(root / "vit.pth"), "qformer": str(root / "qformer.pth"), "root": root}


@pytest.fixture(scope="module")
def model_and_builder(assets):
    cfg = load_config(TINY, [f"model.llm_path={assets['llm']}", f"model.vit_checkpoint={assets['vit']}",
                             f"model.qformer_checkpoint={assets['qformer']}"])
    model = build_minigpt4(cfg.model, seed=0)
    builder = SequenceBuilder(load_tokenizer(assets["llm"]), model.num_image_tokens, 32, "\n")
    return model, builder


def test_loss_is_mean_over_all_scored_tokens(model_and_builder):
    model, build = model_and_builder
    torch.manual_seed(0)
    images = torch.randn(3, 3, 224, 224)
    text = build(["a red circle", "a small green square on a blue background", "stripe"])
    terms = model.loss_terms(images, text)
    # Independent: full logits from the HF model, shifted CE over the labels, one mean over all tokens.
    with torch.no_grad():
        embeds = model.embed_sequence(model.encode_image(images), text)
        logits = model.llm(inputs_embeds=embeds).logits.float()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), text.labels_BT[:, 1:].reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="sum")
    n = int((text.labels_BT != IGNORE_INDEX).sum())
    assert terms.num_scored_tokens == n
    assert terms.loss.item() == pytest.approx((ce / n).item(), rel=1e-5)
    per_sample_means = torch.stack([terms.token_ce[terms.token_rows == r].mean() for r in range(3)]).mean()
    assert abs(per_sample_means.item() - terms.loss.item()) > 1e-4  # not a mean of per-sample means


def test_image_embeddings_fill_the_slots(model_and_builder):
    model, build = model_and_builder
    images = torch.randn(2, 3, 224, 224)
    text = build(["red", "blue"])
    with torch.no_grad():
        image_embeds = model.encode_image(images)
        embeds = model.embed_sequence(image_embeds, text)
    n = model.num_image_tokens
    assert torch.equal(embeds[:, 1:1 + n], image_embeds)
    bos = model.llm.get_input_embeddings().weight[1]
    assert torch.equal(embeds[0, 0], bos)


def test_only_llama_proj_trains(model_and_builder):
    model, build = model_and_builder
    counts = audit_trainable(model)
    assert counts["trainable_params"] == model.llama_proj.weight.numel() + model.llama_proj.bias.numel()
    model.train()
    assert model.training and not model.llm.training and not model.visual_encoder.training and not model.qformer.training
    model.zero_grad()
    model(torch.randn(1, 3, 224, 224), build(["red"])).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {"llama_proj.weight", "llama_proj.bias"}
    model.qformer.query_tokens.requires_grad = True
    try:
        with pytest.raises(RuntimeError, match="llama_proj only"):
            audit_trainable(model)
    finally:
        model.qformer.query_tokens.requires_grad = False


def test_original_layout_weights_land_in_place(model_and_builder, assets):
    model, _ = model_and_builder
    vit = torch.load(assets["vit"], weights_only=True)
    assert torch.equal(model.visual_encoder.eva.blocks[1].attn.qkv.weight, vit["blocks.1.attn.qkv.weight"])
    assert torch.equal(model.visual_encoder.eva.blocks[0].attn.q_bias, vit["blocks.0.attn.q_bias"])
    q = torch.load(assets["qformer"], weights_only=True)["model"]
    layer0 = model.qformer.bert.encoder.layer[0]
    assert torch.equal(layer0.crossattention.attention.key.weight, q["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"])
    assert torch.equal(layer0.attention.attention.query.bias, q["Qformer.bert.encoder.layer.0.attention.self.query.bias"])
    assert torch.equal(model.qformer.bert.layernorm.weight, q["Qformer.bert.embeddings.LayerNorm.weight"])
    assert torch.equal(model.qformer.ln_vision.bias, q["ln_vision.bias"])
    assert torch.equal(model.qformer.query_tokens, q["query_tokens"])


def test_wrong_vit_width_fails_with_key_and_shapes(assets, tmp_path):
    wide = str(tmp_path / "vit96.pth")
    build_tiny_vit_checkpoint(wide, embed_dim=96)
    cfg = load_config(TINY, [f"model.llm_path={assets['llm']}", f"model.vit_checkpoint={wide}"])
    with pytest.raises(CheckpointMismatchError, match=r"vit96\.pth.*has shape \[1, 1, 96\] but the model expects \[1, 1, 64\]"):
        build_minigpt4(cfg.model, seed=0)


def test_missing_qformer_keys_are_named(assets, tmp_path):
    q = torch.load(assets["qformer"], weights_only=True)
    del q["model"]["query_tokens"]
    broken = str(tmp_path / "q.pth")
    torch.save(q, broken)
    cfg = load_config(TINY, [f"model.llm_path={assets['llm']}", f"model.qformer_checkpoint={broken}"])
    with pytest.raises(CheckpointMismatchError, match="missing 1 keys.*query_tokens"):
        build_minigpt4(cfg.model, seed=0)


def test_projection_for_another_llm_width_is_explained(model_and_builder, tmp_path):
    model, _ = model_and_builder
    path = str(tmp_path / "proj.pth")
    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, 64), "llama_proj.bias": torch.zeros(4096)}}, path)
    with pytest.raises(CheckpointMismatchError, match="for a 7B LLM"):
        load_proj_checkpoint(model.llama_proj, path)


def test_random_init_is_seeded(assets):
    cfg = load_config(TINY, [f"model.llm_path={assets['llm']}"])
    a, b = build_minigpt4(cfg.model, seed=5), build_minigpt4(cfg.model, seed=5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_llama2_variant_groups_four_patch_tokens(assets, tmp_path):
    cfg = load_config(TINY, [f"model.llm_path={assets['llm']}", f"model.vit_checkpoint={assets['vit']}",
                             "model.has_qformer=false"])
    # A MiniGPT-4 Llama-2 checkpoint may carry ln_vision; it is loaded from the same file then.
    proj = {"llama_proj.weight": torch.randn(64, 256) * 0.02, "llama_proj.bias": torch.zeros(64),
            "ln_vision.weight": torch.rand(64) + 0.5, "ln_vision.bias": torch.randn(64) * 0.1}
    torch.save({"model": proj}, tmp_path / "llama2_proj.pth")
    cfg.model.proj_checkpoint = str(tmp_path / "llama2_proj.pth")
    model = build_minigpt4(cfg.model, seed=0)
    assert model.num_image_tokens == 64 and model.qformer is None
    assert torch.equal(model.ln_vision.weight, proj["ln_vision.weight"])
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = model.visual_encoder(images)
        normed = F.layer_norm(tokens, (64,), proj["ln_vision.weight"], proj["ln_vision.bias"], eps=1e-5)[:, 1:]
        grouped = torch.cat([normed[:, i::4] for i in range(4)], dim=-1)  # 4 consecutive tokens side by side
        expected = grouped @ proj["llama_proj.weight"].T + proj["llama_proj.bias"]
        assert torch.allclose(model.encode_image(images), expected, atol=1e-5)
    with pytest.raises(ValueError, match="has_qformer=false"):
        cfg.model.qformer_checkpoint = assets["qformer"]
        build_minigpt4(cfg.model, seed=0)


def test_old_llm_folder_with_inv_freq_loads_and_missing_tensors_fail(assets, tmp_path):
    """Folders saved by older transformers carry rotary_emb.inv_freq buffers: they must load; a
    folder missing a tensor must fail instead of being silently re-initialised."""
    import shutil

    from safetensors.torch import load_file

    from mgpt4_dist.models.llm import load_llm

    state = load_file(os.path.join(assets["llm"], "model.safetensors"))
    old = tmp_path / "old_llm"
    shutil.copytree(assets["llm"], old)
    os.remove(old / "model.safetensors")
    with_buffers = {**state, **{f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)}}
    torch.save(with_buffers, old / "pytorch_model.bin")
    llm = load_llm(str(old), torch.float32)
    assert torch.equal(llm.model.layers[1].mlp.up_proj.weight, state["model.layers.1.mlp.up_proj.weight"])
    del with_buffers["model.layers.1.mlp.up_proj.weight"]
    torch.save(with_buffers, old / "pytorch_model.bin")
    with pytest.raises(CheckpointMismatchError, match="missing 1 tensors.*up_proj"):
        load_llm(str(old), torch.float32)


def test_vit_precision_runs_the_vit_in_its_dtype(assets):
    """bf16 ViT under fp32 training: the ViT's weights are bf16, the rest fp32, and the loss stays
    within 2 % (a bf16 mantissa step is 0.4 %) of the all-fp32 model's on the same batch."""
    base = [f"model.llm_path={assets['llm']}", f"model.vit_checkpoint={assets['vit']}",
            f"model.qformer_checkpoint={assets['qformer']}"]
    fp32 = build_minigpt4(load_config(TINY, base).model, seed=0)
    mixed = build_minigpt4(load_config(TINY, base + ["model.vit_precision=bf16"]).model, seed=0)
    assert {p.dtype for p in mixed.visual_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for n, p in mixed.named_parameters() if not n.startswith("visual_encoder.")} == {torch.float32}
    build = SequenceBuilder(load_tokenizer(assets["llm"]), fp32.num_image_tokens, 32, "\n")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    text = build(["a red circle", "two blue squares"])
    features = mixed.vision_features(images)
    assert features.dtype == torch.float32  # cast to the Q-Former's dtype
    ref = fp32.vision_features(images)
    assert not torch.equal(features, ref)
    torch.testing.assert_close(features, ref, rtol=0, atol=0.1 * ref.abs().max().item())
    loss = mixed(images, text)
    assert loss.item() == pytest.approx(fp32(images, text).item(), rel=2e-2)
    loss.backward()
    assert mixed.llama_proj.weight.grad is not None and mixed.llama_proj.weight.grad.dtype == torch.float32
    torch.testing.assert_close(mixed.llama_proj.weight, fp32.llama_proj.weight, rtol=0, atol=0)


def test_a_half_precision_build_casts_the_vit_straight_and_keeps_fp32_buffers(assets):
    """fp16 ViT in a bf16 run: the ViT's weights are the fp32 ones cast once to fp16 (not via bf16,
    which would drop mantissa bits), and the LLM's rotary inv_freq buffer stays fp32."""
    base = [f"model.llm_path={assets['llm']}", f"model.vit_checkpoint={assets['vit']}",
            f"model.qformer_checkpoint={assets['qformer']}"]
    fp32 = build_minigpt4(load_config(TINY, base).model, seed=0)
    mixed = build_minigpt4(load_config(TINY, base + ["model.vit_precision=fp16"]).model, seed=0, dtype=torch.bfloat16)
    ref = dict(fp32.visual_encoder.named_parameters())
    for name, p in mixed.visual_encoder.named_parameters():
        assert p.dtype == torch.float16 and torch.equal(p, ref[name].to(torch.float16)), name
    assert {p.dtype for n, p in mixed.named_parameters() if not n.startswith("visual_encoder.")} == {torch.bfloat16}
    llm_float_buffers = [b for b in mixed.llm.buffers() if b.is_floating_point()]
    assert llm_float_buffers and {b.dtype for b in llm_float_buffers} == {torch.float32}


def test_llama_proj_init_is_nn_linear_default_from_the_seed():
    from mgpt4_dist.models.build import LocalBuild
    from mgpt4_dist.models.minigpt4 import init_llama_proj

    torch.manual_seed(7)
    ref = torch.nn.Linear(48, 16)
    got = torch.nn.Linear(48, 16)
    init_llama_proj(got, 7, LocalBuild())
    torch.testing.assert_close(got.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(got.bias, ref.bias, rtol=0, atol=0)


def test_compiled_towers_give_the_eager_features_loss_and_gradient(assets):
    """train.compile_towers: the same math as the eager towers, to float rounding (rel 1e-5)."""
    from torch._dynamo.utils import counters

    cfg = load_config(TINY, [f"model.llm_path={assets['llm']}", f"model.vit_checkpoint={assets['vit']}",
                             f"model.qformer_checkpoint={assets['qformer']}"])
    model = build_minigpt4(cfg.model, seed=0)
    text = SequenceBuilder(load_tokenizer(assets["llm"]), model.num_image_tokens, 32, "\n")(
        ["a red square on a blue background", "a small green circle"])
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))

    def run():
        model.zero_grad(set_to_none=True)
        features = model.vision_features(images)
        loss = model(images, text)
        loss.backward()
        return features, loss.detach(), model.llama_proj.weight.grad.clone()

    eager = run()
    graphs_before = counters["stats"]["unique_graphs"]
    apply_compile_towers(model)
    compiled = run()
    assert counters["stats"]["unique_graphs"] > graphs_before  # the towers really ran compiled
    assert not compiled[0].requires_grad and compiled[0].grad_fn is None
    for got, want in zip(compiled, eager):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # parameters and their names are untouched: checkpoints and sharding see the same model
    assert "_compiled_towers" not in dict(model.named_modules())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["llama_proj.weight", "llama_proj.bias"]


@pytest.mark.parametrize("attn_impl,kv_heads", [("sdpa", None), ("eager", None), ("sdpa", 2)])
def test_padding_free_and_trimmed_last_layer_give_the_plain_loss_and_gradient(assets, attn_impl, kv_heads):
    """model.padding_free (real positions only) and model.trim_last_layer (last layer over the scored
    tail), alone and together: the plain padded model's loss, per-token losses and projection gradients
    (rel 1e-5), for stage-1 rows and rows whose instructions differ in length; grouped-query attention too."""
    from mgpt4_dist.models.llm import PaddingFreeDecoderLayer, TailScoringDecoderLayer

    llm = assets["llm"]
    if kv_heads:
        llm = build_tiny_llm(str(assets["root"] / "llm_gqa"), str(assets["root"] / "tok"), num_kv_heads=kv_heads)
    base = [f"model.llm_path={llm}", f"model.vit_checkpoint={assets['vit']}",
            f"model.qformer_checkpoint={assets['qformer']}", f"model.attn_impl={attn_impl}"]
    plain = build_minigpt4(load_config(TINY, base + ["model.padding_free=false", "model.trim_last_layer=false"]).model,
                           seed=0)
    assert plain.llm.config.num_key_value_heads == (kv_heads or plain.llm.config.num_attention_heads)
    build = SequenceBuilder(load_tokenizer(llm), plain.num_image_tokens, 32, "\n")
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    answers = ["a red circle", "a small green square on a blue background", "stripe"]
    rows_out = []

    def run(model, text):
        model.zero_grad(set_to_none=True)
        terms = model.loss_terms(images, text)
        terms.loss.backward()
        return (terms.loss.detach(), terms.token_ce.detach(), terms.token_rows.float(),
                model.llama_proj.weight.grad.clone(), model.llama_proj.bias.grad.clone())

    for padding_free, trim in ((True, False), (False, True), (True, True)):
        model = build_minigpt4(load_config(TINY, base + [f"model.padding_free={padding_free}",
                                                         f"model.trim_last_layer={trim}"]).model, seed=0)
        layers = model.llm.model.layers
        assert all(isinstance(layer, PaddingFreeDecoderLayer) for layer in layers[:-1]) == padding_free
        assert isinstance(layers[-1], TailScoringDecoderLayer) == trim
        layers[-1].register_forward_hook(lambda module, args, out: rows_out.append(out.shape[-2]))
        for instruction in (None, ["<Img><ImageHere></Img> Describe it.", "<Img><ImageHere></Img> What is shown "
                                   "here in this picture?", "<Img><ImageHere></Img>"]):
            text = build(answers, instruction)
            B, T = text.input_ids_BT.shape
            assert 0 < text.score_from < T - 1 and sum(text.row_lengths) < B * T  # some padding to leave out
            rows_out.clear()
            got = run(model, text)
            # what the last layer computed: the real positions, the tails, or the padded rows from score_from
            tails = sum(length - first for length, first in zip(text.row_lengths, text.row_score_from))
            assert rows_out == [{(True, False): sum(text.row_lengths), (True, True): tails,
                                 (False, True): T - text.score_from}[padding_free, trim]]
            want = run(plain, text)
            for g, w in zip(got, want):
                assert g.shape == w.shape and (g - w).abs().max() <= 1e-5 * w.abs().max()
        # a batch with nothing to score (an empty answer without end_sym): an empty tail, a zero loss
        empty = SequenceBuilder(load_tokenizer(llm), plain.num_image_tokens, 32, "")([""])
        assert model.loss_terms(images[:1], empty).num_scored_tokens == 0
