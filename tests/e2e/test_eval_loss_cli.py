"""mgpt4-eval-loss against an independent computation: the sequence built by hand from
sentencepiece ids, the loss from the Hugging Face LLaMA's own labels path."""
import json
import os
import subprocess
import sys

import pytest
import sentencepiece as spm
import torch
from PIL import Image

from helpers import TINY_STAGE1
from mgpt4_dist.config import load_config
from mgpt4_dist.models.minigpt4 import build_minigpt4

CLI = [sys.executable, "-m", "mgpt4_dist.cli.eval_loss"]


@pytest.fixture(scope="module")
def setup(tiny_assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_loss")
    proj = {"llama_proj.weight": torch.randn(64, 64) * 0.05, "llama_proj.bias": torch.randn(64) * 0.05}
    torch.save({"model": proj}, root / "proj.pth")  # the original MiniGPT-4 checkpoint layout
    torch.manual_seed(3)
    torch.save(torch.randn(2, 3, 224, 224), root / "images.pt")
    overrides = tiny_assets["overrides"][:3] + [f"model.proj_checkpoint={root / 'proj.pth'}"]
    return {"root": root, "overrides": overrides, "llm": tiny_assets["llm_path"]}


def run_cli(setup, answers, *extra):
    path = setup["root"] / "answers.json"
    path.write_text(json.dumps(answers))
    proc = subprocess.run(CLI + ["--config", TINY_STAGE1, *setup["overrides"], *extra, "--images",
                                 str(setup["root"] / "images.pt"), "--answers", str(path), "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def independent_loss(setup, answers, before, after, max_txt_len, end_sym, extra_overrides=()):
    """[BOS][before][image][after][answer][pad] by hand; HF's own shifted-label loss (mean over tokens)."""
    cfg = load_config(TINY_STAGE1, setup["overrides"] + list(extra_overrides))
    model = build_minigpt4(cfg.model, seed=cfg.train.seed).eval()
    sp = spm.SentencePieceProcessor(model_file=os.path.join(setup["llm"], "tokenizer.model"))
    pad = sp.piece_to_id("$$")
    images = torch.load(setup["root"] / "images.pt", weights_only=True)
    with torch.no_grad():
        image_embeds = model.encode_image(images)
    embed = model.llm.get_input_embeddings()
    answer_ids = [sp.encode(a + end_sym)[:max_txt_len] for a in answers]
    width = max(map(len, answer_ids))
    rows, labels = [], []
    for i, ids in enumerate(answer_ids):
        pre = torch.tensor([1] + (sp.encode(before) if before else []))
        post = torch.tensor(sp.encode(after) if after else [], dtype=torch.long)
        ans = torch.tensor(ids + [pad] * (width - len(ids)))
        with torch.no_grad():
            rows.append(torch.cat([embed(pre), image_embeds[i], embed(post), embed(ans)]))
        labels.append(torch.cat([torch.full((len(pre) + image_embeds.shape[1] + len(post),), -100),
                                 ans.masked_fill(ans == pad, -100)]))
    with torch.no_grad():
        out = model.llm(inputs_embeds=torch.stack(rows), labels=torch.stack(labels))
    return out.loss.item(), sum(map(len, answer_ids))


def test_stage1(setup):
    answers = ["a red circle on a blue background", "stripe"]
    got = run_cli(setup, answers)
    ref, n = independent_loss(setup, answers, "", "", 32, "\n")
    assert got["num_scored_tokens"] == n
    assert got["loss"] == pytest.approx(ref, rel=1e-5)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(setup["llm"], "tokenizer.model"))
    assert [len(r) for r in got["per_sample_token_ce"]] == [len(sp.encode(a + "\n")) for a in answers]
    flat = [ce for row in got["per_sample_token_ce"] for ce in row]
    assert sum(flat) / n == pytest.approx(got["loss"], rel=1e-6)


def test_truncated_caption(setup):
    answers = ["a photo of a large purple triangle over a white background", "x"]
    got = run_cli(setup, answers, "data.max_txt_len=5")
    ref, n = independent_loss(setup, answers, "", "", 5, "\n")
    assert got["num_scored_tokens"] == n == 5 + len(spm.SentencePieceProcessor(
        model_file=os.path.join(setup["llm"], "tokenizer.model")).encode("x\n"))
    assert got["loss"] == pytest.approx(ref, rel=1e-5)


def test_stage2_instruction_with_template(setup):
    answers = ["The image shows a red circle.", "A blue square on green."]
    template = "###Human: {} ###Assistant: "
    got = run_cli(setup, answers, "data.end_sym=###", "data.max_txt_len=160", f"data.prompt_template={template}",
                  "--instruction", "<Img><ImageHere></Img> Describe this image in detail.")
    ref, _ = independent_loss(setup, answers, "###Human: <Img>", "</Img> Describe this image in detail. ###Assistant: ",
                              160, "###")
    assert got["loss"] == pytest.approx(ref, rel=1e-5)


def test_image_files_match_the_tensor_path(setup, tmp_path):
    for i, color in enumerate([(200, 30, 30), (20, 40, 220)]):
        Image.new("RGB", (50, 30), color).save(tmp_path / f"{i}.jpg")
    from mgpt4_dist.data.transforms import build_image_transform

    tensors = [build_image_transform(224)(Image.open(tmp_path / f"{i}.jpg")) for i in range(2)]
    torch.save(torch.stack(tensors), tmp_path / "same.pt")
    answers = tmp_path / "a.json"
    answers.write_text(json.dumps(["red", "blue"]))
    outs = []
    for images in (str(tmp_path), f"{tmp_path / '0.jpg'},{tmp_path / '1.jpg'}", str(tmp_path / "same.pt")):
        proc = subprocess.run(CLI + ["--config", TINY_STAGE1, *setup["overrides"], "--images", images,
                                     "--answers", str(answers), "--json"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append(json.loads(proc.stdout)["loss"])
    assert outs[0] == outs[1] == pytest.approx(outs[2], rel=1e-6)


def test_bad_inputs_are_clear_errors(setup, tmp_path):
    answers = tmp_path / "a.json"
    answers.write_text(json.dumps(["only one"]))
    proc = subprocess.run(CLI + ["--config", TINY_STAGE1, *setup["overrides"], "--images", str(setup["root"] / "images.pt"),
                                 "--answers", str(answers)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "2 images but 1 answers" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "proj13b.pth"
    torch.save({"model": {"llama_proj.weight": torch.zeros(5120, 64), "llama_proj.bias": torch.zeros(5120)}}, bad)
    answers.write_text(json.dumps(["a", "b"]))
    overrides = setup["overrides"][:3] + [f"model.proj_checkpoint={bad}"]
    proc = subprocess.run(CLI + ["--config", TINY_STAGE1, *overrides, "--images", str(setup["root"] / "images.pt"),
                                 "--answers", str(answers)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "13B LLM" in proc.stderr
