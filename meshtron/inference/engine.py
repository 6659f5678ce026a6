"""Tensor-parallel decoding with a KV cache, in lockstep on every rank of the mesh, with continuous batching.

Every rank holds an `Engine` and calls `add` and `step` in the same order with the same requests: sequences are
assigned to the replicas of the `batch` axis (the least loaded first), each replica prefills and decodes its own
rows with its model-parallel ranks (the parallel layers communicate). The ranks of a replica pick the same
token by construction: they sample the same gathered logits with identically seeded generators, or take the
argmax of the same gathered (logit, id) pairs. With several replicas, one all-gather over the world after each
token hands every rank every replica's tokens (from each replica's first rank). So all ranks agree on every
token and stop decision, and rank 0 can stream all of them. Invariant: a sequence's tokens equal those of
generating it alone (left padding is masked, positions are per sequence, each has its own generator).
"""
from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from meshtron.comm import collectives as C
from meshtron.inference.kv_cache import KVCache
from meshtron.inference.sampling import SamplingParams, make_generator, sample
from meshtron.inference.text import TextStream


@dataclass
class Request:
    id: object
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class Event:
    """One new token of one sequence: its text piece (streamable), and why it ended, if it did."""
    id: object
    token: int
    text: str
    finish_reason: str | None = None           # None, 'stop' (EOS or a stop sequence) or 'length'


@dataclass
class Completion:
    id: object
    prompt_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str


@dataclass
class _Seq:
    req: Request
    replica: int
    budget: int                                 # tokens it may generate (max_new_tokens within max_seq_len)
    tokens: list[int] = field(default_factory=list)
    stream: TextStream | None = None
    generator: torch.Generator | None = None
    finish_reason: str | None = None


class Engine:
    """`add(requests)` prefills new sequences, `step()` decodes one token for all; both return Events.

    `tokenizer` turns tokens into text (needed for stop sequences); `text=False` skips building text for
    sequences without stop sequences (ranks that stream nothing). `eos_ids` end a sequence ('stop')."""

    def __init__(self, model, tokenizer=None, eos_ids: Iterable[int] = (), text: bool = True):
        self.model, self.tok, self.text = model, tokenizer, text and tokenizer is not None
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.max_seq_len = model.config.max_seq_len
        mesh = model.mesh
        dp = model.layout.axis("batch")
        self.replicas, self.replica = dp.size, dp.coord
        self.world = mesh.world_size
        self.leaders, self.replica_of = self._leaders(mesh, model.layout.axis_name("batch"))
        if self.world > 1:
            C.register_group(dist.group.WORLD, "world", tuple(range(self.world)))
        self.seqs: dict[object, _Seq] = {}
        self.rows: list[list[object]] = [[] for _ in range(self.replicas)]   # ids per replica, cache row order
        self.cache: KVCache | None = None
        self._warned = False

    @staticmethod
    def _leaders(mesh, batch_axis: str | None) -> tuple[list[int], list[int]]:
        """Global rank of each replica's first rank (coordinate 0 on every axis but the batch axis), and the
        replica of every global rank."""
        grid = mesh.rank_grid()
        if batch_axis is None:
            return [0], [0] * mesh.world_size
        grid = grid.movedim(list(mesh.shape).index(batch_axis), 0).reshape(mesh.shape[batch_axis], -1)
        replica_of = [0] * mesh.world_size
        for r, ranks in enumerate(grid.tolist()):
            for rank in ranks:
                replica_of[rank] = r
        return [ranks[0] for ranks in grid.tolist()], replica_of

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
        if n >= self.max_seq_len:
            raise ValueError(f"the prompt has {n} tokens; this model's context is {self.max_seq_len} tokens, "
                             f"so prompts must be at most {self.max_seq_len - 1} to leave room for one new token")
        if req.params.stop and self.tok is None:
            raise ValueError("stop sequences need a tokenizer")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in req.prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if req.id in self.seqs:
            raise ValueError(f"request id {req.id!r} is already running")

    @torch.inference_mode()
    def add(self, requests: list[Request]) -> list[Event]:
        """Admit requests (every rank, same order): prefill them, and return each one's first token."""
        for req in requests:
            self.check(req)
        new_rows: list[list[object]] = [[] for _ in range(self.replicas)]
        for req in requests:
            replica = min(range(self.replicas), key=lambda r: len(self.rows[r]) + len(new_rows[r]))
            seq = _Seq(req, replica, min(req.params.max_new_tokens, self.max_seq_len - len(req.prompt_ids)))
            if self.text or req.params.stop:
                seq.stream = TextStream(self.tok, req.prompt_ids, req.params.stop)
            if replica == self.replica:
                seq.generator = make_generator(req.params)
            self.seqs[req.id] = seq
            new_rows[replica].append(req.id)
        mine = [self.seqs[i] for i in new_rows[self.replica]]
        tokens = self._prefill(mine) if mine else []
        for r in range(self.replicas):
            self.rows[r].extend(new_rows[r])
        return self._apply(new_rows, tokens)

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One new token for every running sequence."""
        mine = [self.seqs[i] for i in self.rows[self.replica]]
        tokens = self._decode(mine) if mine else []
        return self._apply([list(r) for r in self.rows], tokens)

    def abort(self, ids: Iterable[object]) -> None:
        """Drop sequences (every rank, same ids) without another token."""
        gone = {i for i in ids if i in self.seqs}
        if gone:
            self._drop(gone)

    def reset(self) -> None:
        """Forget every sequence (after an error)."""
        self.seqs.clear()
        self.rows = [[] for _ in range(self.replicas)]
        self.cache = None

    def stream(self, requests: list[Request], max_batch: int = 64) -> Iterator[Event]:
        """Run requests to completion, yielding every token's Event as it comes; at most `max_batch` sequences
        per replica at once (waiting ones join as others finish)."""
        ids = [r.id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be distinct")
        for req in requests:
            self.check(req)
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
        done: dict[object, str] = {}
        tokens: dict[object, list[int]] = {r.id: [] for r in requests}
        texts: dict[object, list[str]] = {r.id: [] for r in requests}
        for ev in self.stream(requests, max_batch):
            tokens[ev.id].append(ev.token)
            texts[ev.id].append(ev.text)
            if ev.finish_reason:
                done[ev.id] = ev.finish_reason
            if on_event is not None:
                on_event(ev)
        return [Completion(r.id, list(r.prompt_ids), tokens[r.id], "".join(texts[r.id]) if self.text else None,
                           done[r.id]) for r in requests]

    # ---- the model ---------------------------------------------------------------------------------------

    def _prefill(self, seqs: list[_Seq]) -> list[int]:
        """Left-padded prompts through the model into a new cache, merged with the running rows' cache."""
        P = max(len(s.req.prompt_ids) for s in seqs)
        idx = torch.zeros(len(seqs), P, dtype=torch.long)
        valid = torch.zeros(len(seqs), P, dtype=torch.bool)
        for b, s in enumerate(seqs):
            ids = s.req.prompt_ids
            idx[b, P - len(ids):] = torch.tensor(ids, dtype=torch.long)
            valid[b, P - len(ids):] = True
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)           # per sequence, from 0
        device = self.model.head._weight().device
        idx, valid, positions = idx.to(device), valid.to(device), positions.to(device)
        cache = KVCache.like(self.model, len(seqs), P)
        cache.begin(positions, valid)
        h = self.model.hidden(idx, cache)                                # (B, P, d)
        cache.advance()
        tokens = self._next_tokens(h[:, -1:], seqs)                      # newest column: every row's last token
        # columns still to come: a sequence with n tokens feeds budget - n more (new ones have their first)
        extra = max(s.budget - max(len(s.tokens), 1) for s in self.seqs.values() if s.replica == self.replica)
        self.cache = KVCache.concat(self.cache, cache, max(extra, 1))
        return tokens

    def _decode(self, seqs: list[_Seq]) -> list[int]:
        device = self.cache.valid.device
        idx = torch.tensor([[s.tokens[-1]] for s in seqs], dtype=torch.long, device=device)
        positions = torch.tensor([[len(s.req.prompt_ids) + len(s.tokens) - 1] for s in seqs], device=device)
        self.cache.begin(positions)
        h = self.model.hidden(idx, self.cache)                           # (B, 1, d)
        self.cache.advance()
        return self._next_tokens(h, seqs)

    def _next_tokens(self, h: torch.Tensor, seqs: list[_Seq]) -> list[int]:
        """Sample from the full logits of h (B, 1, d); an all-greedy batch over a split vocabulary gathers only
        each rank's best (logit, id) instead: the same token (ties go to the lowest id, as argmax)."""
        params = [s.req.params for s in seqs]
        head = self.model.head
        if head.axis.size > 1 and all(p.greedy for p in params):
            return _parallel_argmax(head, h[:, 0])
        return sample(head.full_logits(h)[:, 0], params, [s.generator for s in seqs])

    # ---- agreeing on tokens, and ending sequences -------------------------------------------------------

    def _exchange(self, rows: list[list[object]], tokens: list[int]) -> dict[object, int]:
        """Every replica's tokens on every rank, from each replica's first rank (one all-gather if several)."""
        if self.replicas == 1:
            return dict(zip(rows[0], tokens))
        n = max(len(r) for r in rows)
        if n == 0:
            return {}
        buf = torch.full((n,), -1, dtype=torch.long)
        buf[:len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        every = C.all_gather_into(buf, dist.group.WORLD, self.world).view(self.world, n)
        out = {}
        for r, ids in enumerate(rows):
            picked = every[self.leaders[r], :len(ids)]
            out.update(zip(ids, picked.tolist()))
        if not self._warned:
            self._check_agreement(every, rows)
        return out

    def _check_agreement(self, every: torch.Tensor, rows: list[list[object]]) -> None:
        for rank in range(self.world):
            r = self.replica_of[rank]
            n = len(rows[r])
            if not torch.equal(every[rank, :n], every[self.leaders[r], :n]):
                warnings.warn(f"rank {rank} sampled other tokens than its replica's first rank "
                              f"{self.leaders[r]}; every rank continues with the first rank's tokens")
                self._warned = True
                return

    def _apply(self, rows: list[list[object]], local_tokens: list[int]) -> list[Event]:
        chosen = self._exchange(rows, local_tokens)
        events, finished = [], set()
        for ids in rows:
            for i in ids:
                seq, tok = self.seqs[i], chosen[i]
                seq.tokens.append(tok)
                reason = None
                if tok in self.eos_ids and not seq.req.params.ignore_eos:
                    reason = "stop"
                elif seq.stream is not None and seq.stream.push(tok):
                    reason = "stop"
                elif len(seq.tokens) >= seq.budget:
                    reason = "length"
                piece = ""
                if seq.stream is not None:
                    if reason:
                        seq.stream.finish()
                    piece = seq.stream.take()
                events.append(Event(i, tok, piece, reason))
                if reason:
                    seq.finish_reason = reason
                    finished.add(i)
        if finished:
            self._drop(finished)
        return events

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


def generate(model, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
             tokenizer=None, eos_ids: Iterable[int] = (), max_batch: int = 64,
             on_event: Callable[[Event], None] | None = None) -> list[Completion]:
    """Generate for a list of token-id prompts on `model`'s mesh (call on every rank with the same arguments)."""
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * len(prompts)
    engine = Engine(model, tokenizer, eos_ids)
    return engine.generate([Request(b, list(map(int, p)), sp) for b, (p, sp) in enumerate(zip(prompts, params))],
                           max_batch=max_batch, on_event=on_event)


def _parallel_argmax(head, h: torch.Tensor) -> list[int]:
    """argmax over a vocabulary split across `head.axis`: one all-gather of a (logit, id) pair per row."""
    local = head.local_logits(h)                                         # (B, V_local)
    B = local.shape[0]
    if local.shape[-1]:
        idx = local.argmax(dim=-1)
        val = local.gather(1, idx[:, None])[:, 0]
    else:                                                                # this rank holds only padding
        idx, val = torch.zeros(B, dtype=torch.long), torch.full((B,), float("-inf"))
    pair = torch.stack([val.double(), (idx + head.vocab_start).double()], dim=-1)   # (B, 2)
    every = C.all_gather_into(pair, head.axis.group, head.axis.size).view(head.axis.size, B, 2)
    best = every[..., 0].argmax(dim=0)                                   # first rank holding the maximum
    return every[best, torch.arange(B), 1].long().tolist()


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
