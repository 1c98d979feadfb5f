"""Stopping generation on the conversation's stop strings (`###` for Vicuna v0, `</s>`)."""
import torch

from mgpt4_dist.inference.conversation import cut_at_stops
from mgpt4_dist.inference.generate import StopOnStrings
from mgpt4_dist.models.llm import load_tokenizer


def test_a_row_stops_once_its_generated_text_holds_a_stop_string(tiny_assets):
    tokenizer = load_tokenizer(tiny_assets["llm_path"])
    prompt = tokenizer("###Human: look ###Assistant:", add_special_tokens=False)["input_ids"]

    def stops(generated_ids, stop_strings=("###", "</s>")):
        row = torch.tensor([prompt + generated_ids])
        return StopOnStrings(tokenizer, list(stop_strings), prompt_len=len(prompt))(row, None).tolist()

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    assert stops(ids("a cat on a mat")) == [False]  # the prompt's own `###` does not count
    assert stops(ids("a cat ###")) == [True]
    assert stops(ids("a dog") + [tokenizer.eos_token_id]) == [True]
    assert stops(ids("a dog") + [tokenizer.eos_token_id], ["###"]) == [False]


def test_text_is_cut_at_the_first_stop_and_a_streamed_partial_stop_is_held_back():
    assert cut_at_stops("<s> a cat###Human: more</s>", ["###", "</s>", ""]) == "a cat"
    assert cut_at_stops(" a cat ##", ["###"]) == "a cat ##"
    assert cut_at_stops(" a cat ##", ["###"], hold_partial_stop=True) == "a cat"
    assert cut_at_stops("a cat </", ["###", "</s>"], hold_partial_stop=True) == "a cat"


def test_greedy_tokens_and_chat_prompt_follow_the_training_sequence(tiny_assets):
    """Evaluation's greedy decoding equals the LLM's own greedy `generate` on the embeddings chat
    builds, and chat's prompt embeddings are training's sequence up to the answer."""
    from types import SimpleNamespace

    from mgpt4_dist.config import load_config
    from mgpt4_dist.inference.generate import context_embeds
    from mgpt4_dist.models.minigpt4 import build_minigpt4
    from mgpt4_dist.models.sequence import SequenceBuilder

    from helpers import TINY_STAGE1

    cfg = load_config(TINY_STAGE1, tiny_assets["overrides"])
    model = build_minigpt4(cfg.model, seed=cfg.train.seed).eval()
    tokenizer = load_tokenizer(tiny_assets["llm_path"])
    bundle = SimpleNamespace(model=model, tokenizer=tokenizer, cfg=cfg)
    builder = SequenceBuilder(tokenizer, model.num_image_tokens, cfg.data.max_txt_len, cfg.data.end_sym)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    prompt = "###Human: <Img><ImageHere></Img> What is it? ###Assistant: "
    with torch.no_grad():
        image_embeds = model.encode_image(images)
        chat = context_embeds(bundle, prompt, image_embeds[:1])
        train = model.embed_sequence(image_embeds[:1], builder(["a cat"], prompt))
        assert torch.equal(chat[0], train[0, :chat.shape[1]])

        ours = model(images, builder.prompt(2, prompt), generate_tokens=5)
        theirs = model.llm.generate(inputs_embeds=model.embed_sequence(image_embeds, builder.prompt(2, prompt)),
                                    do_sample=False, max_new_tokens=5, min_new_tokens=5, num_beams=1,
                                    pad_token_id=tokenizer.pad_token_id)
    assert ours.shape == (2, 5) and torch.equal(ours, theirs[:, -5:])
