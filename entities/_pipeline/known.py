"""Stage 4's shortcut: the newest messages of an entity's stream, known without reading them.

A claim folds the events after the entity's cached view (its last wake's end) up to the tail,
which costs a read of the stream. In ``entities serve`` the worker shares a process with the
store that takes sends over HTTP, and every commit of either hands over what it appended
(:class:`streams.Committed`: path, stream id, position and bytes of each message). A
:class:`KnownTails` keeps, per stream, the newest run of messages whose positions follow each
other without a gap, so a claim can fold them instead of reading, if both hold:

- the run starts at or before the cached view's offset, and is of the stream the view was
  folded from: the view is *pinned* after the wake's commit, and only to a run that this
  worker's own commit extended (a fenced commit to the current stream at that path; a path
  purged and spawned again elsewhere holds another stream, with positions counted anew);
- the pending mark the claim takes was written by a commit whose appends the run holds
  (:meth:`KnownTails.after` is given the mark): then the run holds every message the mark stands
  for. Anything appended after the run (by another process, or not handed over yet) wrote
  another mark, which the wake's commit leaves in place, so it gets a wake of its own.

Everything else reads the stream as before: a gap in positions (another process appended in
between), an unknown mark (found by a scan), a redelivered wake (its range is fixed), a
stream created, deleted, truncated or with messages removed in this process (forgotten), a run
over its bounds (dropped). A run is never wrong about what it holds: its messages are exactly
what those commits stored at those positions.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from streams import Committed, KvPut, Message, Op, format_offset, parse_offset

from .._records import PENDING_NS
from .._urls import parse_url

__all__ = ["KnownTails", "pending_marks"]

MAX_STREAMS = 4096  # runs kept, least recently extended dropped first
MAX_MESSAGES = 512  # a run longer than this (a busy stream) is dropped: its claims read
MAX_BYTES = 1 << 20  # the same for a run's bytes
MAX_TOTAL_BYTES = 32 << 20  # all runs together
MAX_MARKS = 64  # marks remembered per run (the newest)


@dataclass(slots=True)
class _Run:
    stream_id: int
    base: int  # the position before its first message
    messages: list[bytes] = field(default_factory=list)
    size: int = 0
    marks: dict[bytes, int] = field(default_factory=dict)  # token -> run end when written

    @property
    def end(self) -> int:
        return self.base + len(self.messages)

    def trim(self, position: int) -> int:
        """Drop the messages at or before ``position`` (within the run); return their bytes."""
        drop = position - self.base
        if drop <= 0:
            return 0
        dropped = sum(len(m) for m in self.messages[:drop])
        self.size -= dropped
        del self.messages[:drop]
        self.base = position
        return dropped


class KnownTails:
    """One worker's runs of known newest messages, per stream path (see the module docstring).
    Not thread-safe: fed and read on the worker's event loop."""

    def __init__(self) -> None:
        self._runs: OrderedDict[str, _Run] = OrderedDict()
        self._own: dict[str, int] = {}  # path -> stream id this worker's last commit appended to
        self._size = 0
        # "known": claims folded from a run; "read": claims that could have and read instead
        self.counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._runs)

    def learn(self, committed: Committed, marks: Sequence[tuple[str, bytes]], *, own: bool) -> None:
        """Take in what a commit appended and the pending marks it wrote (:func:`pending_marks`
        of its calls): ``own`` when it is this worker's own (a wake's commit, fenced by its
        claim), else another store's of this process (a send). A store's commits must be
        learned in the order they were made."""
        for path in committed.rewritten:
            self.forget(path)
        marked = [(parse_url(url).stream, token) for url, token in marks]
        marked_paths = {path for path, _token in marked}
        if not committed.appended:
            return
        extended: set[str] = set()
        runs = self._runs
        for path, stream_id, position, data in committed.appended:
            run = runs.get(path)
            if run is None and not own and path not in marked_paths:
                continue  # not an entity's wake-up (a stream written over HTTP, say)
            if run is None or run.stream_id != stream_id or run.end != position - 1:
                if run is not None:
                    self._size -= run.size
                run = runs[path] = _Run(stream_id, position - 1)
            run.messages.append(data)
            run.size += len(data)
            self._size += len(data)
            extended.add(path)
            if own:
                self._own[path] = stream_id
        for path, token in marked:
            run = runs.get(path)
            if run is not None and path in extended:
                run.marks[token] = run.end
                if len(run.marks) > MAX_MARKS:
                    del run.marks[next(iter(run.marks))]
        for path in extended:
            self._bound(path)

    def _bound(self, path: str) -> None:
        run = self._runs.get(path)
        if run is None:
            return
        if len(run.messages) > MAX_MESSAGES or run.size > MAX_BYTES:
            self.forget(path)
            return
        self._runs.move_to_end(path)
        while self._runs and (len(self._runs) > MAX_STREAMS or self._size > MAX_TOTAL_BYTES):
            self.forget(next(iter(self._runs)))

    def forget(self, path: str) -> None:
        """Know nothing of ``path``'s stream any more."""
        run = self._runs.pop(path, None)
        if run is not None:
            self._size -= run.size
        self._own.pop(path, None)

    def pin(self, path: str, offset: str) -> int | None:
        """The stream id to fold a view of ``path`` cached at ``offset`` (its wake's end) from
        later, if the run holds that position and this worker's own commit extended it last
        (else ``None``: that view's next claim reads). Drops what the run held up to there."""
        run = self._runs.get(path)
        if run is None or self._own.get(path) != run.stream_id:
            return None
        position = _position(offset)
        if not run.base <= position <= run.end:
            return None
        self._size -= run.trim(position)
        return run.stream_id

    def after(self, path: str, offset: str, stream_id: int, token: bytes) -> list[Message] | None:
        """The messages of ``path``'s stream after ``offset`` as far as they are known, if the
        run is of stream ``stream_id``, holds ``offset`` and every message the pending mark
        ``token`` stands for; else ``None`` (read the stream)."""
        run = self._runs.get(path)
        position = _position(offset)
        if (
            run is None
            or run.stream_id != stream_id
            or not run.base <= position <= run.end
            or run.marks.get(token, run.end + 1) > run.end
        ):
            self.counts["read"] += 1
            return None
        self.counts["known"] += 1
        return [
            Message(format_offset(at), data)
            for at, data in enumerate(run.messages[position - run.base :], position + 1)
        ]


def pending_marks(calls: Sequence[Sequence[Op]]) -> list[tuple[str, bytes]]:
    """The pending marks ``calls`` wrote: ``(url, token)``."""
    return [
        (op.key, op.value)
        for ops in calls
        for op in ops
        if isinstance(op, KvPut) and op.namespace == PENDING_NS and op.value is not None
    ]


def _position(offset: str) -> int:
    position = parse_offset(offset)
    assert position is not None  # a wake's offsets are positions, never "now"
    return position
