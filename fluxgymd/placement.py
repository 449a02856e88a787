"""Which queued jobs start now, and on which GPUs: the placement policy, a pure function of
the GPU inventory, what is placed, the queue in its order and the free slots, like the
watchdog's policy (watchdog.py). The daemon reads the probe and the store, asks `decide`,
and starts what it says (daemon.schedule).

Room on a GPU, for a new job, is the smaller of two figures, each less the reserve:
- by plan: its total memory less what every job placed on it planned;
- by reading: its free memory as the probe reads it less what the jobs placed on it that have
  not reported a step yet planned (they have not allocated it yet; one that has is in the
  reading already). A process that is not ours, or a job that takes more than it planned,
  shows here.
So no GPU is committed beyond its memory by the plans, nor beyond what it has free now.

Order: priority, then first in first out (the queue's order). A job that does not fit now
holds the GPUs that will free up first for it (the fewest planned bytes of ours), and no later
job is placed on those: the head of the queue is never passed over forever by small jobs
behind it. Only the first such job holds GPUs, so the others backfill the rest.

Stdlib only: the daemon imports it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

GiB = 1 << 30
MiB = 1 << 20
# the tier `auto` resolves to, for a given room: trainer.tiers.choose, injected (pure)
Chooser = Callable[[dict[str, int], int], tuple[str, str]]


@dataclass(frozen=True)
class Gpu:
    index: int
    uuid: str
    total: int  # bytes
    free: int  # bytes, as last read
    name: str = ""

    @property
    def label(self) -> str:
        return f"GPU {self.index}" + (f" ({self.name})" if self.name else "")


@dataclass(frozen=True)
class Need:
    """What a job asks for: `count` GPUs, each with `bytes` of room (None: a whole GPU, with
    no other job of ours on it). A lora job with `vram = "auto"` has `tiers` (tier: planned
    peak bytes) and no `bytes`: the tier that fits the GPU it is placed on is chosen."""
    count: int = 1
    bytes: int | None = None
    tiers: dict[str, int] = field(default_factory=dict)
    auto: bool = False
    pinned: tuple[str, ...] = ()  # GPU UUIDs it must run on (its own or its last placement)
    alone: bool = False  # a GPU of its own: nothing else of ours beside it (after an OOM)

    @property
    def whole(self) -> bool:
        return self.bytes is None and not self.auto


@dataclass(frozen=True)
class Placed:
    job_id: int
    gpus: tuple[str, ...]  # UUIDs
    bytes: int | None  # planned per GPU; None: it has each GPU to itself
    allocated: bool  # it reported a step: what it uses is in the reading already


@dataclass(frozen=True)
class Waiting:
    job_id: int
    need: Need


@dataclass(frozen=True)
class Decision:
    job_id: int
    gpus: tuple[str, ...]  # UUIDs, in index order ((): a job without GPUs)
    bytes: int | None  # planned per GPU (None: whole GPUs, or no GPU)
    tier: str | None = None  # the tier `auto` resolved to
    room: int | None = None  # the least room of its GPUs when placed (the trainer's budget)


@dataclass
class Pass:
    start: list[Decision] = field(default_factory=list)
    held: dict[int, tuple[str, ...]] = field(default_factory=dict)  # job -> GPUs held for it
    waits: dict[int, str] = field(default_factory=dict)  # job -> why it waits for a GPU


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


class _Book:
    """Room per GPU during one pass; placing a job books it."""

    def __init__(self, gpus: list[Gpu], placed: Iterable[Placed], reserve: int):
        self.gpus = {g.uuid: g for g in gpus}
        self.reserve = reserve
        self.planned = {g.uuid: 0 for g in gpus}  # bytes planned by placed jobs
        self.unallocated = {g.uuid: 0 for g in gpus}  # of those, not allocated yet
        self.jobs = {g.uuid: 0 for g in gpus}
        self.whole = {g.uuid: False for g in gpus}
        for p in placed:
            for u in p.gpus:
                if u not in self.gpus:
                    continue  # a GPU we no longer hand out (or no longer see)
                self.jobs[u] += 1
                if p.bytes is None:
                    self.whole[u] = True
                else:
                    self.planned[u] += p.bytes
                    if not p.allocated:
                        self.unallocated[u] += p.bytes

    def room(self, u: str) -> int:
        g = self.gpus[u]
        if self.whole[u]:
            return 0
        return max(0, min(g.total - self.planned[u], g.free - self.unallocated[u])
                   - self.reserve)

    def capacity(self, u: str) -> int:
        return max(0, self.gpus[u].total - self.reserve)

    def usable(self, u: str, need: Need, exclusive: bool) -> bool:
        """Whether a job with this need may share u with what is on it."""
        if self.whole[u]:
            return False
        if exclusive or need.alone or need.whole:
            return self.jobs[u] == 0
        return True

    def book(self, u: str, amount: int | None) -> None:
        self.jobs[u] += 1
        if amount is None:
            self.whole[u] = True
        else:
            self.planned[u] += amount
            self.unallocated[u] += amount


def _fits(book: _Book, u: str, need: Need, amount: int | None) -> bool:
    if amount is None:  # a whole GPU: nothing of ours on it, and most of it free
        g = book.gpus[u]
        return book.jobs[u] == 0 and g.free - book.reserve >= 0.9 * book.capacity(u)
    return book.room(u) >= amount


def _choose_tier(need: Need, room: int, choose: Chooser) -> tuple[str, int]:
    tier, _ = choose(need.tiers, room)
    return tier, need.tiers[tier]


def _try(book: _Book, need: Need, candidates: list[str], exclusive: bool,
         choose: Chooser) -> Decision | None:
    """The GPUs this need takes now, or None: best fit (the least room that is enough), so
    large GPUs stay free for large jobs; `auto` takes the GPUs where the fastest tier fits."""
    ok = [u for u in candidates if book.usable(u, need, exclusive)]
    if len(ok) < need.count:
        return None
    if need.auto:
        best: tuple | None = None
        for u in ok:
            tier, peak = _choose_tier(need, book.room(u), choose)
            if peak > book.room(u):
                continue
            # every GPU of a multi-GPU job holds a replica: the tier must fit each
            fit = [v for v in ok if book.room(v) >= peak]
            if len(fit) < need.count:
                continue
            rank = list(need.tiers).index(tier)
            key = (rank, book.room(u), book.gpus[u].index)
            if best is None or key < best[0]:
                best = (key, tier, peak)
        if best is None:
            return None
        _, tier, peak = best
        chosen = sorted((v for v in ok if book.room(v) >= peak),
                        key=lambda v: (book.room(v), book.gpus[v].index))[:need.count]
        room = min(book.room(v) for v in chosen)
        return Decision(0, _ordered(book, chosen), peak, tier, room)
    fit = [u for u in ok if _fits(book, u, need, need.bytes)]
    if len(fit) < need.count:
        return None
    chosen = sorted(fit, key=lambda u: (book.room(u), book.gpus[u].index))[:need.count]
    return Decision(0, _ordered(book, chosen), need.bytes, None,
                    min(book.room(u) for u in chosen))


def _ordered(book: _Book, uuids: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(uuids, key=lambda u: book.gpus[u].index))


def _smallest(need: Need) -> int | None:
    """The least room per GPU this need could ever run in."""
    if need.auto:
        return min(need.tiers.values()) if need.tiers else 0
    return need.bytes


def decide(gpus: list[Gpu], placed: Iterable[Placed], queue: list[Waiting], slots: int,
           reserve: int = 0, exclusive: bool = False,
           choose: Chooser | None = None) -> Pass:
    """The jobs of `queue` (in queue order) that start now, at most `slots` of them, and
    where; the GPUs held for the first job that has to wait; why each waiting job waits."""
    choose = choose or _largest_fitting
    book = _Book(gpus, placed, reserve)
    out = Pass()
    held: set[str] = set()
    # Needs that did not fit, with why, until a placement or a hold changes what the next
    # job would find: a queue of a thousand jobs holds a few dozen kinds of need.
    failed: dict[tuple, str] = {}
    for w in queue:
        if len(out.start) >= slots:
            break
        need = w.need
        if need.count == 0:
            out.start.append(Decision(w.job_id, (), None))
            continue
        key = (need.count, need.bytes, tuple(need.tiers.items()), need.auto, need.pinned,
               need.alone)
        if key in failed:
            out.waits[w.job_id] = failed[key]
            continue
        pool = [u for u in book.gpus if (not need.pinned or u in need.pinned)]
        if need.pinned and len(pool) < len(need.pinned):
            out.waits[w.job_id] = ("waits for a GPU it is pinned to that fluxgymd does not "
                                   "hand out now (not seen, or left out by [gpus] use)")
            continue
        free_pool = [u for u in pool if u not in held]
        d = _try(book, need, free_pool, exclusive, choose)
        if d is not None:
            for u in d.gpus:
                book.book(u, d.bytes)
            failed.clear()
            out.start.append(Decision(w.job_id, d.gpus, d.bytes, d.tier, d.room))
            continue
        out.waits[w.job_id] = failed[key] = _why_waiting(book, need, pool)
        if not out.held and any(u not in held for u in pool):
            # the head that waits holds the GPUs that free up first, so nothing behind it
            # takes them meanwhile
            smallest = _smallest(need)
            could = [u for u in pool if smallest is None or book.capacity(u) >= smallest]
            if len(could) >= need.count:
                mine = sorted(could, key=lambda u: (book.planned[u] + (
                    book.capacity(u) if book.whole[u] else 0), book.jobs[u],
                    book.gpus[u].index))[:need.count]
                out.held[w.job_id] = _ordered(book, mine)
                held.update(mine)
                out.waits[w.job_id] += "; nothing new goes onto " + ", ".join(
                    f"GPU {book.gpus[u].index}" for u in out.held[w.job_id]) + \
                    " meanwhile (held for it)"
                failed.clear()
    return out


def _why_waiting(book: _Book, need: Need, pool: list[str]) -> str:
    want = ("a GPU to itself" if need.whole or need.alone else
            f"{_gib(_smallest(need) or 0)} free")
    count = f"{need.count} GPUs with " if need.count > 1 else ""
    rooms = ", ".join(f"GPU {book.gpus[u].index}: {_gib(book.room(u))}"
                      + (f" ({book.jobs[u]} job{'s' if book.jobs[u] > 1 else ''})"
                         if book.jobs[u] else "") for u in pool)
    return f"waits for {count}{want} (room now: {rooms or 'no GPU'})"


def _largest_fitting(tiers: dict[str, int], room: int) -> tuple[str, str]:
    """The first tier (in the order given, fastest first) whose peak fits the room."""
    for tier, peak in tiers.items():
        if peak <= room:
            return tier, "fits"
    return list(tiers)[-1], "none fits"


def never_fits(gpus: list[Gpu], need: Need, reserve: int = 0,
               choose: Chooser | None = None) -> str | None:
    """Why a job can never run on these GPUs, even with every one free, or None."""
    if need.count == 0:
        return None
    if not gpus:
        return (f"it asks for {need.count} GPU(s) and fluxgymd hands out none here (no GPU "
                "found, or [gpus] use excludes them all); set gpus = 0 in [job]")
    pool = [g for g in gpus if not need.pinned or g.uuid in need.pinned]
    if len(pool) < need.count:
        return (f"it asks for {need.count} GPUs and fluxgymd hands out {len(pool)}"
                + (" of the ones it is pinned to" if need.pinned else "")
                + f" ({', '.join(g.label for g in pool) or 'none'})")
    cap = sorted((max(0, g.total - reserve) for g in pool), reverse=True)[need.count - 1]
    smallest = _smallest(need)
    if smallest is None or smallest <= cap:
        return None
    largest = max(pool, key=lambda g: g.total)
    what = (f"a GPU with {_gib(smallest)}" if need.count == 1
            else f"{need.count} GPUs with {_gib(smallest)} each")
    msg = (f"it needs {what}, and the largest GPU here, {largest.label}, has "
           f"{_gib(largest.total)}" + (f" ({_gib(cap)} after the {reserve // MiB} MiB reserve)"
                                       if reserve else ""))
    fitting = [t for t, peak in need.tiers.items() if peak <= cap]
    if fitting:
        msg += (f"; tier {fitting[0]} ({_gib(need.tiers[fitting[0]])}) would fit: set "
                f"train.vram = \"{fitting[0]}\" (or \"auto\")")
    elif need.tiers:
        msg += "; no tier fits: lower resolution, train_batch_size or network_dim"
    else:
        msg += "; lower gpu_memory_gib if the job needs less, or run it where a larger GPU is"
    return msg


def gib_to_bytes(value: float) -> int:
    return int(math.ceil(value * GiB))
