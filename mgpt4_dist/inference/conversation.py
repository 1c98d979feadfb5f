"""The demo's conversation template (the original `CONV_VISION_Vicuna0` / `CONV_VISION_LLama2`).

Vicuna v0:  `{system}###Human: <Img><ImageHere></Img> {question}###Assistant: {answer}###Human: ...`
Llama-2:    `{system}<s>[INST] <Img><ImageHere></Img> {question} [/INST] {answer}<s>[INST] ...`
The first question joins the image message with a space, as the original `Chat.ask` does.
Also owns cutting generated text at the stop strings (`cut_at_stops`), for chat, demo and evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from mgpt4_dist.errors import InvalidInputError

SYSTEM = ("Give the following image: <Img>ImageContent</Img>. "
          "You will be able to see the image once I provide it to you. Please answer my questions.")
IMAGE_MESSAGE = "<Img><ImageHere></Img>"

STYLES = {
    # roles, separator after each message, stop strings
    "vicuna0": (("Human: ", "Assistant: "), "###", ("###",)),
    "llama2": (("<s>[INST] ", " [/INST] "), "", ("</s>",)),
}


@dataclass
class Conversation:
    style: str = "vicuna0"
    system: str = SYSTEM
    messages: List[Tuple[str, Optional[str]]] = field(default_factory=list)

    @property
    def roles(self) -> Tuple[str, str]:
        return STYLES[self.style][0]

    @property
    def sep(self) -> str:
        return STYLES[self.style][1]

    @property
    def stop_strings(self) -> Tuple[str, ...]:
        return STYLES[self.style][2]

    def add_image(self) -> None:
        self.messages.append((self.roles[0], IMAGE_MESSAGE))

    def ask(self, text: str) -> None:
        last = self.messages[-1] if self.messages else None
        if last and last[0] == self.roles[0] and last[1] and last[1].endswith("</Img>"):
            self.messages[-1] = (last[0], f"{last[1]} {text}")
        else:
            self.messages.append((self.roles[0], text))

    def prompt_for_answer(self) -> str:
        """The prompt text with an open assistant turn (the original `get_prompt` after
        `append_message(roles[1], None)`)."""
        out = self.system + self.sep
        for role, message in self.messages + [(self.roles[1], None)]:
            out += role + message + self.sep if message else role
        return out

    def add_answer(self, text: str) -> None:
        self.messages.append((self.roles[1], text))


def new_conversation(style: str) -> Conversation:
    if style not in STYLES:
        raise InvalidInputError(f"unknown conversation style {style!r}; one of {', '.join(STYLES)}")
    return Conversation(style=style)


def cut_at_stops(text: str, stops: Sequence[str], hold_partial_stop: bool = False) -> str:
    """`text` up to the first of `stops` (empty ones ignored), without `<s>`, stripped.

    `hold_partial_stop` also drops a tail that may be the start of a stop (`#`, `##`): a streamed
    answer that is still growing then never shows part of the separator.
    """
    stops = [s for s in stops if s]
    for stop in stops:
        text = text.split(stop)[0]
    if hold_partial_stop:
        for stop in stops:
            for n in range(len(stop) - 1, 0, -1):
                if text.endswith(stop[:n]):
                    text = text[:-n]
                    break
    return text.replace("<s>", "").strip()
