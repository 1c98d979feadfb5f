"""Stopping generation on the conversation's stop strings (`###` for Vicuna v0, `</s>`)."""
import torch

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
