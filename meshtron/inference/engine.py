"""Tensor-parallel decoding with a KV cache, in lockstep on every rank of the mesh, with continuous batching.

Every rank holds an `Engine` and calls `add` and `step` in the same order with the same requests: sequences are
assigned to the replicas of the `batch` axis (the least loaded first), each replica prefills and decodes its own
rows with its model-parallel ranks (the parallel layers communicate). The ranks of a replica pick the same
token by construction: they sample the same gathered logits with identically seeded generators, or take the
argmax of the same split-vocabulary scores (`logprobs`: a few numbers per row and rank, never the logits); logprobs
come from those scores too, and a prompt's from the prefill pass. Requests of one `add` that share a `share` key
(the `n` samples of one prompt) are prefilled once and their cache rows copied. `replicas` hands every rank
every replica's choices. So all ranks agree on every token and stop decision, and rank 0 can stream all of them.
Invariants: a sequence's tokens equal those of generating it alone (left padding is masked, positions are per
sequence, each has its own generator); what only rank 0 does (the text of sequences without stop strings) never
changes what any rank decodes: its failures are reported on the sequence's events, nothing else.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from meshtron.comm.ops import gather_from_parallel
from meshtron.inference import penalties
from meshtron.inference.kv_cache import KVCache
from meshtron.inference.logprobs import score, score_chunked
from meshtron.inference.replicas import Choice, PromptLogprobs, Replicas
from meshtron.inference.sampling import SamplingParams, make_generator, sample
from meshtron.inference.text import TextStream
from meshtron.mesh import MeshAxis


@dataclass
class Request:
    id: object
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    share: object = None        # requests of one `add` with the same key (and prompt) share one prefill


@dataclass
class Event:
    """One new token of one sequence: its text piece (streamable), and why it ended, if it did."""
    id: object
    token: int | None                      # None: no token (max_new_tokens 0: the prompt was only scored)
    text: str
    finish_reason: str | None = None       # None, 'stop' (EOS or a stop sequence) or 'length'
    logprob: float | None = None           # the token's logprob under the model, if params.logprobs is set
    top: list[tuple[int, float]] | None = None   # the params.logprobs most likely (id, logprob)
    prompt: PromptLogprobs | None = None   # on the first event, if params.prompt_logprobs is set
    error: str | None = None               # this rank could not build the text (tokens are unaffected)


@dataclass
class Completion:
    id: object
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    error: str | None = None


@dataclass
class _Seq:
    req: Request
    replica: int
    budget: int                                 # tokens it may generate (max_new_tokens within max_seq_len)
    tokens: list[int] = field(default_factory=list)
    stream: TextStream | None = None            # stop strings (every rank) or text (rank 0)
    generator: torch.Generator | None = None
    text_error: str | None = None


class Engine:
    """`add(requests)` prefills new sequences, `step()` decodes one token for all; both return Events.

    `tokenizer` turns tokens into text (needed for stop sequences); `text=False` skips building text for
    sequences without stop sequences (ranks that stream nothing). `eos_ids` end a sequence ('stop')."""

    def __init__(self, model, tokenizer=None, eos_ids: Iterable[int] = (), text: bool = True):
        self.model, self.tok, self.text = model, tokenizer, text and tokenizer is not None
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.max_seq_len = model.config.max_seq_len
        self.device = model.mesh.device
        dp = model.layout.axis("batch")
        self.replicas, self.replica = dp.size, dp.coord
        self.sync = Replicas(model.mesh, model.layout.axis_name("batch"), dp.coord, self.device)
        self.seqs: dict[object, _Seq] = {}
        self.rows: list[list[object]] = [[] for _ in range(self.replicas)]   # ids per replica, cache row order
        self.cache: KVCache | None = None
        self.prefilled_tokens = 0                   # prompt tokens run through the model (shared prefills once)

    # ---- the public surface ----------------------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self.seqs)

    def check(self, req: Request) -> None:
        """Raise ValueError if the request cannot run (empty or too long prompt, bad parameters)."""
        req.params.check()
        n = len(req.prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty: give at least one token")
        room = 0 if req.params.max_new_tokens == 0 else 1
        if n > self.max_seq_len - room:
            raise ValueError(f"the prompt has {n} tokens; this model's context is {self.max_seq_len} tokens, "
                             f"so prompts must be at most {self.max_seq_len - room}"
                             + (" to leave room for one new token" if room else ""))
        if req.params.stop and self.tok is None:
            raise ValueError("stop sequences need a tokenizer")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if req.params.logit_bias and any(not 0 <= t < vocab for t in req.params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if req.id in self.seqs:
            raise ValueError(f"request id {req.id!r} is already running")

    @torch.inference_mode()
    def add(self, requests: list[Request]) -> list[Event]:
        """Admit requests (every rank, same order): prefill them, and return each one's first token."""
        groups = self._groups(requests)
        new_rows: list[list[object]] = [[] for _ in range(self.replicas)]
        for members in groups:                   # a prefill group stays on one replica
            replica = min(range(self.replicas), key=lambda r: len(self.rows[r]) + len(new_rows[r]))
            for req in members:
                budget = min(req.params.max_new_tokens, self.max_seq_len - len(req.prompt_ids))
                seq = _Seq(req, replica, budget)
                if req.params.stop:                      # every rank: the stop decision
                    seq.stream = TextStream(self.tok, req.prompt_ids, req.params.stop)
                elif self.text:                          # rank 0's text only
                    try:
                        seq.stream = TextStream(self.tok, req.prompt_ids)
                    except Exception as e:  # noqa: BLE001 - rank-0-only work: reported, nothing else changes
                        seq.text_error = f"could not decode the text: {type(e).__name__}: {e}"
                if replica == self.replica:
                    seq.generator = make_generator(req.params)
                self.seqs[req.id] = seq
                new_rows[replica].append(req.id)
        mine = [self.seqs[i] for i in new_rows[self.replica]]
        choices, prompts = self._prefill(mine) if mine else ([], {})
        for r in range(self.replicas):
            self.rows[r].extend(new_rows[r])
        asked = {i: len(self.seqs[i].req.prompt_ids) for ids in new_rows for i in ids
                 if self.seqs[i].req.params.prompt_logprobs is not None}
        k = max((self.seqs[i].req.params.prompt_logprobs for i in asked), default=0)
        prompts = self.sync.prompts(new_rows, asked, prompts, k)
        return self._apply(new_rows, choices, prompts)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One new token for every running sequence."""
        mine = [self.seqs[i] for i in self.rows[self.replica]]
        choices = self._decode(mine) if mine else []
        return self._apply([list(r) for r in self.rows], choices, {})

    def abort(self, ids: Iterable[object]) -> None:
        """Drop sequences (every rank, same ids) without another token."""
        gone = {i for i in ids if i in self.seqs}
        if gone:
            self._drop(gone)

    def reset(self) -> None:
        """Forget every sequence."""
        self.seqs.clear()
        self.rows = [[] for _ in range(self.replicas)]
        self.cache = None

    def stream(self, requests: list[Request], max_batch: int = 64) -> Iterator[Event]:
        """Run requests to completion, yielding every token's Event as it comes; at most `max_batch` sequences
        per replica at once (waiting ones join as others finish)."""
        self._groups(requests)
        pending = list(requests)
        while pending or self.seqs:
            free = max_batch * self.replicas - self.running
            batch, pending = pending[:free], pending[free:]
            yield from self.add(batch) if batch else ()
            if self.seqs:
                yield from self.step()

    def generate(self, requests: list[Request], max_batch: int = 64,
                 on_event: Callable[[Event], None] | None = None) -> list[Completion]:
        """`stream` to the end (`on_event` sees every Event); Completions in request order."""
        out = {r.id: Completion(r.id, list(r.prompt_ids), [], "" if self.text else None, "",
                                [] if r.params.logprobs is not None else None,
                                [] if r.params.logprobs is not None else None) for r in requests}
        for ev in self.stream(requests, max_batch):
            c = out[ev.id]
            if ev.token is not None:
                c.token_ids.append(ev.token)
                if c.logprobs is not None:
                    c.logprobs.append(ev.logprob)
                    c.top_logprobs.append(ev.top)
            if c.text is not None:
                c.text += ev.text
            c.prompt_logprobs = ev.prompt or c.prompt_logprobs
            c.error = ev.error or c.error
            if ev.finish_reason:
                c.finish_reason = ev.finish_reason
            if on_event is not None:
                on_event(ev)
        return [out[r.id] for r in requests]

    def _groups(self, requests: list[Request]) -> list[list[Request]]:
        """Check the requests; group those that share a prefill (in order of first appearance)."""
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be distinct")
        groups: dict[object, list[Request]] = {}
        for req in requests:
            self.check(req)
            key = ("id", req.id) if req.share is None else ("share", req.share)
            members = groups.setdefault(key, [])
            if members and list(members[0].prompt_ids) != list(req.prompt_ids):
                raise ValueError(f"requests sharing a prefill ({req.share!r}) must have the same prompt")
            members.append(req)
        return list(groups.values())

    # ---- the model ---------------------------------------------------------------------------------------

    def _prefill(self, seqs: list[_Seq]) -> tuple[list[Choice | None], dict[object, PromptLogprobs]]:
        """Left-padded prompts (one row per prefill group) through the model into a new cache, copied to one row
        per sequence and merged with the running rows' cache; the prompt logprobs asked for, from the same pass."""
        keys = [("id", s.req.id) if s.req.share is None else ("share", s.req.share) for s in seqs]
        group: dict[object, int] = {}
        firsts = []
        for s, key in zip(seqs, keys):
            if key not in group:
                group[key] = len(firsts)
                firsts.append(s)
        P = max(len(s.req.prompt_ids) for s in firsts)
        pad = [[0] * (P - len(s.req.prompt_ids)) + list(s.req.prompt_ids) for s in firsts]
        mask = [[False] * (P - len(s.req.prompt_ids)) + [True] * len(s.req.prompt_ids) for s in firsts]
        idx = torch.tensor(pad, dtype=torch.long, device=self.device)
        valid = torch.tensor(mask, dtype=torch.bool, device=self.device)
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)           # per sequence, from 0
        cache = KVCache.like(self.model, len(firsts), P)
        cache.begin(positions, valid)
        h = self.model.hidden(idx, cache)                                # (U, P, d)
        cache.advance()
        self.prefilled_tokens += sum(len(s.req.prompt_ids) for s in firsts)
        prompts = self._prompt_logprobs(h, firsts, [group[k] for k in keys], seqs)
        row_of = [group[k] for k in keys]
        choosing = [b for b, s in enumerate(seqs) if s.budget > 0]
        choices: list[Choice | None] = [Choice(None)] * len(seqs)
        if choosing:
            last = h[:, -1].index_select(0, torch.tensor([row_of[b] for b in choosing], device=self.device))
            for b, ch in zip(choosing, self._choose(last, [seqs[b] for b in choosing])):
                choices[b] = ch
        if row_of != list(range(len(firsts))):
            cache.select(row_of)                                         # n samples: the prompt's rows copied
        # columns still to come: a sequence with n tokens feeds budget - n more (new ones have their first)
        extra = max(s.budget - max(len(s.tokens), 1) for s in self.seqs.values() if s.replica == self.replica)
        self.cache = KVCache.concat(self.cache, cache, max(extra, 1))
        return choices, prompts

    def _prompt_logprobs(self, h: torch.Tensor, firsts: list[_Seq], row_of: list[int],
                         seqs: list[_Seq]) -> dict[object, PromptLogprobs]:
        """Score each prompt's tokens 1.. from the prefill's hidden states (one pass, vocab split, once per
        prefill group), for the sequences that asked."""
        want: dict[int, int] = {}
        for s, u in zip(seqs, row_of):
            if s.req.params.prompt_logprobs is not None:
                want[u] = max(want.get(u, 0), s.req.params.prompt_logprobs)
        if not want:
            return {}
        P, k = h.shape[1], max(want.values())
        rows = sorted(want)
        hs = torch.cat([h[u, P - len(firsts[u].req.prompt_ids):P - 1] for u in rows])   # (N, d)
        targets = torch.tensor([t for u in rows for t in firsts[u].req.prompt_ids[1:]], dtype=torch.long,
                               device=self.device)
        sc = score_chunked(hs, self.model.head, targets, k)
        lps, ids, vals = sc.logprob(sc.target).tolist(), sc.top_ids.tolist(), (sc.top_vals - sc.logz[:, None]).tolist()
        per_row, lo = {}, 0
        for u in rows:
            n = len(firsts[u].req.prompt_ids) - 1
            per_row[u] = (lps[lo:lo + n], [list(zip(a, b)) for a, b in zip(ids[lo:lo + n], vals[lo:lo + n])])
            lo += n
        out = {}
        for s, u in zip(seqs, row_of):
            kp = s.req.params.prompt_logprobs
            if kp is not None:
                lp, top = per_row[u]
                out[s.req.id] = PromptLogprobs([None] + lp, [None] + [t[:kp] for t in top])
        return out

    def _decode(self, seqs: list[_Seq]) -> list[Choice]:
        idx = torch.tensor([[s.tokens[-1]] for s in seqs], dtype=torch.long, device=self.device)
        positions = torch.tensor([[len(s.req.prompt_ids) + len(s.tokens) - 1] for s in seqs], device=self.device)
        self.cache.begin(positions)
        h = self.model.hidden(idx, self.cache)                           # (B, 1, d)
        self.cache.advance()
        return self._choose(h[:, 0], seqs)

    def _choose(self, h: torch.Tensor, seqs: list[_Seq]) -> list[Choice]:
        """The next token of each row of h (B, d), with its logprob and alternatives if asked. An all-greedy batch
        over a split vocabulary takes the argmax of split scores (ties go to the lowest id, as argmax); otherwise
        the logits are gathered and sampled. Penalties and bias change the choice, not the reported logprobs."""
        params = [s.req.params for s in seqs]
        head = self.model.head
        raw = head.local_logits(h[:, None])[:, 0]                        # (B, V_local)
        scored = any(p.logprobs is not None for p in params)
        k = max((p.logprobs or 0 for p in params), default=0)
        history = ([s.req.prompt_ids for s in seqs], [s.tokens for s in seqs])
        if head.axis.size > 1 and all(p.greedy for p in params):
            chosen = penalties.process(raw, head.vocab_start, params, *history, self.eos_ids)
            sc = score(raw, head.vocab_start, head.axis, logz=scored, choose=chosen, k=k)
            tokens, at = sc.pick, sc.pick_raw
        else:
            full = _gather_vocab(raw, head)
            chosen = penalties.process(full, 0, params, *history, self.eos_ids)
            tokens = torch.tensor(sample(chosen, params, [s.generator for s in seqs]), device=self.device)
            if scored:
                sc = score(full, 0, MeshAxis.trivial(), logz=True, targets=tokens, k=k)
                at = sc.target
        if not scored:
            return [Choice(t) for t in tokens.tolist()]
        lps, ids, vals = sc.logprob(at).tolist(), sc.top_ids.tolist() if k else None, None
        if k:
            vals = (sc.top_vals - sc.logz[:, None]).tolist()
        out = []
        for b, (t, p) in enumerate(zip(tokens.tolist(), params)):
            if p.logprobs is None:
                out.append(Choice(t))
            else:
                out.append(Choice(t, lps[b], list(zip(ids[b], vals[b]))[:p.logprobs] if k else []))
        return out

    # ---- ending sequences ----------------------------------------------------------------------------------

    def _apply(self, rows: list[list[object]], local: list[Choice | None],
               prompts: dict[object, PromptLogprobs]) -> list[Event]:
        scored = [self.seqs[i].req.params.logprobs for ids in rows for i in ids]
        k = max((x or 0 for x in scored), default=0)
        chosen = self.sync.choices(rows, local, k, any(x is not None for x in scored))
        events, finished = [], set()
        for ids in rows:
            for i in ids:
                seq, ch = self.seqs[i], chosen[i]
                reason, push = None, ch.token is not None
                if ch.token is None:
                    reason = "length"
                else:
                    seq.tokens.append(ch.token)
                    if ch.token in self.eos_ids and not seq.req.params.ignore_eos:
                        reason, push = "stop", False                     # the end-of-sequence token adds no text
                    elif seq.req.params.stop and seq.stream.push(ch.token, len(seq.tokens) >= seq.req.params.min_tokens):
                        reason, push = "stop", False                     # every rank: stop strings decide
                    elif seq.req.params.stop:
                        push = False                                     # pushed already
                    if reason is None and len(seq.tokens) >= seq.budget:
                        reason = "length"
                piece = self._text(seq, ch.token if push else None, reason)
                events.append(Event(i, ch.token, piece, reason, ch.logprob, ch.top, prompts.get(i), seq.text_error))
                if reason:
                    finished.add(i)
        if finished:
            self._drop(finished)
        return events

    def _text(self, seq: _Seq, token: int | None, reason: str | None) -> str:
        """The text piece to stream (`token`: one to add to the text, if any). For a sequence without stop strings
        only rank 0 builds the text, so a failure here is caught, reported on the events, and changes nothing
        else; with stop strings every rank builds it alike, as part of the stop decision."""
        if seq.stream is None:
            return ""
        if seq.req.params.stop:
            if reason:
                seq.stream.finish()
            return seq.stream.take()
        try:
            if token is not None:
                seq.stream.push(token)
            if reason:
                seq.stream.finish()
            return seq.stream.take()
        except Exception as e:  # noqa: BLE001 - rank-0-only work: report it, never let it reach the engine
            seq.stream, seq.text_error = None, f"could not decode the text: {type(e).__name__}: {e}"
            return ""

    def _drop(self, ids: set) -> None:
        mine = self.rows[self.replica]
        keep = [b for b, i in enumerate(mine) if i not in ids]
        if self.cache is not None and len(keep) != len(mine):
            self.cache.select(keep)
            if not keep:
                self.cache = None
        for r in range(self.replicas):
            self.rows[r] = [i for i in self.rows[r] if i not in ids]
        for i in ids:
            del self.seqs[i]


def _gather_vocab(local: torch.Tensor, head) -> torch.Tensor:
    """(B, V_local) -> (B, V): every rank's slice of the logits, on every rank (padding columns cut)."""
    axis = head.axis
    if axis.size == 1:
        return local
    per_rank = -(-head.vocab_size // axis.size)
    if local.shape[-1] != per_rank:                                      # re-pad so every slice has one width
        local = F.pad(local, (0, per_rank - local.shape[-1]), value=float("-inf"))
    return gather_from_parallel(local, axis)[..., :head.vocab_size]


def generate(model, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
             tokenizer=None, eos_ids: Iterable[int] = (), max_batch: int = 64,
             on_event: Callable[[Event], None] | None = None) -> list[Completion]:
    """Generate for a list of token-id prompts on `model`'s mesh (call on every rank with the same arguments)."""
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * len(prompts)
    engine = Engine(model, tokenizer, eos_ids)
    return engine.generate([Request(b, list(map(int, p)), sp) for b, (p, sp) in enumerate(zip(prompts, params))],
                           max_batch=max_batch, on_event=on_event)


def model_eos_ids(src, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's end-of-text and a Hugging Face config's eos_token_id."""
    ids = set()
    if tokenizer is not None:
        ids.add(tokenizer.eot_id)
    if src.kind == "hf":
        for name in ("generation_config.json", "config.json"):
            try:
                with open(os.path.join(src.path, name)) as f:
                    eos = json.load(f).get("eos_token_id")
            except (OSError, ValueError):
                continue
            if eos is not None:
                ids.update(eos if isinstance(eos, list) else [eos])
                break
    return {i for i in ids if 0 <= i < src.config.vocab_size}
