"""Tiny stand-ins for every asset a MiniGPT-4 run needs, built locally.

This module owns the *writers*: a LLaMA-style sentencepiece tokenizer, a random Hugging Face
LLaMA folder, EVA ViT and BLIP-2 Q-Former weight files in the original checkpoints' key layout,
synthetic WebDataset shards, and the cached bundle of all of them (`build_tiny_assets`) with the
config overrides that point a run at it (`tiny_overrides`). The random writers are primitives: a
bundle's LLaMA and Q-Former are then pretrained (`mgpt4_dist.tiny.pretrain`), once per seed and
recipe, kept in a cache outside the bundle. The towers' sizes come from the shipped `configs/tiny_stage1.yaml`.

The ViT and Q-Former writers work from key names and shapes only, never through the model code,
so that a loader bug cannot be hidden by a writer that shares it.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import random
import shutil
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional, Tuple, Union

# torch and transformers are imported inside the builders: a cached bundle is then reused (and
# the CLI rejects bad input) without paying seconds of import time.
if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Bump when a writer's output changes, so cached bundles from older code get rebuilt.
ASSETS_FORMAT_VERSION = 1

from mgpt4_dist.config import PAD_TOKEN as PAD_PIECE  # noqa: E402  (the one home of the "$$" pad piece)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
COMPLETE_MARKER = ".complete"
SHARD_PREFIX = "shard"

# Initialisation scale of the random checkpoints (the usual BERT/ViT std).
INIT_STD = 0.02

# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey", "pink", "brown"]
_SHAPES = ["square", "circle", "triangle", "stripe", "rectangle", "dot", "line", "star", "ring", "cross"]
_SIZES = ["small", "large", "tiny", "big", "thin", "wide"]
_RELATIONS = ["on", "over", "under", "next to", "above", "below", "in front of", "behind", "inside", "near"]
_SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a child", "the old man", "our team", "the bird",
             "she", "he", "they", "we", "the painter", "a student", "the driver", "his sister"]
_VERBS = ["sees", "likes", "draws", "paints", "finds", "describes", "watches", "holds", "reads", "writes about",
          "remembers", "carries", "opens", "counts", "shows"]
_OBJECTS = ["the book", "a picture", "the river", "a small house", "the city", "an apple", "the garden",
            "a long road", "the sky", "a letter", "the window", "a wooden table", "the mountain", "some flowers"]
_ADVERBIALS = ["today", "in the morning", "at night", "quickly", "slowly", "again", "every day", "with care",
               "for a while", "yesterday", "after lunch", "before the rain", "near the station"]
_PROMPTS = ["Describe this image in detail.", "Take a look at this image and describe what you notice.",
            "Please provide a detailed description of the picture.", "What do you see in this picture?",
            "Could you describe the contents of this image for me?", "Tell me about the shapes and colours."]


def tokenizer_training_lines(seed: int = 0, groups: int = 300) -> List[str]:
    """Training text: MiniGPT-4 prompt templates, shape/colour captions and generic English.

    No line contains a newline, so "\\n" is left to byte fallback (`<0x0A>`) as in LLaMA.
    """
    rng = random.Random(seed)

    def caption() -> str:
        return (f"a photo of a {rng.choice(_SIZES)} {rng.choice(_COLOURS)} {rng.choice(_SHAPES)} "
                f"{rng.choice(_RELATIONS)} a {rng.choice(_COLOURS)} background")

    lines: List[str] = []
    for _ in range(groups):
        prompt, text = rng.choice(_PROMPTS), caption()
        lines.append(f"###Human: <Img><ImageHere></Img> {prompt} ###Assistant: {text}.")
        lines.append(f"[INST] <Img><ImageHere></Img> {prompt} [/INST] {text}.")
        lines.append(f"{rng.choice(_SUBJECTS).capitalize()} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                     f"{rng.choice(_ADVERBIALS)}.")
        lines.append(f"There are {rng.randint(0, 999)} {rng.choice(_SHAPES)}s, and {rng.randint(0, 99)}% of them "
                     f"are {rng.choice(_COLOURS)}: see item #{rng.randint(1, 50)} / page {rng.randint(1, 9)}.")
        # Padded captions make "$$" frequent enough to be learnt as an ordinary merge, as in LLaMA.
        lines.append(f"{text} {PAD_PIECE * rng.randint(1, 4)}")
    return lines


def train_sentencepiece(lines: List[str], vocab_size: int) -> bytes:
    """Serialized sentencepiece BPE model with LLaMA's trainer settings, trained in memory."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        add_dummy_prefix=True,
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        # Every character of our small corpus becomes a piece; anything else falls back to bytes.
        character_coverage=1.0,
        # One thread and the corpus order as given: the same call gives the same model bytes.
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model.getvalue()


def tokenizer_config() -> Dict[str, object]:
    """tokenizer_config.json that makes `AutoTokenizer` encode exactly like sentencepiece.

    With transformers 5.x, `LlamaTokenizer` is a `tokenizers` pipeline that drops sentencepiece's
    dummy prefix when the text already starts with whitespace (" a" gives "▁a", not "▁", "▁a").
    `TokenizersBackend` built from the .model proto follows the proto's normalizer spec instead
    and matches `SentencePieceProcessor.encode`, i.e. the original slow LlamaTokenizer; `legacy`
    keeps the dummy prefix on every chunk between special tokens, as that tokenizer did.
    """
    return {
        "tokenizer_class": "TokenizersBackend",
        "legacy": True,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }


def build_tiny_tokenizer(out_dir: str, vocab_size: int = 1000, seed: int = 0) -> str:
    """Train a LLaMA-style sentencepiece tokenizer into `out_dir`; returns `out_dir`."""
    import sentencepiece as spm

    model_bytes = train_sentencepiece(tokenizer_training_lines(seed), vocab_size)
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    if sp.piece_to_id(PAD_PIECE) == sp.unk_id():
        # MiniGPT-4 needs "$$" as an existing piece; fail here rather than at training time.
        raise RuntimeError(f"tokenizer training did not learn the {PAD_PIECE!r} piece (vocab_size={vocab_size})")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model_bytes)
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config())
    _write_json(os.path.join(out_dir, "special_tokens_map.json"),
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return out_dir


def sentencepiece_vocab_size(tokenizer_dir: str) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model")).get_piece_size()


# ---------------------------------------------------------------------------------------------
# LLM
# ---------------------------------------------------------------------------------------------

def build_tiny_llm(out_dir: str, tokenizer_dir_or_vocab_size: Union[str, int], *, hidden_size: int = 64,
                   num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128, seed: int = 0,
                   max_position_embeddings: int = 512, num_kv_heads: Optional[int] = None) -> str:
    """A random fp32 `LlamaForCausalLM` saved as a Hugging Face LLaMA folder; returns `out_dir`.

    Given a tokenizer folder, its files are copied in and its vocab size is used.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if isinstance(tokenizer_dir_or_vocab_size, int):
        vocab_size, tokenizer_dir = tokenizer_dir_or_vocab_size, None
    else:
        tokenizer_dir = tokenizer_dir_or_vocab_size
        vocab_size = sentencepiece_vocab_size(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,  # fewer: grouped-query attention (Llama-2 70B)
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    # fork_rng: seed the init without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch.float32)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)  # transformers 5 always writes model.safetensors
    if tokenizer_dir is not None and not _same_dir(tokenizer_dir, out_dir):
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_dir, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(out_dir, name))
    return out_dir


# ---------------------------------------------------------------------------------------------
# EVA ViT and BLIP-2 Q-Former weight files (original layouts)
# ---------------------------------------------------------------------------------------------

Shape = Tuple[int, ...]


def _layer_norm(prefix: str, width: int) -> List[Tuple[str, Shape]]:
    return [(f"{prefix}.weight", (width,)), (f"{prefix}.bias", (width,))]


def _linear(prefix: str, out_features: int, in_features: int) -> List[Tuple[str, Shape]]:
    return [(f"{prefix}.weight", (out_features, in_features)), (f"{prefix}.bias", (out_features,))]


def _is_layer_norm_weight(name: str) -> bool:
    return name.endswith(("norm1.weight", "norm2.weight", "LayerNorm.weight", "ln_vision.weight"))


def _random_state(spec: List[Tuple[str, Shape]], seed: int) -> Dict[str, torch.Tensor]:
    """Tensors for (name, shape) pairs, drawn in list order from one seeded generator.

    Biases are random too (not zero) and LayerNorm weights are 1 + noise, so a tensor loaded
    into the wrong place, or not loaded at all, changes the model's output.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    state: Dict[str, torch.Tensor] = {}
    for name, shape in spec:
        noise = torch.randn(shape, generator=gen, dtype=torch.float32) * INIT_STD
        state[name] = 1.0 + noise if _is_layer_norm_weight(name) else noise
    return state


def vit_checkpoint_spec(*, img_size: int = 224, patch_size: int = 14, embed_dim: int = 64, depth: int = 2,
                        mlp_ratio: float = 4.3637) -> List[Tuple[str, Shape]]:
    """Key names and shapes of the original `eva_vit_g.pth` (a flat state dict)."""
    d, hidden = embed_dim, int(embed_dim * mlp_ratio)
    num_patches = (img_size // patch_size) ** 2
    spec: List[Tuple[str, Shape]] = [
        ("cls_token", (1, 1, d)),
        ("pos_embed", (1, num_patches + 1, d)),
        ("patch_embed.proj.weight", (d, 3, patch_size, patch_size)),
        ("patch_embed.proj.bias", (d,)),
    ]
    for n in range(depth):
        b = f"blocks.{n}"
        spec += _layer_norm(f"{b}.norm1", d)
        # EVA stores q and v biases separately and has no k bias: there is no qkv.bias tensor.
        spec += [(f"{b}.attn.q_bias", (d,)), (f"{b}.attn.v_bias", (d,)), (f"{b}.attn.qkv.weight", (3 * d, d))]
        spec += _linear(f"{b}.attn.proj", d, d)
        spec += _layer_norm(f"{b}.norm2", d)
        spec += _linear(f"{b}.mlp.fc1", hidden, d)
        spec += _linear(f"{b}.mlp.fc2", d, hidden)
    return spec


def build_tiny_vit_checkpoint(path: str, *, img_size: int = 224, patch_size: int = 14, embed_dim: int = 64,
                              depth: int = 2, num_heads: int = 4, mlp_ratio: float = 4.3637, seed: int = 0,
                              dtype: Optional[torch.dtype] = None) -> str:
    """Write a random EVA ViT state dict in the `eva_vit_g.pth` layout with torch.save; returns `path`.

    `dtype` defaults to float32 (the real file is fp16). `num_heads` does not change any tensor
    shape; it is checked so the file fits the config.
    """
    import torch

    if embed_dim % num_heads:
        raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
    spec = vit_checkpoint_spec(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                               mlp_ratio=mlp_ratio)
    state = {k: v.to(dtype or torch.float32) for k, v in _random_state(spec, seed).items()}
    _torch_save(state, path)
    return path


def qformer_checkpoint_spec(*, vision_width: int = 64, hidden_size: int = 64, num_layers: int = 2,
                            intermediate_size: int = 128, cross_attention_freq: int = 2,
                            num_query_tokens: int = 32, text_vocab_size: int = 100, max_positions: int = 512,
                            t5_width: int = 32) -> List[Tuple[str, Shape]]:
    """Key names and shapes of the original `blip2_pretrained_flant5xxl.pth` "model" dict.

    Includes the keys MiniGPT-4 ignores (text branch, word/position embeddings, t5_proj), since
    the real file has them and a loader must skip them. `position_ids` is added separately.
    """
    h, i = hidden_size, intermediate_size
    emb = "Qformer.bert.embeddings"
    spec: List[Tuple[str, Shape]] = [("query_tokens", (1, num_query_tokens, h))]
    spec += _layer_norm("ln_vision", vision_width)
    spec += [(f"{emb}.word_embeddings.weight", (text_vocab_size, h)),
             (f"{emb}.position_embeddings.weight", (max_positions, h))]
    spec += _layer_norm(f"{emb}.LayerNorm", h)
    for n in range(num_layers):
        layer = f"Qformer.bert.encoder.layer.{n}"
        for proj in ("query", "key", "value"):
            spec += _linear(f"{layer}.attention.self.{proj}", h, h)
        spec += _linear(f"{layer}.attention.output.dense", h, h)
        spec += _layer_norm(f"{layer}.attention.output.LayerNorm", h)
        if n % cross_attention_freq == 0:
            # Keys and values read the ViT features, hence vision_width inputs.
            spec += _linear(f"{layer}.crossattention.self.query", h, h)
            spec += _linear(f"{layer}.crossattention.self.key", h, vision_width)
            spec += _linear(f"{layer}.crossattention.self.value", h, vision_width)
            spec += _linear(f"{layer}.crossattention.output.dense", h, h)
            spec += _layer_norm(f"{layer}.crossattention.output.LayerNorm", h)
        # Text branch: used by BLIP-2's text side only, ignored by MiniGPT-4.
        spec += _linear(f"{layer}.intermediate.dense", i, h)
        spec += _linear(f"{layer}.output.dense", h, i)
        spec += _layer_norm(f"{layer}.output.LayerNorm", h)
        spec += _linear(f"{layer}.intermediate_query.dense", i, h)
        spec += _linear(f"{layer}.output_query.dense", h, i)
        spec += _layer_norm(f"{layer}.output_query.LayerNorm", h)
    spec += _linear("t5_proj", t5_width, h)
    return spec


def build_tiny_qformer_checkpoint(path: str, *, vision_width: int = 64, hidden_size: int = 64, num_layers: int = 2,
                                  num_heads: int = 4, intermediate_size: int = 128, cross_attention_freq: int = 2,
                                  num_query_tokens: int = 32, seed: int = 0) -> str:
    """Write a random `{"model": state}` in the BLIP-2 checkpoint layout with torch.save; returns `path`."""
    import torch

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if cross_attention_freq < 1:
        raise ValueError(f"cross_attention_freq must be >= 1, got {cross_attention_freq}")
    max_positions = 512
    spec = qformer_checkpoint_spec(vision_width=vision_width, hidden_size=hidden_size, num_layers=num_layers,
                                   intermediate_size=intermediate_size, cross_attention_freq=cross_attention_freq,
                                   num_query_tokens=num_query_tokens, max_positions=max_positions)
    state = _random_state(spec, seed)
    # A BERT buffer saved in the real file; not a parameter, so not random.
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(max_positions, dtype=torch.int64).unsqueeze(0)
    _torch_save({"model": state}, path)
    return path


# ---------------------------------------------------------------------------------------------
# The cached bundle
# ---------------------------------------------------------------------------------------------

# The tiny towers' sizes are stated once, in the shipped tiny config; the bundle's weight files are
# written to fit it. The LLM's sizes live here: a run reads them from the LLM folder's config.json.
TINY_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny_stage1.yaml")
_VIT_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio")
_QFORMER_KEYS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "cross_attention_freq",
                 "num_query_tokens")
TINY_LLM = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_position_embeddings=512)
TINY_VOCAB_SIZE = 1000


def tiny_tower_sizes() -> Tuple[Dict[str, object], Dict[str, object]]:
    """(ViT sizes, Q-Former sizes) as the builders take them, read from the shipped tiny config."""
    from mgpt4_dist.config import load_config

    model = load_config(TINY_CONFIG).model
    return ({k: getattr(model.vit, k) for k in _VIT_KEYS}, {k: getattr(model.qformer, k) for k in _QFORMER_KEYS})


def asset_paths(out_dir: str) -> Dict[str, str]:
    root = os.path.abspath(out_dir)
    return {
        "llm_path": os.path.join(root, "llm"),
        "vit_checkpoint": os.path.join(root, "vit.pth"),
        "qformer_checkpoint": os.path.join(root, "qformer.pth"),
        "shards_pattern": os.path.join(root, "shards", "*.tar"),
    }


def _model_parameters(seed: int) -> Dict[str, object]:
    """What the model files depend on (not the shards)."""
    vit, qformer = tiny_tower_sizes()
    return {"format_version": ASSETS_FORMAT_VERSION, "seed": seed, "vocab_size": TINY_VOCAB_SIZE, "llm": TINY_LLM,
            "vit": vit, "qformer": qformer}


def _caption_layout() -> Dict[str, object]:
    """The tiny config's data.* that a pretrained LLaMA learnt its captions in."""
    from mgpt4_dist.config import load_config

    data = load_config(TINY_CONFIG).data
    return {k: getattr(data, k) for k in ("end_sym", "max_txt_len", "clean_captions", "max_caption_words")}


def _bundle_parameters(num_samples: int, samples_per_shard: int, seed: int, pretrained: bool) -> Dict[str, object]:
    from mgpt4_dist.tiny.pretrain import PRETRAIN_RECIPE

    # A changed caption layout rebuilds a pretrained bundle.
    return {**_model_parameters(seed), "num_samples": num_samples, "samples_per_shard": samples_per_shard,
            "pretrain": {**PRETRAIN_RECIPE, "caption_layout": _caption_layout()} if pretrained else None}


# ---------------------------------------------------------------------------------------------
# The cache of pretrained stand-ins
# ---------------------------------------------------------------------------------------------

PRETRAINED_FILES = ("llm/model.safetensors", "llm/config.json", "qformer.pth", "pretrain.json")


def stand_in_cache_dir() -> str:
    """Where pretrained stand-ins are kept between bundles: $MGPT4_CACHE_DIR/tiny_stand_ins, else
    $XDG_CACHE_HOME (default ~/.cache)/mgpt4_dist/tiny_stand_ins. Pretraining takes about two minutes;
    every later bundle with the same inputs (`_pretraining_inputs`) copies the files instead."""
    root = os.environ.get("MGPT4_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "mgpt4_dist")
    return os.path.join(root, "tiny_stand_ins")


def _pretraining_inputs(paths: Dict[str, str], seed: int) -> Dict[str, object]:
    """Everything the pretrained files depend on besides the random files' own parameters: the
    recipe, the caption layout the LLaMA learns (the tiny config's data.*), the tokenizer it learns
    with, and the library versions (another version may train to other numbers)."""
    import hashlib

    import sentencepiece
    import torch
    import transformers

    from mgpt4_dist.tiny.pretrain import PRETRAIN_RECIPE

    with open(os.path.join(paths["llm_path"], "tokenizer.model"), "rb") as f:
        tokenizer_sha = hashlib.sha256(f.read()).hexdigest()
    return {**_model_parameters(seed), "pretrain": PRETRAIN_RECIPE, "tokenizer_sha256": tokenizer_sha,
            "data": _caption_layout(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "sentencepiece": sentencepiece.__version__}}


def _pretrained_stand_ins(paths: Dict[str, str], out_dir: str, seed: int, progress: bool) -> None:
    """Pretrain the random LLaMA and Q-Former of a fresh bundle in place, or copy them from the cache."""
    import hashlib

    from mgpt4_dist.config import load_config
    from mgpt4_dist.tiny.pretrain import pretrain_stand_ins

    key = json.dumps(_pretraining_inputs(paths, seed), sort_keys=True)
    entry = os.path.join(stand_in_cache_dir(), hashlib.sha256(key.encode()).hexdigest()[:16])
    if os.path.isfile(os.path.join(entry, COMPLETE_MARKER)):
        try:
            for name in PRETRAINED_FILES:
                shutil.copyfile(os.path.join(entry, name), os.path.join(out_dir, name))
            log.info("pretrained stand-ins copied from the cache %s", entry)
            return
        except OSError as e:  # an entry removed by hand while we read it: pretrain instead
            log.warning("could not read the cached stand-ins in %s (%s): pretraining them", entry, e)
    report = pretrain_stand_ins(load_config(TINY_CONFIG, tiny_overrides(paths)), seed, progress)
    _write_json(os.path.join(out_dir, "pretrain.json"), report)
    # Written beside the entry, then renamed into place: readers see a whole entry or none. An entry
    # another process published meanwhile is kept (same inputs, same files); a cache that cannot be
    # written costs the next bundle a pretraining, nothing else.
    staging = f"{entry}.tmp-{os.getpid()}"
    try:
        os.makedirs(os.path.join(staging, "llm"), exist_ok=True)
        for name in PRETRAINED_FILES:
            shutil.copyfile(os.path.join(out_dir, name), os.path.join(staging, name))
        _write_json(os.path.join(staging, COMPLETE_MARKER), {"inputs": json.loads(key)})
        if not os.path.isdir(entry):
            os.rename(staging, entry)
    except OSError as e:
        log.warning("could not cache the pretrained stand-ins in %s: %s", entry, e)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _read_marker(path: str) -> Optional[Dict[str, object]]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def build_tiny_assets(out_dir: str, *, num_samples: int = 256, samples_per_shard: int = 64, seed: int = 0,
                      pretrained: bool = True, force: bool = False, progress: bool = False) -> Dict[str, str]:
    """Build (or reuse) tokenizer + LLM, ViT and Q-Former files and shards under `out_dir`.

    `pretrained`: the LLaMA and Q-Former are the pretrained stand-ins of `mgpt4_dist.tiny.pretrain`
    (a stage-1 run then learns to use the image); otherwise the random primitives, for tests of
    loaders and layouts. A bundle whose `.complete` marker records
    the same parameters is reused untouched. The marker is written last, so an interrupted build
    is redone on the next call.
    """
    if num_samples < 1 or samples_per_shard < 1:
        raise ValueError(f"num_samples and samples_per_shard must be >= 1, got {num_samples}, {samples_per_shard}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} exists and is not a directory")
    paths = asset_paths(out_dir)
    marker = os.path.join(out_dir, COMPLETE_MARKER)
    params = _bundle_parameters(num_samples, samples_per_shard, seed, pretrained)
    if not force and _read_marker(marker) == params:
        log.info("tiny assets in %s are up to date", out_dir)
        return paths

    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(marker):
        os.remove(marker)
    # Surplus shards of an earlier, bigger build would still match the pattern. Only files with
    # our shard names go: `out_dir` may be a folder the user also keeps other things in. The LLM
    # and weight files have fixed names and are simply overwritten.
    for stale in glob.glob(os.path.join(os.path.dirname(paths["shards_pattern"]), f"{SHARD_PREFIX}-*.tar")):
        os.remove(stale)

    vit_sizes, qformer_sizes = tiny_tower_sizes()
    log.info("building tokenizer and tiny LLaMA in %s", paths["llm_path"])
    build_tiny_tokenizer(paths["llm_path"], vocab_size=TINY_VOCAB_SIZE, seed=seed)
    build_tiny_llm(paths["llm_path"], paths["llm_path"], seed=seed, **TINY_LLM)
    log.info("writing %s", paths["vit_checkpoint"])
    build_tiny_vit_checkpoint(paths["vit_checkpoint"], seed=seed, **vit_sizes)
    log.info("writing %s", paths["qformer_checkpoint"])
    build_tiny_qformer_checkpoint(paths["qformer_checkpoint"], vision_width=vit_sizes["embed_dim"], seed=seed,
                                  **qformer_sizes)
    if pretrained:
        _pretrained_stand_ins(paths, out_dir, seed, progress)
    elif os.path.exists(os.path.join(out_dir, "pretrain.json")):
        os.remove(os.path.join(out_dir, "pretrain.json"))
    log.info("writing %d synthetic samples to %s", num_samples, os.path.dirname(paths["shards_pattern"]))
    write_synthetic_shards(os.path.dirname(paths["shards_pattern"]), num_samples, samples_per_shard, seed, progress)

    _write_json(marker, params)
    return paths


def write_synthetic_shards(shards_dir: str, num_samples: int, samples_per_shard: int, seed: int,
                           progress: bool) -> List[str]:
    from mgpt4_dist.data.shards import write_shards
    from mgpt4_dist.tiny.scenes import synthetic_samples

    os.makedirs(shards_dir, exist_ok=True)
    samples: Iterator[Tuple[str, bytes, str]] = synthetic_samples(num_samples, seed=seed)
    return write_shards(samples, shards_dir, prefix=SHARD_PREFIX, samples_per_shard=samples_per_shard, progress=progress)


def tiny_overrides(paths: Dict[str, str]) -> List[str]:
    """Config overrides that point a run at a bundle from `build_tiny_assets`."""
    return [
        f"model.llm_path={os.path.abspath(paths['llm_path'])}",
        f"model.vit_checkpoint={os.path.abspath(paths['vit_checkpoint'])}",
        f"model.qformer_checkpoint={os.path.abspath(paths['qformer_checkpoint'])}",
        f"data.shards=[{os.path.abspath(paths['shards_pattern'])}]",
    ]


# ---------------------------------------------------------------------------------------------
# Small file helpers
# ---------------------------------------------------------------------------------------------

def _write_json(path: str, obj: object) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _torch_save(obj: object, path: str) -> None:
    import torch

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    torch.save(obj, path)


def _same_dir(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
