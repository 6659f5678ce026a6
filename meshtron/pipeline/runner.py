"""The pipeline runner: executes one rank's action list (meshtron.pipeline.schedule) for one optimizer step.

Invariants:
- A forward of micro-batch m on chunk c receives its input from the previous virtual stage (unless it is the
  first: token ids), runs `model.chunk_forward`, and sends its output to the next virtual stage (unless it is
  the last: the loss, divided by the number of micro-batches, as without a pipeline). A backward receives the
  gradient of its output from the next virtual stage and sends its input's gradient to the previous one.
- Sends are asynchronous (waited for at the end of the step) and receives block: with these rules every
  schedule of `schedule.SCHEDULES` is deadlock-free (`schedule.simulate` proves it for the sizes in use). Every
  message carries a tag naming its micro-batch and destination, so it can only match its own receive. Sends and
  receives go through meshtron.comm (counted; a dead or stalled peer ends in the group's timeout, named).
- Each forward sets the dropout position of its micro-batch (its first global row), so masks are those of one
  process; recomputation reads the position captured at the forward.
- The step's loss (the sum of the last stage's micro-batch losses) is made known to every rank of the pipe axis.
"""
from __future__ import annotations

import time

import torch

from meshtron.comm import collectives as C
from meshtron.pipeline import schedule as S


class PipelineRunner:
    def __init__(self, model, mesh, *, schedule: str | None = "1f1b", microbatches: int = 1, autocast=None):
        """`schedule` None: a runner for `evaluate` only (forward passes in micro-batch order)."""
        self.model, self.mesh = model, mesh
        self.axis = model.layout.axis("layers")
        self.stages, self.rank, self.chunks = self.axis.size, self.axis.coord, model.stage.chunks
        self.schedule, self.microbatches = schedule, microbatches
        self.actions = self.mine = None
        if schedule is not None:
            self.actions = S.build(schedule, self.stages, microbatches, self.chunks)
            S.simulate(self.actions, self.stages, self.chunks)         # deadlock-free, or refuse now
            self.mine = self.actions[self.rank]
        self.autocast = autocast
        self.seq = model.seq_axis if model.seq_axis.size > 1 else None
        self.trace: list[tuple[str, float, float]] | None = None   # set to [] to record (what, start, end)

    # ---- messages ------------------------------------------------------------------------------------------

    def _peer(self, rank: int) -> int:
        return self.axis.ranks[rank]

    def _tag(self, microbatch: int, vstage: int, kind: str) -> int:
        return 2 * (microbatch * self.stages * self.chunks + vstage) + (kind == "grad")

    def _hidden_shape(self, rows: int, tokens: int) -> tuple[int, int, int]:
        local = tokens // self.seq.size if self.seq is not None else tokens
        return rows, local, self.model.config.d_model

    # ---- one step --------------------------------------------------------------------------------------------

    def forward_backward(self, local_batch: torch.Tensor, first_row: int) -> torch.Tensor:
        """Run this rank's actions over `local_batch` (B_local, T+1), whose first sequence is row `first_row` of
        the global batch; gradients accumulate in the parameters. Returns the mean loss (every pipe rank)."""
        chunks = local_batch.chunk(self.microbatches)
        rows = chunks[0].shape[0]
        tokens = local_batch.shape[1] - 1
        stash: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        sends: list[C.Pending] = []
        total = torch.zeros((), device=self.mesh.device)
        model, last_v = self.model, self.stages * self.chunks - 1
        for a in self.mine:
            t0 = time.perf_counter()
            v = S.virtual_stage(self.rank, a.chunk, self.stages)
            ids = chunks[a.microbatch]
            if a.kind == "F":
                if v == 0:
                    x = ids[:, :-1]
                else:
                    x = torch.empty(self._hidden_shape(rows, tokens), device=self.mesh.device)
                    src = S.owner(v - 1, self.stages)[0]
                    C.recv(x, self._peer(src), self.axis.group, self._tag(a.microbatch, v, "act"), "pipe act")
                    x.requires_grad_()
                    t0 = self._waited(t0)
                model.rng.at_row(first_row + a.microbatch * rows)
                with self.autocast():
                    out = model.chunk_forward(a.chunk, x, ids[:, 1:])
                if v == last_v:
                    out = out / self.microbatches
                    total += out.detach()
                else:
                    dst = S.owner(v + 1, self.stages)[0]
                    sends.append(C.send_async(out.detach(), self._peer(dst), self.axis.group,
                                              self._tag(a.microbatch, v + 1, "act"), "pipe act"))
                stash[(a.microbatch, a.chunk)] = (x, out)
            else:
                x, out = stash.pop((a.microbatch, a.chunk))
                if v == last_v:
                    out.backward()
                else:
                    grad = torch.empty_like(out)
                    src = S.owner(v + 1, self.stages)[0]
                    C.recv(grad, self._peer(src), self.axis.group, self._tag(a.microbatch, v, "grad"), "pipe grad")
                    t0 = self._waited(t0)
                    torch.autograd.backward(out, grad)
                if v > 0:
                    dst = S.owner(v - 1, self.stages)[0]
                    sends.append(C.send_async(x.grad, self._peer(dst), self.axis.group,
                                              self._tag(a.microbatch, v - 1, "grad"), "pipe grad"))
                del x, out
            if self.trace is not None:
                self.trace.append((str(a), t0, time.perf_counter()))
        for pending in sends:
            pending.wait()
        C.all_reduce(total, self.axis.group)        # the last stage's loss, on every stage
        return total

    def _waited(self, since: float) -> float:
        """Record a receive's wait (when tracing); returns the time compute starts."""
        now = time.perf_counter()
        if self.trace is not None:
            self.trace.append(("wait", since, now))
        return now

    @torch.no_grad()
    def evaluate(self, local_batch: torch.Tensor) -> torch.Tensor:
        """The mean loss of `local_batch` through the pipeline, forward only, as one micro-batch (every pipe rank
        gets it)."""
        chunks = [local_batch]
        rows, tokens = local_batch.shape[0], local_batch.shape[1] - 1
        total = torch.zeros((), device=self.mesh.device)
        sends = []
        last_v = self.stages * self.chunks - 1
        for m in range(len(chunks)):
            for c in range(self.chunks):
                v = S.virtual_stage(self.rank, c, self.stages)
                ids = chunks[m]
                if v == 0:
                    x = ids[:, :-1]
                else:
                    x = torch.empty(self._hidden_shape(rows, tokens), device=self.mesh.device)
                    C.recv(x, self._peer(S.owner(v - 1, self.stages)[0]), self.axis.group,
                           self._tag(m, v, "act"), "pipe act")
                with self.autocast():
                    out = self.model.chunk_forward(c, x, ids[:, 1:])
                if v == last_v:
                    total += out.float() / len(chunks)
                else:
                    sends.append(C.send_async(out, self._peer(S.owner(v + 1, self.stages)[0]), self.axis.group,
                                              self._tag(m, v + 1, "act"), "pipe act"))
        for pending in sends:
            pending.wait()
        C.all_reduce(total, self.axis.group)
        return total
