"""Generated ids to text as they come, and stop sequences matched on that text.

Invariant: the pieces `TextStream` hands out, joined, equal its final `text`; a piece is never taken back, so
text that could still become a stop sequence (a suffix that is a prefix of one) is held until it cannot; a
matched stop sequence and everything after it are cut. Each token is decoded in the context of the tokens
before it (vLLM's incremental detokenization), so tokenizers that drop a leading space at the start of a
decode, or tokens that end inside a UTF-8 character (U+FFFD until completed), come out right.
"""
from __future__ import annotations


class Detokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], context: int = 4):
        self.tok = tokenizer
        self.ids = list(prompt_ids[-context:])
        self.prefix, self.read = 0, len(self.ids)
        self.prefix_text = tokenizer.decode(self.ids) if self.ids else ""

    def push(self, token: int) -> str:
        """The text `token` adds ('' while it ends inside a character)."""
        self.ids.append(token)
        new = self.tok.decode(self.ids[self.prefix:])
        if len(new) > len(self.prefix_text) and not new.endswith("\ufffd"):
            delta = new[len(self.prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            self.prefix_text = self.tok.decode(self.ids[self.prefix:self.read])
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character comes out as U+FFFD)."""
        new = self.tok.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        delta = new[len(self.prefix_text):] if len(new) > len(self.prefix_text) else ""
        self.prefix_text = ""
        return delta


class TextStream:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.detok = Detokenizer(tokenizer, prompt_ids)
        self.stop = tuple(stop)
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text, self.sent, self.done = "", 0, False

    def push(self, token: int, check: bool = True) -> bool:
        """Add a token's text; True when a stop sequence has now appeared in the new text (the text is cut
        before it). `check=False` adds the text without looking for stop sequences (before min_tokens)."""
        before = len(self.text)
        self.text += self.detok.push(token)
        return self._cut(before) if check else False

    def finish(self) -> None:
        """No more tokens: release held text (a stop sequence may still complete within it)."""
        if not self.done:
            before = len(self.text)
            self.text += self.detok.flush()
            self._cut(before)
            self.done = True

    def stopped(self) -> None:
        self.done = True

    def _cut(self, before: int) -> bool:
        if not self.stop or len(self.text) == before:
            return False
        lo = max(0, before - self.longest + 1)
        hits = [i for i in (self.text.find(s, lo) for s in self.stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[:min(hits)]
        self.done = True
        return True

    def take(self) -> str:
        """The text not yet handed out that no stop sequence can still claim."""
        end = len(self.text)
        if not self.done and self.stop:
            end -= self._held()
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def _held(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop sequence."""
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
