"""`mgpt4-export --format hf`: transformers loads the folder with no code of ours, its logits and
greedy answers equal ours (from a run, a consolidated folder and the original file layouts), the
eps bound of `post_layernorm` holds, the folder loads back into `mgpt4-chat`, the README snippet
runs, and the Llama-2 variant is refused."""
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import BIN, REPO, TINY_STAGE1

pytestmark = [pytest.mark.slow]

QUESTION = "what is this?"
NEW_TOKENS = 8
TOL = 1e-4


def run(tool, *args):
    return subprocess.run([os.path.join(BIN, tool), *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = str(tmp_path_factory.mktemp("img") / "noise.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def exported(tiny_trained_run, tmp_path_factory):
    """The run exported with the CLI (small shards, so the index path is used) and consolidated."""
    from mgpt4_dist.export.consolidate import consolidate

    base = tmp_path_factory.mktemp("hf")
    hf_dir, consolidated = str(base / "hf"), str(base / "consolidated")
    proc = run("mgpt4-export", tiny_trained_run, "--format", "hf", "--out", hf_dir, "--max-shard-size", "400KB")
    assert proc.returncode == 0, proc.stderr
    consolidate(tiny_trained_run, consolidated)
    return {"hf": hf_dir, "consolidated": consolidated, "stdout": proc.stdout, "stderr": proc.stderr}


def hf_load(path):
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    model, info = Blip2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info  # every tensor there, nothing left over or mis-shaped
    return model.eval(), AutoProcessor.from_pretrained(path, backend="pil")


def chat_inputs(processor, image):
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image", "image": Image.open(image)},
                                             {"type": "text", "text": QUESTION}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def our_prompt_tokens(bundle, image_token_id):
    """Our chat's prompt (`context_embeds`) as ids, image slots shown as the image token."""
    from mgpt4_dist.inference.conversation import new_conversation

    conv = new_conversation("vicuna0")
    conv.add_image()
    conv.ask(QUESTION)
    before, after = conv.prompt_for_answer().split("<ImageHere>")
    tok = bundle.tokenizer
    ids = [tok.bos_token_id] + tok(before, add_special_tokens=False)["input_ids"]
    ids += [image_token_id] * bundle.model.num_image_tokens + tok(after, add_special_tokens=False)["input_ids"]
    return ids, conv.prompt_for_answer()


def compare_logits(bundle, model, inputs, image):
    """Max |logit difference| over the original vocabulary at every position of prompt + a greedy
    answer (teacher-forced), ours from `load_model`'s MiniGPT4, theirs from transformers."""
    from mgpt4_dist.inference.generate import context_embeds, load_image

    image_id = model.config.image_token_id
    ids, prompt = our_prompt_tokens(bundle, image_id)
    assert inputs["input_ids"][0].tolist() == ids  # BOS, pieces tokenized apart, 32 image tokens in place
    pixels = load_image(image, bundle.cfg.model.vit.img_size)
    assert torch.equal(inputs["pixel_values"], pixels)  # backend="pil": the training transform bit for bit
    with torch.no_grad():
        embeds = context_embeds(bundle, prompt, bundle.model.encode_image(pixels))
        answer = bundle.model.llm.generate(inputs_embeds=embeds, max_new_tokens=NEW_TOKENS, do_sample=False,
                                           min_new_tokens=NEW_TOKENS)
        answer = answer[:, -NEW_TOKENS:]
        ours = bundle.model.llm(inputs_embeds=torch.cat([embeds, bundle.model.llm.get_input_embeddings()(answer)], 1)).logits
        theirs = model(input_ids=torch.cat([inputs["input_ids"], answer], 1), pixel_values=inputs["pixel_values"]).logits
    vocab = ours.shape[-1]
    assert theirs.shape[-1] == vocab + 1 and vocab == image_id  # <image> is the one extra row
    return (ours - theirs[..., :vocab]).abs().max().item()


def hf_greedy(model, processor, inputs, max_new_tokens=NEW_TOKENS):
    out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, stop_strings="###",
                         tokenizer=processor.tokenizer)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).split("###")[0].strip()


def chat_answer(model_dir, image):
    proc = run("mgpt4-chat", "--model", model_dir, "--image", image, "--prompt", QUESTION, "--temperature", "0",
               "--max-new-tokens", str(NEW_TOKENS))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_export_of_a_run_loads_in_transformers_with_our_logits_and_answers(exported, image, capsys):
    from mgpt4_dist.inference import load_model

    assert re.search(r"exported .* -> .*hf \(transformers Blip2ForConditionalGeneration\): \d+ tensors", exported["stdout"])
    assert "exporting to transformers" in exported["stderr"] and "100%" in exported["stderr"]  # the progress bar
    shards = [n for n in os.listdir(exported["hf"]) if n.endswith(".safetensors")]
    assert len(shards) > 1 and os.path.isfile(os.path.join(exported["hf"], "model.safetensors.index.json"))

    model, processor = hf_load(exported["hf"])
    inputs = chat_inputs(processor, image)
    bundle = load_model(exported["consolidated"], device="cpu")
    diff = compare_logits(bundle, model, inputs, image)
    with capsys.disabled():
        print(f"\n[hf export] max |logit diff| transformers vs load_model (fp32, prompt + answer): {diff:.3g}")
    assert diff < TOL

    # Greedy through the chat template = mgpt4-chat --temperature 0, on the consolidated folder and on the export.
    answer = chat_answer(exported["consolidated"], image)
    assert answer and hf_greedy(model, processor, inputs) == answer
    assert chat_answer(exported["hf"], image) == answer


def test_post_layernorm_eps_stays_within_the_bound(exported, image, capsys):
    """transformers' post_layernorm normalises with the blocks' eps (1e-6) where ln_vision has 1e-5."""
    import torch.nn.functional as F

    from mgpt4_dist.export.hf import ln_vision_eps_bound

    model, processor = hf_load(exported["hf"])
    vision = model.vision_model
    assert vision.post_layernorm.eps == 1e-6 and all(layer.layer_norm1.eps == 1e-6 for layer in vision.encoder.layers)
    pixels = chat_inputs(processor, image)["pixel_values"]
    with torch.no_grad():
        tokens = vision.encoder(inputs_embeds=vision.embeddings(pixels)).last_hidden_state
        norm = vision.post_layernorm
        used = F.layer_norm(tokens, norm.normalized_shape, None, None, 1e-6)
        wanted = F.layer_norm(tokens, norm.normalized_shape, None, None, 1e-5)
    relative = ((used - wanted).abs() / wanted.abs().clamp_min(1e-12)).max().item()
    bound = ln_vision_eps_bound(tokens, 1e-6, 1e-5)
    with capsys.disabled():
        print(f"\n[hf export] post_layernorm eps 1e-6 vs 1e-5: max relative change {relative:.3g}, bound {bound:.3g} "
              f"(min token variance {tokens.var(-1, unbiased=False).min().item():.3g})")
    assert relative <= bound * (1 + 1e-3) + 1e-6


def test_consolidated_folders_export_the_same_tensors(exported, tiny_trained_run, tmp_path):
    """A consolidated folder (frozen weights named by its config) and a `--full` one (frozen weights inside)."""
    from safetensors import safe_open

    from mgpt4_dist.export.consolidate import consolidate
    from mgpt4_dist.export.hf import export_hf

    full = str(tmp_path / "full")
    consolidate(tiny_trained_run, full, full=True)

    def tensors(folder):
        result = {}
        for name in os.listdir(folder):
            if name.endswith(".safetensors"):
                with safe_open(os.path.join(folder, name), framework="pt") as f:
                    result.update({k: f.get_tensor(k) for k in f.keys()})
        return result

    expected = tensors(exported["hf"])
    from mgpt4_dist.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="not empty"):  # never mixed into an existing folder
        export_hf(exported["consolidated"], exported["hf"], progress=False)
    for source in (exported["consolidated"], full):
        out = str(tmp_path / f"hf_{os.path.basename(source)}")
        export_hf(source, out, progress=False)
        got = tensors(out)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_original_file_layouts_export_with_our_logits(tiny_assets, tiny_trained_run, image, tmp_path):
    """eva_vit_g.pth / blip2 .pth / a MiniGPT-4 {'model': ...} projection / an LLM folder, named by a config."""
    from mgpt4_dist.config import load_config
    from mgpt4_dist.inference import load_model
    from mgpt4_dist.inference.loader import LoadedModel
    from mgpt4_dist.models.llm import load_tokenizer
    from mgpt4_dist.models.minigpt4 import build_minigpt4

    proj = str(tmp_path / "pretrained_minigpt4.pth")
    assert run("mgpt4-export", tiny_trained_run, "--format", "minigpt4", "--out", proj).returncode == 0
    overrides = [*tiny_assets["overrides"], f"model.proj_checkpoint={proj}"]
    out = str(tmp_path / "hf")
    proc = run("mgpt4-export", "--format", "hf", "--config", TINY_STAGE1, *overrides, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "exported original weight files" in proc.stdout

    cfg = load_config(TINY_STAGE1, overrides)
    reference = build_minigpt4(cfg.model, seed=cfg.train.seed).eval().requires_grad_(False)
    bundle = LoadedModel(reference, load_tokenizer(cfg.model.llm_path), cfg, "vicuna0", torch.device("cpu"))
    model, processor = hf_load(out)
    assert compare_logits(bundle, model, chat_inputs(processor, image), image) < TOL
    # Read back by our loader: the very tensors of the original files.
    loaded = load_model(out, device="cpu").model.state_dict()
    expected = reference.state_dict()
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_readme_snippet_runs_on_the_export(exported, image, tmp_path):
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split("### Use it from transformers", 1)[1]
    snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "apply_chat_template" in snippet and "generate" in snippet
    snippet = snippet.replace('"minigpt4-hf"', repr(exported["hf"])).replace('"cat.jpg"', repr(image))
    snippet = snippet.replace("max_new_tokens=300", f"max_new_tokens={NEW_TOKENS}").replace(
        '"What is in this picture?"', repr(QUESTION))
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == chat_answer(exported["consolidated"], image)


def test_llama2_variant_is_refused(tiny_assets, tmp_path):
    proc = run("mgpt4-export", "--format", "hf", "--config", TINY_STAGE1, *tiny_assets["overrides"],
               "model.has_qformer=false", "model.qformer_checkpoint=", "--out", str(tmp_path / "hf"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Llama-2 variant" in proc.stderr and "no exact class in transformers" in proc.stderr
    assert not os.path.exists(tmp_path / "hf")
