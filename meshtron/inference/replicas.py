"""The replicas of the `batch` axis agreeing on what each decided: after every prefill or decoding step, one
all-gather over the world hands every rank every replica's new tokens (with their logprobs, when asked), taken
from each replica's first rank; prompt logprobs of newly prefilled sequences travel the same way.

Invariant: every rank calls these in the same order with the same row lists (the engine's rows are the same
everywhere), so the buffers have one shape on all ranks; what a rank keeps is its replica leader's data, so all
ranks hold identical tokens, logprobs and stop decisions, and rank 0 can answer for every replica.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshtron.comm import collectives as C


@dataclass
class Choice:
    """What a replica decided for one sequence in one step."""
    token: int | None                          # None: no new token (a prompt scored with max_new_tokens 0)
    logprob: float | None = None               # raw model logprob of the token, if asked
    top: list[tuple[int, float]] | None = None  # the k most likely (id, logprob), if asked


@dataclass
class PromptLogprobs:
    """A prompt scored by the prefill pass: `logprobs[i]` of token i given those before it, `top[i]` its k most
    likely (id, logprob) pairs; both None for the first token."""
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


class Replicas:
    def __init__(self, mesh, batch_axis: str | None, replica: int, device):
        self.world, self.replica, self.device = mesh.world_size, replica, device
        self.leaders, self.replica_of = _leaders(mesh, batch_axis)
        self.count = len(self.leaders)
        if self.world > 1:
            C.register_group(dist.group.WORLD, "world", tuple(range(self.world)))
        self._warned = False

    def choices(self, rows: list[list[object]], mine: list[Choice], k: int, scored: bool) -> dict[object, Choice]:
        """Every replica's choices on every rank. `rows[r]`: replica r's sequence ids this step; `mine`: this
        rank's choices for its replica's rows; `scored`: some row carries logprobs (with at most k alternatives)."""
        if self.count == 1:
            return dict(zip(rows[0], mine))
        n = max(len(r) for r in rows)
        if n == 0:
            return {}
        width = 2 + 2 * k if scored else 1
        rows_out = [[math.nan] * width for _ in range(n)]
        for b, ch in enumerate(mine):
            row = rows_out[b]
            row[0] = -1 if ch.token is None else ch.token
            if scored and ch.logprob is not None:
                row[1] = ch.logprob
                for j, (tid, lp) in enumerate(ch.top or ()):
                    row[2 + j], row[2 + k + j] = tid, lp
        buf = torch.tensor(rows_out, dtype=torch.float64, device=self.device)
        every = C.all_gather_into(buf, dist.group.WORLD, self.world).view(self.world, n, width).cpu()
        if not self._warned:
            self._check_agreement(every[..., 0], rows)
        out = {}
        for r, ids in enumerate(rows):
            for b, i in enumerate(ids):
                row = every[self.leaders[r], b].tolist()
                token = None if row[0] < 0 else int(row[0])
                if not scored or math.isnan(row[1]):
                    out[i] = Choice(token)
                    continue
                top = [(int(row[2 + j]), row[2 + k + j]) for j in range(k) if not math.isnan(row[2 + j])]
                out[i] = Choice(token, row[1], top)
        return out

    def prompts(self, rows: list[list[object]], lengths: dict[object, int], mine: dict[object, PromptLogprobs],
                k: int) -> dict[object, PromptLogprobs]:
        """Prompt logprobs of the sequences in `lengths` (id -> prompt length) on every rank; `mine`: this
        replica's, for its own sequences."""
        if self.count == 1 or not lengths:
            return mine
        per = [[i for i in ids if i in lengths] for ids in rows]
        n = max(1, max(sum(lengths[i] - 1 for i in ids) for ids in per))
        width = 1 + 2 * k
        rows_out = [[math.nan] * width for _ in range(n)]
        b = 0
        for i in per[self.replica]:
            got = mine[i]
            for lp, top in zip(got.logprobs[1:], got.top[1:]):
                row = rows_out[b]
                row[0] = lp
                for j, (tid, v) in enumerate(top or ()):
                    row[1 + j], row[1 + k + j] = tid, v
                b += 1
        buf = torch.tensor(rows_out, dtype=torch.float64, device=self.device)
        every = C.all_gather_into(buf, dist.group.WORLD, self.world).view(self.world, n, width).cpu()
        out = {}
        for r, ids in enumerate(per):
            data, b = every[self.leaders[r]].tolist(), 0
            for i in ids:
                lps, tops = [None], [None]
                for row in data[b:b + lengths[i] - 1]:
                    lps.append(row[0])
                    tops.append([(int(row[1 + j]), row[1 + k + j]) for j in range(k) if not math.isnan(row[1 + j])])
                b += lengths[i] - 1
                out[i] = PromptLogprobs(lps, tops)
        return out

    def _check_agreement(self, tokens: torch.Tensor, rows: list[list[object]]) -> None:
        for rank in range(self.world):
            r = self.replica_of[rank]
            n = len(rows[r])
            if not torch.equal(tokens[rank, :n], tokens[self.leaders[r], :n]):
                warnings.warn(f"rank {rank} chose other tokens than its replica's first rank {self.leaders[r]}; "
                              f"every rank continues with the first rank's tokens")
                self._warned = True
                return


def _leaders(mesh, batch_axis: str | None) -> tuple[list[int], list[int]]:
    """Global rank of each replica's first rank (coordinate 0 on every axis but the batch axis), and the replica of
    every global rank."""
    if batch_axis is None:
        return [0], [0] * mesh.world_size
    grid = mesh.rank_grid()
    grid = grid.movedim(list(mesh.shape).index(batch_axis), 0).reshape(mesh.shape[batch_axis], -1)
    replica_of = [0] * mesh.world_size
    for r, ranks in enumerate(grid.tolist()):
        for rank in ranks:
            replica_of[rank] = r
    return [ranks[0] for ranks in grid.tolist()], replica_of
