"""The MiniGPT-4 token layout, checked position by position against sentencepiece's own ids."""
import os

import pytest
import sentencepiece as spm
import torch

from mgpt4_dist.tiny.assets import build_tiny_tokenizer
from mgpt4_dist.models.llm import load_tokenizer
from mgpt4_dist.models.sequence import IGNORE_INDEX, SequenceBuilder

N_IMG = 3


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return build_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def sp(tok_dir):
    return spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_pad_token_is_the_dollar_piece(tok, sp):
    assert tok.pad_token_id == sp.piece_to_id("$$") != sp.unk_id()
    assert tok.bos_token_id == 1


def test_stage1_layout(tok, sp):
    build = SequenceBuilder(tok, N_IMG, max_txt_len=32, end_sym="\n")
    answers = ["a red circle", "a small blue square on a green background"]
    batch = build(answers)
    ans = [sp.encode(a + "\n") for a in answers]
    assert ans[0][-1] == sp.piece_to_id("<0x0A>")  # end_sym "\n" via byte fallback
    A = max(map(len, ans))
    assert batch.input_ids_BT.shape == (2, 1 + N_IMG + A)
    pad = tok.pad_token_id
    for row, a in enumerate(ans):
        expect_ids = [1] + [pad] * N_IMG + a + [pad] * (A - len(a))
        expect_labels = [IGNORE_INDEX] * (1 + N_IMG) + a + [IGNORE_INDEX] * (A - len(a))
        assert batch.input_ids_BT[row].tolist() == expect_ids
        assert batch.labels_BT[row].tolist() == expect_labels
        assert batch.image_slots_BT[row].tolist() == [False] + [True] * N_IMG + [False] * A
        assert batch.attention_mask_BT[row].tolist() == [1] * (1 + N_IMG + len(a)) + [0] * (A - len(a))
    assert batch.num_scored_tokens == sum(map(len, ans))


def test_stage2_layout_pieces_tokenized_separately(tok, sp):
    template = "###Human: {} ###Assistant: "
    instruction = template.format("<Img><ImageHere></Img> Describe this image in detail.")
    build = SequenceBuilder(tok, N_IMG, max_txt_len=160, end_sym="###")
    batch = build(["a red circle."], instruction)
    before = sp.encode("###Human: <Img>")
    after = sp.encode("</Img> Describe this image in detail. ###Assistant: ")
    ans = sp.encode("a red circle.###")
    pad = tok.pad_token_id
    assert batch.input_ids_BT[0].tolist() == [1] + before + [pad] * N_IMG + after + ans
    start = 1 + len(before) + N_IMG + len(after)
    assert batch.labels_BT[0, :start].eq(IGNORE_INDEX).all()
    assert batch.labels_BT[0, start:].tolist() == ans
    slots = batch.image_slots_BT[0].nonzero().flatten().tolist()
    assert slots == list(range(1 + len(before), 1 + len(before) + N_IMG))


def test_truncation_drops_end_sym(tok, sp):
    build = SequenceBuilder(tok, N_IMG, max_txt_len=4, end_sym="\n")
    long = "a photo of a large purple triangle over a white background"
    batch = build([long, "red"])
    full = sp.encode(long + "\n")
    assert len(full) > 4
    assert batch.labels_BT[0, 1 + N_IMG:].tolist() == full[:4]
    assert sp.piece_to_id("<0x0A>") not in batch.input_ids_BT[0].tolist()
    short = sp.encode("red\n")
    assert batch.labels_BT[1, 1 + N_IMG:].tolist() == short + [IGNORE_INDEX] * (4 - len(short))


def test_pad_token_inside_an_answer_is_not_scored(tok, sp):
    build = SequenceBuilder(tok, N_IMG, max_txt_len=32, end_sym="\n")
    batch = build(["costs$$ now"])
    ids = sp.encode("costs$$ now\n")
    pad = tok.pad_token_id
    assert pad in ids
    labels = batch.labels_BT[0, 1 + N_IMG:].tolist()
    assert labels == [IGNORE_INDEX if t == pad else t for t in ids]


def test_condition_clipped_to_max_context_len(tok):
    build = SequenceBuilder(tok, N_IMG, max_txt_len=8, end_sym="\n", max_context_len=2)
    batch = build(["red"])
    assert batch.image_slots_BT[0].sum() == 2
    assert batch.input_ids_BT.shape[1] == 1 + 2 + len(build.answers(["red"])[0])


def test_one_placeholder_required(tok):
    build = SequenceBuilder(tok, N_IMG, max_txt_len=8, end_sym="\n")
    with pytest.raises(ValueError, match="exactly one"):
        build(["x"], "<ImageHere> and <ImageHere>")


def test_tokenizer_matches_sentencepiece_for_a_llama_tokenizer_folder(tok_dir, sp, tmp_path):
    """Real Vicuna folders declare LlamaTokenizer; ids must still be the slow tokenizer's (= sentencepiece's)."""
    import json
    import shutil

    folder = tmp_path / "vicuna_like"
    shutil.copytree(tok_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "LlamaTokenizer"
    config.pop("legacy", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))  # adds a converted tokenizer.json
    assert (folder / "tokenizer.json").exists()
    tok = load_tokenizer(str(folder))
    for text in [" leading space", "  two", "###Human: <Img>", "</Img> Describe this image. ###Assistant: ",
                 "a red circle\n", "naïve café 🙂", "[INST] <Img>", " [/INST] "]:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), text


def test_generation_prompt_is_the_training_layout_without_the_answer(tok):
    """`prompt` (chat, evaluation) and `__call__` (training, eval-loss) share one layout: the prompt
    is exactly the training sequence up to where the answer starts."""
    build = SequenceBuilder(tok, N_IMG, max_txt_len=32, end_sym="###")
    instruction = "###Human: <Img><ImageHere></Img> Describe it. ###Assistant: "
    train = build(["a red circle"], instruction)
    prompt = build.prompt(2, instruction)
    length = prompt.input_ids_BT.shape[1]
    first_scored = int((train.labels_BT[0] != IGNORE_INDEX).nonzero()[0])
    assert length == first_scored
    for row in range(2):
        assert torch.equal(prompt.input_ids_BT[row], train.input_ids_BT[0, :length])
        assert torch.equal(prompt.image_slots_BT[row], train.image_slots_BT[0, :length])
    assert bool(prompt.attention_mask_BT.all()) and bool((prompt.labels_BT == IGNORE_INDEX).all())
    assert build.prompt(1).input_ids_BT.shape[1] == 1 + N_IMG  # stage 1: BOS and the image slots
