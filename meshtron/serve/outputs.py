"""A request's sequences as OpenAI choices: the text (with `echo`, the prompt first), completion logprobs in the
legacy shape (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), chat logprobs (`content`: `token`,
`logprob`, `bytes`, `top_logprobs`), and `best_of`'s pick of the likeliest `n`.

Invariant: built on rank 0's HTTP side only, from what every rank agreed on, so nothing here can change what is
decoded. A token's string is its text in the context of the tokens before it (joined in order they give the text;
a token that ends inside a UTF-8 character is "" and the next carries the character); an alternative's string is
that token decoded alone. `top_logprobs` (completions) holds the k most likely tokens and the chosen one, as
OpenAI's does ("up to logprobs + 1 elements"); logprobs are the raw model's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from meshtron.inference import Event, PromptLogprobs
from meshtron.inference.text import Detokenizer


@dataclass
class SeqOut:
    """Everything the engine said about one sequence."""
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt: PromptLogprobs | None = None
    finish_reason: str | None = None
    error: str | None = None

    def add(self, ev: Event) -> None:
        self.text.append(ev.text)
        if ev.token is not None:
            self.tokens.append(ev.token)
            if ev.logprob is not None:
                self.logprobs.append(ev.logprob)
                self.tops.append(ev.top or [])
        self.prompt = ev.prompt or self.prompt
        self.error = ev.error or self.error
        self.finish_reason = ev.finish_reason

    def mean_logprob(self) -> float:
        return sum(self.logprobs) / len(self.logprobs) if self.logprobs else 0.0


def best(seqs: list[SeqOut], n: int) -> list[int]:
    """Indices of the n sequences with the highest mean logprob per token (OpenAI's best_of), best first."""
    return sorted(range(len(seqs)), key=lambda i: -seqs[i].mean_logprob())[:n]


class TokenText:
    """Token strings of one sequence, in context: `push(id)` -> its string; `alone(id)` for alternatives."""

    def __init__(self, tokenizer, context: list[int]):
        self.tok, self.detok, self.offset = tokenizer, Detokenizer(tokenizer, context), 0

    def pieces(self, ids: list[int], final: bool) -> list[str]:
        out = [self.detok.push(t) for t in ids]
        if final and out:
            out[-1] += self.detok.flush()
        return out

    def alone(self, tid: int) -> str:
        return self.tok.decode([tid])


def completion_logprobs(tt: TokenText, ids: list[int], lps: list[float | None], tops: list, base: int,
                        final: bool) -> dict:
    """The legacy shape for tokens `ids` (their logprobs and alternatives); `base`: text offset of the first."""
    pieces = tt.pieces(ids, final)
    offsets, at = [], base
    for p in pieces:
        offsets.append(at)
        at += len(p)
    top_dicts = []
    for tid, piece, lp, top in zip(ids, pieces, lps, tops):
        if top is None:
            top_dicts.append(None)
            continue
        d = {tt.alone(t): v for t, v in top}
        d.setdefault(tt.alone(tid), lp)                       # the chosen token, whatever its rank
        top_dicts.append(d)
    return {"tokens": pieces, "token_logprobs": list(lps), "top_logprobs": top_dicts, "text_offset": offsets}


def merge(a: dict | None, b: dict) -> dict:
    """Legacy logprobs of a prompt followed by those of its completion."""
    if a is None:
        return b
    return {k: a[k] + b[k] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def chat_logprobs(tt: TokenText, ids: list[int], lps: list[float], tops: list, final: bool) -> dict:
    content = []
    for piece, lp, top in zip(tt.pieces(ids, final), lps, tops):
        alts = [{"token": (s := tt.alone(t)), "logprob": v, "bytes": list(s.encode("utf-8", "replace"))}
                for t, v in top]
        content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8", "replace")),
                        "top_logprobs": alts})
    return {"content": content, "refusal": None}


def prompt_logprobs(tokenizer, ids: list[int], scored: PromptLogprobs) -> tuple[dict, str]:
    """The echoed prompt's legacy logprobs (the first token's null) and its text as the token strings join."""
    tt = TokenText(tokenizer, [])
    out = completion_logprobs(tt, ids, scored.logprobs, scored.top, 0, final=True)
    return out, "".join(out["tokens"])
