"""Answer generation: image embeddings spliced into the prompt's token embeddings, then the LLM's
`generate` from `inputs_embeds`.

The prompt is built by the training code's own `SequenceBuilder.prompt` and embedded by
`MiniGPT4.embed_sequence` (`mgpt4_dist.models.sequence`: BOS first, the text pieces around
`<ImageHere>` tokenized separately without special tokens, image embeddings between them), so
training, eval-loss, evaluation and chat share one sequence code path. Generation stops on `###`
(Vicuna v0) or `</s>`; the answer is cut there.
"""
from __future__ import annotations

import sys
import warnings
from typing import List, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from mgpt4_dist.errors import UserError
from mgpt4_dist.inference.conversation import Conversation, cut_at_stops, new_conversation
from mgpt4_dist.models.sequence import IMAGE_PLACEHOLDER, SequenceBuilder


class ImageError(UserError, ValueError):
    """An image file that is missing or cannot be decoded."""


def load_image(path: str, image_size: int) -> torch.Tensor:
    """[1, 3, H, W] with the training transform (square bicubic resize, CLIP normalisation)."""
    import os

    from mgpt4_dist.data import BadSampleError
    from mgpt4_dist.data.transforms import build_image_transform, load_image_file

    if not os.path.isfile(path):
        raise ImageError(f"image not found: {path}")
    try:
        image = load_image_file(path)
    except (BadSampleError, OSError) as e:
        raise ImageError(f"cannot read image {path}: {e}") from None
    return build_image_transform(image_size)(image).unsqueeze(0)


class StopOnStrings(StoppingCriteria):
    """Stop a row once its generated text contains one of `stops` (e.g. `###`)."""

    def __init__(self, tokenizer, stops: List[str], prompt_len: int):
        self.tokenizer, self.stops, self.prompt_len = tokenizer, stops, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = []
        for row in input_ids:
            tail = self.tokenizer.decode(row[self.prompt_len:][-8:], skip_special_tokens=False)
            done.append(any(s in tail for s in self.stops))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def prompt_builder(bundle) -> SequenceBuilder:
    """The training code's `SequenceBuilder` for this model. Without the training clip of the
    condition (`model.max_context_len` cuts its end): chat keeps the demo's window instead, the
    last `max_length` positions (see `generate`)."""
    cfg = bundle.cfg
    return SequenceBuilder(bundle.tokenizer, bundle.model.num_image_tokens, cfg.data.max_txt_len, cfg.data.end_sym,
                           max_context_len=sys.maxsize)


def context_embeds(bundle, prompt: str, image_embeds_1QD: torch.Tensor) -> torch.Tensor:
    """[1, T, D]: the prompt laid out as training lays out a condition (`SequenceBuilder.prompt`: BOS,
    the text pieces around <ImageHere>, image slots), embedded as training embeds it (`embed_sequence`)."""
    if prompt.count(IMAGE_PLACEHOLDER) != 1:
        raise ValueError(f"the prompt must hold exactly one {IMAGE_PLACEHOLDER}")
    model = bundle.model
    text = prompt_builder(bundle).prompt(1, prompt).to(model.llm.get_input_embeddings().weight.device)
    return model.embed_sequence(image_embeds_1QD, text)


@torch.no_grad()
def generate(bundle, image_embeds_1QD: torch.Tensor, prompt: str, stops: List[str], max_new_tokens: int = 300,
             temperature: float = 1.0, num_beams: int = 1, top_p: float = 0.9, repetition_penalty: float = 1.05,
             max_length: int = 2000, streamer=None) -> str:
    """One answer. temperature 0 = greedy (deterministic); > 0 samples as the original demo does.

    `streamer`: a transformers streamer (`put(token_ids)` / `end()`, e.g. `TextIteratorStreamer`)
    that receives the tokens as they are generated (greedy and sampling only: transformers refuses a
    streamer with beam search); the returned answer is cut at the stop strings."""
    model, tokenizer = bundle.model, bundle.tokenizer
    embeds = context_embeds(bundle, prompt, image_embeds_1QD)
    embeds = embeds[:, max(0, embeds.shape[1] + max_new_tokens - max_length):]  # the demo's context window
    sample = temperature > 0
    kwargs = dict(do_sample=sample, num_beams=num_beams, max_new_tokens=max_new_tokens, min_length=1,
                  repetition_penalty=repetition_penalty, length_penalty=1.0)
    if sample:
        kwargs.update(temperature=float(temperature), top_p=top_p)
    with warnings.catch_warnings():
        # The demo's repetition penalty applies to generated tokens only with inputs_embeds; expected.
        warnings.filterwarnings("ignore", message=".*repetition_penalty.*")
        out = model.llm.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            stopping_criteria=StoppingCriteriaList([StopOnStrings(tokenizer, stops, 0)]),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, streamer=streamer, **kwargs)
    text = cut_at_stops(tokenizer.decode(out[0], skip_special_tokens=False), list(stops) + ["</s>", "###"])
    return text.split("Assistant:")[-1].strip()


class Chat:
    """A multi-turn conversation about one image, in the original demo's template."""

    def __init__(self, bundle, style: Optional[str] = None):
        self.bundle = bundle
        self.conv: Conversation = new_conversation(style or bundle.conversation)
        self.image_embeds = None

    def upload_image(self, path: str) -> None:
        image = load_image(path, self.bundle.cfg.model.vit.img_size)
        model = self.bundle.model
        dtype = next(model.visual_encoder.parameters()).dtype
        with torch.no_grad():
            self.image_embeds = model.encode_image(image.to(self.bundle.device, dtype))
        self.conv.add_image()

    def ask(self, question: str, **generate_kwargs) -> str:
        if self.image_embeds is None:
            raise RuntimeError("upload an image first")
        self.conv.ask(question)
        answer = generate(self.bundle, self.image_embeds, self.conv.prompt_for_answer(),
                          list(self.conv.stop_strings), **generate_kwargs)
        self.conv.add_answer(answer)
        return answer
