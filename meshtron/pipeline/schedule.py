"""Pipeline schedules as data: for every rank of the `pipe` axis, the ordered list of what it computes.

A schedule is one function per kind that returns `actions[rank]`, a list of `Action(kind, microbatch, chunk)`:
`F` runs a micro-batch forward through one of the rank's layer chunks, `B` runs it backward. Sends and receives
follow from the actions (`comms`): a forward whose virtual stage is not the first receives its input from the
previous virtual stage, a forward that is not the last sends its output on; backward is the mirror image. The
runner (meshtron.pipeline.runner) executes the lists; `simulate` executes them on paper, with the runner's rules
(sends never block, a receive waits for its send), to prove a schedule deadlock-free and to count its bubble.

Virtual stages: with V chunks per rank (interleaved 1F1B, Narayanan et al. 2021, section 2.2.2), rank s holds
chunks c = 0..V-1, which are virtual stages c·P + s of the P·V-stage pipeline; with V = 1 virtual stage = rank.

Invariants (tests/test_pipeline.py checks them for every schedule): every micro-batch runs forward and backward
exactly once through every virtual stage, a backward follows its forward, the in-flight micro-batches of a rank
(forwards whose backward has not run) stay within the schedule's limit (1F1B: P - s on rank s), and
`simulate` completes.
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b", "interleaved")


@dataclass(frozen=True)
class Action:
    kind: str           # "F" or "B"
    microbatch: int
    chunk: int = 0

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.chunk}" if self.chunk else "")


def virtual_stage(rank: int, chunk: int, stages: int) -> int:
    return chunk * stages + rank


def owner(vstage: int, stages: int) -> tuple[int, int]:
    """(rank, chunk) holding virtual stage `vstage`."""
    return vstage % stages, vstage // stages


def check(schedule: str, stages: int, microbatches: int, chunks: int = 1) -> None:
    """Raise ValueError, saying what to change, if `schedule` cannot run these sizes."""
    if schedule not in SCHEDULES:
        raise ValueError(f"pipeline schedule {schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")
    if stages < 1 or microbatches < 1 or chunks < 1:
        raise ValueError("pipeline stages, micro-batches and virtual stages must be at least 1")
    if schedule != "interleaved" and chunks != 1:
        raise ValueError(f"--virtual-stages {chunks} needs --pipeline-schedule interleaved (gpipe and 1f1b run one "
                         f"layer chunk per rank)")
    if schedule == "interleaved" and microbatches % stages:
        raise ValueError(f"the interleaved schedule needs the micro-batches ({microbatches}) to be a multiple of the "
                         f"pipeline size ({stages}), as Megatron-LM does: use --micro-batches "
                         f"{-(-microbatches // stages) * stages}")


def gpipe(stages: int, microbatches: int) -> list[list[Action]]:
    """GPipe (Huang et al. 2019): all forwards, then all backwards (in reverse), on every rank."""
    return [[Action("F", m) for m in range(microbatches)] + [Action("B", m) for m in reversed(range(microbatches))]
            for _ in range(stages)]


def one_f_one_b(stages: int, microbatches: int) -> list[list[Action]]:
    """1F1B (PipeDream-Flush, Narayanan et al. 2021, section 2.2.1): rank s runs P - s - 1 warm-up forwards, then
    alternates one forward and one backward, then drains; at most P - s micro-batches in flight on rank s."""
    out = []
    for s in range(stages):
        warmup = min(stages - s - 1, microbatches)
        acts = [Action("F", m) for m in range(warmup)]
        f, b = warmup, 0
        while f < microbatches:
            acts.append(Action("F", f))
            f += 1
            acts.append(Action("B", b))
            b += 1
        acts += [Action("B", m) for m in range(b, microbatches)]
        out.append(acts)
    return out


def interleaved(stages: int, microbatches: int, chunks: int) -> list[list[Action]]:
    """Interleaved 1F1B (Narayanan et al. 2021, section 2.2.2; Megatron-LM's
    forward_backward_pipelining_with_interleaving): the k-th forward of rank s is micro-batch
    (k // (P·V))·P + k % P on chunk (k // P) % V, the k-th backward the same micro-batch on chunk V - 1 - (k // P) % V;
    rank s warms up with (P - s - 1)·2 + (V - 1)·P forwards, then alternates, then drains."""
    total = microbatches * chunks
    out = []
    for s in range(stages):
        def fwd(k):
            return Action("F", (k // (stages * chunks)) * stages + k % stages, (k // stages) % chunks)

        def bwd(k):
            return Action("B", (k // (stages * chunks)) * stages + k % stages, chunks - 1 - (k // stages) % chunks)
        warmup = min((stages - s - 1) * 2 + (chunks - 1) * stages, total)
        acts = [fwd(k) for k in range(warmup)]
        f, b = warmup, 0
        while f < total:
            acts.append(fwd(f))
            f += 1
            acts.append(bwd(b))
            b += 1
        acts += [bwd(k) for k in range(b, total)]
        out.append(acts)
    return out


def build(schedule: str, stages: int, microbatches: int, chunks: int = 1) -> list[list[Action]]:
    """The action lists of every rank (see the module docstring)."""
    check(schedule, stages, microbatches, chunks)
    if schedule == "gpipe":
        return gpipe(stages, microbatches)
    if schedule == "1f1b":
        return one_f_one_b(stages, microbatches)
    return interleaved(stages, microbatches, chunks)


def comms(action: Action, rank: int, stages: int, chunks: int) -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
    """(receive before, send after) of an action: each (peer rank, what), or None. `what` is "act" (a forward's
    activations) or "grad" (a backward's input gradient)."""
    v = virtual_stage(rank, action.chunk, stages)
    last = stages * chunks - 1
    if action.kind == "F":
        recv = (owner(v - 1, stages)[0], "act") if v > 0 else None
        send = (owner(v + 1, stages)[0], "act") if v < last else None
    else:
        recv = (owner(v + 1, stages)[0], "grad") if v < last else None
        send = (owner(v - 1, stages)[0], "grad") if v > 0 else None
    return recv, send


def simulate(actions: list[list[Action]], stages: int, chunks: int, cost_f: float = 1.0,
             cost_b: float = 2.0) -> dict:
    """Run the lists on paper with the runner's rules: an action starts when its rank is free and its input has
    arrived (sends are asynchronous, arrivals instant). Returns {'time': makespan, 'busy': per-rank busy time,
    'bubble': idle share of the makespan averaged over ranks, 'peak_in_flight': per rank}; raises RuntimeError
    on a deadlock, naming the blocked actions."""
    done_at: dict[tuple[str, int, int], float] = {}      # (kind, microbatch, vstage) -> finish time
    pos, clock = [0] * stages, [0.0] * stages
    in_flight, peak = [0] * stages, [0] * stages
    busy = [0.0] * stages
    remaining = sum(len(a) for a in actions)
    while remaining:
        progressed = False
        for r in range(stages):
            if pos[r] == len(actions[r]):
                continue
            a = actions[r][pos[r]]
            v = virtual_stage(r, a.chunk, stages)
            if a.kind == "F":
                dep = ("F", a.microbatch, v - 1) if v > 0 else None
            else:
                own = ("F", a.microbatch, v)
                dep = ("B", a.microbatch, v + 1) if v < stages * chunks - 1 else own
                if own not in done_at:
                    raise RuntimeError(f"rank {r} runs {a} before its forward")
            if dep is not None and dep not in done_at:
                continue
            start = max(clock[r], done_at[dep] if dep else 0.0)
            cost = (cost_f if a.kind == "F" else cost_b) / chunks
            clock[r] = start + cost
            busy[r] += cost
            done_at[(a.kind, a.microbatch, v)] = clock[r]
            in_flight[r] += 1 if a.kind == "F" else -1
            peak[r] = max(peak[r], in_flight[r])
            pos[r] += 1
            remaining -= 1
            progressed = True
        if not progressed:
            blocked = [f"rank {r}: {actions[r][pos[r]]}" for r in range(stages) if pos[r] < len(actions[r])]
            raise RuntimeError("pipeline schedule deadlocks: " + "; ".join(blocked))
    makespan = max(clock)
    return {"time": makespan, "busy": busy, "peak_in_flight": peak,
            "bubble": 1 - sum(busy) / (stages * makespan)}


def describe(actions: list[list[Action]]) -> str:
    """One line per rank, e.g. `rank 0: F0 F1 B0 F2 B1 B2`."""
    return "\n".join(f"rank {r}: " + " ".join(map(str, acts)) for r, acts in enumerate(actions))
