"""The MiniGPT-4 token sequence: where BOS, prompt text, image embeddings and answers go.

One layout for training, eval-loss, evaluation and chat (`MiniGPTBase.forward` of the original);
`SequenceBuilder.prompt` is the same layout without the answer, for generation:

    [BOS][condition][answer + end_sym][padding]

- condition: the image embeddings alone (stage 1), or an instruction already formatted with the
  prompt template and split on `<ImageHere>`, each text piece tokenized **separately** without
  special tokens, image embeddings between the pieces; clipped to `max_context_len`.
- answer: `answer + end_sym` tokenized as one string without special tokens, truncated to
  `max_txt_len` (end_sym is lost when truncated), right-padded to the batch's longest answer.
- labels: -100 everywhere except answer tokens; an answer token equal to the pad id is masked
  too, as the original masks by id.
- each sample's answer starts right after its own condition; all padding moves to the end, so
  causal attention alone keeps padding away from every scored position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from mgpt4_dist.errors import InvalidInputError

IMAGE_PLACEHOLDER = "<ImageHere>"
IGNORE_INDEX = -100


@dataclass
class TextBatch:
    """Token layout of one batch; image slots hold the pad id and are filled with image embeddings."""

    input_ids_BT: torch.Tensor
    image_slots_BT: torch.Tensor  # bool, True where an image embedding goes
    labels_BT: torch.Tensor  # IGNORE_INDEX except scored answer tokens
    attention_mask_BT: torch.Tensor  # 1 on real positions (reported; causal masking suffices)
    # No position before this one predicts a scored token (known on the host: no device sync).
    score_from: int = 0
    # Per row, on the host: real positions (BOS, condition, answer; padding follows them), and the
    # first position that predicts an answer token (the row's length when it has no answer). Empty
    # when unknown: the padding-free forward then falls back to the padded one.
    row_lengths: Tuple[int, ...] = ()
    row_score_from: Tuple[int, ...] = ()

    @property
    def num_scored_tokens(self) -> int:
        return int((self.labels_BT != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> "TextBatch":
        return TextBatch(*(t.to(device, non_blocking=True) for t in
                           (self.input_ids_BT, self.image_slots_BT, self.labels_BT, self.attention_mask_BT)),
                         score_from=self.score_from, row_lengths=self.row_lengths,
                         row_score_from=self.row_score_from)


class SequenceBuilder:
    """Turns (answers, instruction) into a `TextBatch` with a LLaMA tokenizer."""

    def __init__(self, tokenizer, num_image_tokens: int, max_txt_len: int, end_sym: str,
                 max_context_len: int = 3800):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.max_txt_len = max_txt_len
        self.end_sym = end_sym
        self.max_context_len = max_context_len
        self.bos_id = tokenizer.bos_token_id
        self.pad_id = tokenizer.pad_token_id
        if self.bos_id is None or self.pad_id is None:
            raise ValueError("the tokenizer needs a BOS token and the '$$' pad token set")

    def _ids(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def condition(self, instruction: Optional[str]) -> List[Optional[int]]:
        """Condition tokens; None marks an image-embedding slot."""
        image = [None] * self.num_image_tokens
        if not instruction:
            return image
        pieces = instruction.split(IMAGE_PLACEHOLDER)
        if len(pieces) != 2:
            raise InvalidInputError(f"instruction must hold exactly one {IMAGE_PLACEHOLDER}: {instruction!r}")
        return self._ids(pieces[0]) + image + self._ids(pieces[1])

    def answers(self, answers: Sequence[str]) -> List[List[int]]:
        enc = self.tokenizer([a + self.end_sym for a in answers], add_special_tokens=False,
                             truncation=True, max_length=self.max_txt_len)
        return [list(ids) for ids in enc["input_ids"]]

    def conditions(self, batch: int, instruction: Union[None, str, Sequence[Optional[str]]]
                   ) -> List[List[Optional[int]]]:
        """One condition per row: the same instruction for all, or one each; clipped to max_context_len."""
        if instruction is None or isinstance(instruction, str):
            conditions = [self.condition(instruction)] * batch
        else:
            conditions = [self.condition(i) for i in instruction]
        return [c[: self.max_context_len] for c in conditions]

    def __call__(self, answers: Sequence[str],
                 instruction: Union[None, str, Sequence[Optional[str]]] = None) -> TextBatch:
        """The training layout: [BOS][condition][answer + end_sym][padding], answers scored."""
        return self._layout(self.conditions(len(answers), instruction), self.answers(answers))

    def prompt(self, batch: int, instruction: Optional[str] = None) -> TextBatch:
        """The generation layout: [BOS][condition] for `batch` rows, nothing scored; the answer is
        what the model generates after it. One instruction for every row, so no row is padded
        (generation continues right after the last position of each row)."""
        return self._layout(self.conditions(batch, instruction), [[] for _ in range(batch)])

    def _layout(self, conditions: List[List[Optional[int]]], answer_ids: List[List[int]]) -> TextBatch:
        batch = len(conditions)
        cond_len = max(len(c) for c in conditions)
        answer_len = max(len(a) for a in answer_ids)
        seq_len = 1 + cond_len + answer_len

        input_ids = torch.full((batch, seq_len), self.pad_id, dtype=torch.long)
        image_slots = torch.zeros((batch, seq_len), dtype=torch.bool)
        labels = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((batch, seq_len), dtype=torch.long)
        for row, (cond, ans) in enumerate(zip(conditions, answer_ids)):
            input_ids[row, 0] = self.bos_id
            for pos, tok in enumerate(cond, start=1):
                if tok is None:
                    image_slots[row, pos] = True
                else:
                    input_ids[row, pos] = tok
            start = 1 + len(cond)
            ans_t = torch.tensor(ans, dtype=torch.long)
            input_ids[row, start:start + len(ans)] = ans_t
            labels[row, start:start + len(ans)] = ans_t.masked_fill(ans_t == self.pad_id, IGNORE_INDEX)
            attention[row, :start + len(ans)] = 1
        # Position 1 + len(cond) holds a row's first answer token, predicted from the position before.
        answered = [len(cond) for cond, ans in zip(conditions, answer_ids) if ans]
        lengths = tuple(1 + len(cond) + len(ans) for cond, ans in zip(conditions, answer_ids))
        row_score_from = tuple(len(cond) if ans else length
                               for cond, ans, length in zip(conditions, answer_ids, lengths))
        return TextBatch(input_ids, image_slots, labels, attention, score_from=min(answered, default=0),
                         row_lengths=lengths, row_score_from=row_score_from)
