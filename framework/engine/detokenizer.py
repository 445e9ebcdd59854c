"""Incremental detokenization and stop strings for one sequence.

Each step decodes only a short window of recent tokens. Text is released only when it does not end in
U+FFFD, the replacement character a byte-level decoder produces for an incomplete UTF-8 sequence, so
a multi-byte character split across tokens is never emitted half-way. When stop strings are set and
not included in the output, the last ``len(longest stop) - 1`` characters are held back until it is
clear they do not start a stop string, so streamed text never has to be taken back. As in vLLM,
stop strings count only from the token after the first ``min_tokens``: text that ends within them is
never searched again.
"""

from __future__ import annotations

from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.models.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"
_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output token, for correct spacing


class IncrementalDetokenizer:
    def __init__(
        self, tokenizer: Tokenizer | None, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.prefix_offset = max(len(prompt_token_ids) - _CONTEXT_TOKENS, 0)
        self.read_offset = len(prompt_token_ids)
        self.text = ""  # output text decoded so far, cut at a stop string once one is found
        self.num_emitted = 0  # characters of text already handed out
        self.max_stop_len = max((len(s) for s in params.stop), default=0)

    @property
    def emitted_text(self) -> str:
        return self.text[: self.num_emitted]

    def update(self, new_token_ids: list[int], finished: bool) -> tuple[str, bool]:
        """Add tokens; return the text released now and whether a stop string was found."""
        self.token_ids.extend(new_token_ids)
        if self.tokenizer is None:
            return "", False
        start = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += self._decode_new(flush=finished)
        num_output_tokens = len(self.token_ids) - self.num_prompt_tokens
        stopped = num_output_tokens > self.params.min_tokens and self._cut_at_stop_string(start)
        return self._release(finished or stopped), stopped

    def _decode_new(self, flush: bool) -> str:
        skip = self.params.skip_special_tokens
        prefix = self.tokenizer.decode(self.token_ids[self.prefix_offset : self.read_offset], skip)
        full = self.tokenizer.decode(self.token_ids[self.prefix_offset :], skip)
        if len(full) <= len(prefix) or (full.endswith(_INCOMPLETE) and not flush):
            return ""  # nothing complete yet; decode these tokens again next time
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        return full[len(prefix) :]

    def _cut_at_stop_string(self, start: int) -> bool:
        found = [(i, s) for s in self.params.stop if (i := self.text.find(s, start)) != -1]
        if not found:
            return False
        index, stop = min(found)
        keep = index + len(stop) if self.params.include_stop_str_in_output else index
        self.text = self.text[:keep]
        return True

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if not final and not self.params.include_stop_str_in_output and self.max_stop_len:
            end -= self.max_stop_len - 1
        if end <= self.num_emitted:
            return ""
        delta = self.text[self.num_emitted : end]
        self.num_emitted = end
        return delta
