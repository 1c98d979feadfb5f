"""Tiny asset writers: tokenizer vs sentencepiece, LLaMA folder, original ViT/Q-Former layouts, cached bundle."""
import glob
import os
import time

import pytest
import sentencepiece as spm
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from mgpt4_dist.tiny.assets import (build_tiny_assets, build_tiny_llm, build_tiny_qformer_checkpoint,
                               build_tiny_tokenizer, build_tiny_vit_checkpoint, tiny_overrides)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Strings MiniGPT-4 tokenizes separately, plus whitespace, byte-fallback and special-looking edge cases.
TOKENIZE_CASES = [
    "###Human: <Img>",
    "</Img> Describe this image in detail. ###Assistant: ",
    "a red circle on a blue background\n",
    "###",
    "naïve café 🙂",
    "$$",
    "x$$y $$$$",
    "[INST] <Img><ImageHere></Img> What is this? [/INST] ",
    " leading space",
    "two  spaces and a trailing one ",
    "\n",
    " \n\t ",
    "",
    "12345 items, 7% off #3",
    "▁already escaped",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    return AutoTokenizer.from_pretrained(tok_dir)


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory, tok_dir):
    return build_tiny_llm(str(tmp_path_factory.mktemp("llm")), tok_dir)


# --- tokenizer -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text", TOKENIZE_CASES)
def test_autotokenizer_encodes_like_sentencepiece(hf_tok, sp, text):
    # sentencepiece's own encode is what the original slow LlamaTokenizer returned.
    assert hf_tok(text, add_special_tokens=False).input_ids == sp.encode(text)


def test_special_tokens_are_llama_ones(hf_tok, sp):
    assert (hf_tok.unk_token, hf_tok.bos_token, hf_tok.eos_token) == ("<unk>", "<s>", "</s>")
    assert (hf_tok.unk_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (0, 1, 2)
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert hf_tok.pad_token is None
    # add_bos_token on, add_eos_token off.
    assert hf_tok("a red circle").input_ids == [1] + sp.encode("a red circle")


def test_special_tokens_in_text_split_like_the_slow_tokenizer(hf_tok, sp):
    # Legacy behaviour: every chunk between special tokens gets its own dummy prefix.
    ids = hf_tok("<s>a red circle</s>", add_special_tokens=False).input_ids
    assert ids == [1] + sp.encode("a red circle") + [2]


def test_newline_falls_back_to_bytes(hf_tok, sp):
    newline = hf_tok.convert_tokens_to_ids("<0x0A>")
    assert newline == 13 == sp.piece_to_id("<0x0A>")  # same id as in LLaMA: 3 specials, then bytes
    assert "\n" not in hf_tok.get_vocab()
    assert hf_tok("\n", add_special_tokens=False).input_ids[-1] == newline


@pytest.mark.parametrize("text", ["a red circle on a blue background\n", "naïve café 🙂", " two  spaces "])
def test_decode_round_trips(hf_tok, text):
    assert hf_tok.decode(hf_tok(text).input_ids, skip_special_tokens=True) == text


def test_pad_piece_is_an_existing_piece(tok_dir, sp):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    size_before = len(tok)
    dollar = sp.piece_to_id("$$")
    assert dollar != sp.unk_id() and sp.id_to_piece(dollar) == "$$"
    tok.pad_token = "$$"
    assert len(tok) == size_before == sp.get_piece_size()
    assert tok.pad_token_id == tok.convert_tokens_to_ids("$$") == dollar
    assert dollar in tok("x$$y", add_special_tokens=False).input_ids


def test_tokenizer_is_deterministic_per_seed(tmp_path, tok_dir):
    def model_bytes(d):
        with open(os.path.join(d, "tokenizer.model"), "rb") as f:
            return f.read()

    again = build_tiny_tokenizer(str(tmp_path / "same"))
    other = build_tiny_tokenizer(str(tmp_path / "other"), seed=1)
    assert model_bytes(again) == model_bytes(tok_dir)
    assert model_bytes(other) != model_bytes(tok_dir)


# --- LLM folder ----------------------------------------------------------------------------------

def test_llm_folder_has_the_hf_llama_layout(llm_dir):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.model",
                 "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(llm_dir, name)), name


def test_llm_folder_loads_and_runs(llm_dir, sp):
    model = LlamaForCausalLM.from_pretrained(llm_dir)
    tok = AutoTokenizer.from_pretrained(llm_dir)
    cfg = model.config
    assert cfg.vocab_size == len(tok) == sp.get_piece_size()
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, None)
    assert cfg.tie_word_embeddings is False and cfg.hidden_act == "silu" and cfg.rms_norm_eps == 1e-6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()

    ids = tok(["a red circle on a blue background"], return_tensors="pt").input_ids
    embeds = model.get_input_embeddings()(ids)
    with torch.no_grad():
        logits = model(inputs_embeds=embeds).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()


def test_llm_is_deterministic_per_seed(tmp_path, llm_dir):
    same = load_file(os.path.join(build_tiny_llm(str(tmp_path / "same"), llm_dir), "model.safetensors"))
    other = load_file(os.path.join(build_tiny_llm(str(tmp_path / "other"), llm_dir, seed=1), "model.safetensors"))
    ref = load_file(os.path.join(llm_dir, "model.safetensors"))
    assert same.keys() == ref.keys() == other.keys()
    assert all(torch.equal(same[k], ref[k]) for k in ref)
    assert not torch.equal(other["model.embed_tokens.weight"], ref["model.embed_tokens.weight"])


def test_llm_from_a_vocab_size_has_no_tokenizer(tmp_path):
    out = build_tiny_llm(str(tmp_path / "llm"), 300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=48)
    assert not os.path.exists(os.path.join(out, "tokenizer.model"))
    cfg = LlamaForCausalLM.from_pretrained(out).config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (300, 32, 1, 48)


# --- EVA ViT file ------------------------------------------------------------------------------

def test_vit_checkpoint_has_the_eva_vit_g_layout(tmp_path):
    path = build_tiny_vit_checkpoint(str(tmp_path / "vit.pth"))
    state = torch.load(path, map_location="cpu", weights_only=True)
    d, hidden, tokens = 64, int(64 * 4.3637), (224 // 14) ** 2 + 1
    per_block = {"norm1.weight": [d], "norm1.bias": [d], "attn.q_bias": [d], "attn.v_bias": [d],
                 "attn.qkv.weight": [3 * d, d], "attn.proj.weight": [d, d], "attn.proj.bias": [d],
                 "norm2.weight": [d], "norm2.bias": [d], "mlp.fc1.weight": [hidden, d], "mlp.fc1.bias": [hidden],
                 "mlp.fc2.weight": [d, hidden], "mlp.fc2.bias": [d]}
    expected = {"cls_token": [1, 1, d], "pos_embed": [1, tokens, d], "patch_embed.proj.weight": [d, 3, 14, 14],
                "patch_embed.proj.bias": [d]}
    expected.update({f"blocks.{n}.{k}": shape for n in range(2) for k, shape in per_block.items()})
    assert {k: list(v.shape) for k, v in state.items()} == expected
    assert hidden == 279 and tokens == 257
    assert all(v.dtype == torch.float32 for v in state.values())
    # Biases are random and LayerNorm weights sit near 1: loading mistakes change the output.
    assert state["blocks.0.attn.q_bias"].abs().sum() > 0 and state["blocks.1.mlp.fc2.bias"].abs().sum() > 0
    assert (state["blocks.0.norm1.weight"] - 1).abs().max() < 0.2
    assert not torch.equal(state["blocks.0.norm1.weight"], torch.ones(d))
    assert 0.01 < state["blocks.0.attn.qkv.weight"].std() < 0.03


def test_vit_checkpoint_dtype_and_sizes(tmp_path):
    path = build_tiny_vit_checkpoint(str(tmp_path / "vit16.pth"), img_size=56, patch_size=14, embed_dim=32, depth=3,
                                     num_heads=2, dtype=torch.float16)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["pos_embed"].shape == (1, 17, 32)
    assert "blocks.2.attn.qkv.weight" in state and "blocks.3.norm1.weight" not in state
    assert all(v.dtype == torch.float16 for v in state.values())


def test_vit_checkpoint_is_deterministic_per_seed(tmp_path):
    a = torch.load(build_tiny_vit_checkpoint(str(tmp_path / "a.pth")), weights_only=True)
    b = torch.load(build_tiny_vit_checkpoint(str(tmp_path / "b.pth")), weights_only=True)
    c = torch.load(build_tiny_vit_checkpoint(str(tmp_path / "c.pth"), seed=1), weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["pos_embed"], c["pos_embed"])


# --- BLIP-2 Q-Former file ----------------------------------------------------------------------

def test_qformer_checkpoint_has_the_blip2_layout(tmp_path):
    # vision_width != hidden_size, so swapped key/value shapes would show.
    path = build_tiny_qformer_checkpoint(str(tmp_path / "q.pth"), vision_width=48, hidden_size=64, num_layers=4,
                                         intermediate_size=128, num_query_tokens=8)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ckpt) == ["model"]
    state = ckpt["model"]
    # 8 top-level + 4 layers x 22 + 2 cross-attention layers x 10 + t5_proj 2.
    assert len(state) == 8 + 4 * 22 + 2 * 10 + 2
    assert state["query_tokens"].shape == (1, 8, 64)
    assert state["ln_vision.weight"].shape == (48,)
    layer = "Qformer.bert.encoder.layer"
    for n in range(4):
        assert state[f"{layer}.{n}.attention.self.key.weight"].shape == (64, 64)
        assert state[f"{layer}.{n}.intermediate_query.dense.weight"].shape == (128, 64)
        assert state[f"{layer}.{n}.output_query.dense.weight"].shape == (64, 128)
        assert f"{layer}.{n}.output_query.LayerNorm.bias" in state
        has_cross = any(k.startswith(f"{layer}.{n}.crossattention.") for k in state)
        assert has_cross == (n % 2 == 0), n
    assert state[f"{layer}.2.crossattention.self.query.weight"].shape == (64, 64)
    assert state[f"{layer}.2.crossattention.self.key.weight"].shape == (64, 48)
    assert state[f"{layer}.2.crossattention.self.value.weight"].shape == (64, 48)
    assert state[f"{layer}.2.crossattention.self.value.bias"].shape == (64,)
    assert state[f"{layer}.0.crossattention.output.LayerNorm.weight"].shape == (64,)
    # Keys the real file has and MiniGPT-4 ignores.
    assert state[f"{layer}.1.intermediate.dense.weight"].shape == (128, 64)
    assert state[f"{layer}.1.output.dense.weight"].shape == (64, 128)
    assert state["Qformer.bert.embeddings.word_embeddings.weight"].shape == (100, 64)
    assert state["Qformer.bert.embeddings.position_embeddings.weight"].shape == (512, 64)
    assert state["t5_proj.weight"].shape == (32, 64) and state["t5_proj.bias"].shape == (32,)
    pos = state["Qformer.bert.embeddings.position_ids"]
    assert pos.dtype == torch.int64 and torch.equal(pos, torch.arange(512).unsqueeze(0))
    assert state[f"{layer}.0.attention.self.query.bias"].abs().sum() > 0
    assert (state["Qformer.bert.embeddings.LayerNorm.weight"] - 1).abs().max() < 0.2


def test_qformer_checkpoint_is_deterministic_per_seed(tmp_path):
    a = torch.load(build_tiny_qformer_checkpoint(str(tmp_path / "a.pth")), weights_only=True)["model"]
    b = torch.load(build_tiny_qformer_checkpoint(str(tmp_path / "b.pth")), weights_only=True)["model"]
    c = torch.load(build_tiny_qformer_checkpoint(str(tmp_path / "c.pth"), seed=3), weights_only=True)["model"]
    assert len(a) == 64  # defaults: 2 layers, cross-attention on layer 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["query_tokens"], c["query_tokens"])


# --- bundle --------------------------------------------------------------------------------------

def _mtimes(root):
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(root, "**"), recursive=True)
            if os.path.isfile(p)}


def test_bundle_is_built_once_and_reused(tmp_path):
    out = str(tmp_path / "assets")
    paths = build_tiny_assets(out, num_samples=20, samples_per_shard=8, pretrained=False)
    assert set(paths) == {"llm_path", "vit_checkpoint", "qformer_checkpoint", "shards_pattern"}
    assert os.path.isfile(os.path.join(paths["llm_path"], "model.safetensors"))
    assert os.path.isfile(paths["vit_checkpoint"]) and os.path.isfile(paths["qformer_checkpoint"])
    assert len(glob.glob(paths["shards_pattern"])) == 3
    before = _mtimes(out)

    start = time.perf_counter()
    assert build_tiny_assets(out, num_samples=20, samples_per_shard=8, pretrained=False) == paths
    assert time.perf_counter() - start < 1.0
    assert _mtimes(out) == before

    # Other parameters rebuild, without leaving the earlier build's extra shards behind,
    # and without touching files that are not ours.
    notes = os.path.join(out, "notes.txt")
    with open(notes, "w") as f:
        f.write("mine")
    build_tiny_assets(out, num_samples=8, samples_per_shard=8, pretrained=False)
    assert len(glob.glob(paths["shards_pattern"])) == 1
    assert open(notes).read() == "mine"
    assert _mtimes(out)[paths["vit_checkpoint"]] != before[paths["vit_checkpoint"]]


def test_bundle_rebuilds_when_the_marker_is_missing(tmp_path):
    out = str(tmp_path / "assets")
    paths = build_tiny_assets(out, num_samples=4, samples_per_shard=4, pretrained=False)
    os.remove(os.path.join(out, ".complete"))  # as after an interrupted build
    before = _mtimes(out)
    build_tiny_assets(out, num_samples=4, samples_per_shard=4, pretrained=False)
    assert os.path.isfile(os.path.join(out, ".complete"))
    assert _mtimes(out)[paths["qformer_checkpoint"]] != before[paths["qformer_checkpoint"]]


def test_bundle_refuses_a_file_as_out_dir(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(NotADirectoryError):
        build_tiny_assets(str(target))


def test_bundle_fits_the_shipped_tiny_config(tmp_path):
    with open(os.path.join(REPO, "mgpt4_dist", "configs", "tiny_stage1.yaml")) as f:
        model_cfg = yaml.safe_load(f)["model"]
    vit_cfg, q_cfg = model_cfg["vit"], model_cfg["qformer"]
    paths = build_tiny_assets(str(tmp_path / "assets"), num_samples=2, samples_per_shard=2, pretrained=False)
    vit = torch.load(paths["vit_checkpoint"], weights_only=True)
    q = torch.load(paths["qformer_checkpoint"], weights_only=True)["model"]
    patches = (vit_cfg["img_size"] // vit_cfg["patch_size"]) ** 2
    assert vit["pos_embed"].shape == (1, patches + 1, vit_cfg["embed_dim"])
    assert vit["blocks.0.mlp.fc1.weight"].shape[0] == int(vit_cfg["embed_dim"] * vit_cfg["mlp_ratio"])
    assert sum(k.endswith("attn.qkv.weight") for k in vit) == vit_cfg["depth"]
    assert q["query_tokens"].shape == (1, q_cfg["num_query_tokens"], q_cfg["hidden_size"])
    assert q["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape[1] == vit_cfg["embed_dim"]
    assert q["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"].shape[0] == q_cfg["intermediate_size"]


def test_tiny_overrides_name_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = {"llm_path": "a/llm", "vit_checkpoint": "a/vit.pth", "qformer_checkpoint": "a/qformer.pth",
             "shards_pattern": "a/shards/*.tar"}
    root = os.path.join(str(tmp_path), "a")
    assert tiny_overrides(paths) == [f"model.llm_path={root}/llm", f"model.vit_checkpoint={root}/vit.pth",
                                      f"model.qformer_checkpoint={root}/qformer.pth",
                                      f"data.shards=[{root}/shards/*.tar]"]


# --- pretrained stand-ins ------------------------------------------------------------------------

@pytest.mark.slow
def test_pretrained_stand_ins_are_cached_and_copied_into_a_new_bundle(learnable_assets, tmp_path, monkeypatch):
    """The session's learnable bundle pretrained (or copied) the stand-ins; a second bundle with the same
    seed copies the same files from the cache, in the original layouts, while the ViT stays random."""
    import json

    from mgpt4_dist.tiny import assets, pretrain

    def no_pretraining(*args, **kwargs):
        raise AssertionError("pretrained again instead of copying from the cache")

    monkeypatch.setattr(pretrain, "pretrain_stand_ins", no_pretraining)
    assert os.listdir(assets.stand_in_cache_dir())  # the session's cache holds the entry
    paths = build_tiny_assets(str(tmp_path / "again"), num_samples=4, samples_per_shard=4)
    with open(os.path.join(str(tmp_path / "again"), ".complete")) as f:
        recorded = json.load(f)["pretrain"]
    assert {k: recorded[k] for k in pretrain.PRETRAIN_RECIPE} == pretrain.PRETRAIN_RECIPE
    assert recorded["caption_layout"]["end_sym"] == "\n"
    with open(os.path.join(os.path.dirname(learnable_assets["vit_checkpoint"]), "pretrain.json")) as f:
        report = json.load(f)
    # The random Q-Former file erases the image; the pretrained one carries it.
    assert report["qformer_spread_random"] < 0.01 < 0.1 < report["qformer_spread_pretrained"]
    for name in ("llm/model.safetensors", "qformer.pth"):
        ours = os.path.join(os.path.dirname(paths["vit_checkpoint"]), name)
        theirs = os.path.join(os.path.dirname(learnable_assets["vit_checkpoint"]), name)
        with open(ours, "rb") as a, open(theirs, "rb") as b:
            assert a.read() == b.read(), name
    random_bundle = build_tiny_assets(str(tmp_path / "random"), num_samples=4, samples_per_shard=4, pretrained=False)
    pretrained_q = torch.load(paths["qformer_checkpoint"], weights_only=True)["model"]
    random_q = torch.load(random_bundle["qformer_checkpoint"], weights_only=True)["model"]
    assert set(pretrained_q) == set(random_q)  # the same BLIP-2 keys
    assert not torch.equal(pretrained_q["query_tokens"], random_q["query_tokens"])
    # Keys MiniGPT-4 does not read (the text branch) are left as the random writer made them.
    assert torch.equal(pretrained_q["t5_proj.weight"], random_q["t5_proj.weight"])
    assert torch.equal(torch.load(paths["vit_checkpoint"], weights_only=True)["pos_embed"],
                       torch.load(random_bundle["vit_checkpoint"], weights_only=True)["pos_embed"])
