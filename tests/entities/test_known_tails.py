"""A worker's known tails (``entities._pipeline.known``): a claim folds the messages this
process's commits appended only when they follow its cached view without a gap, are of the
stream its own commit last extended, and hold the message its pending mark stands for."""

from __future__ import annotations

from entities._pipeline import known
from entities._pipeline.known import KnownTails, pending_marks
from entities._records import PENDING_NS
from streams import Append, Committed, KvPut, Message, Op, format_offset

URL, PATH = "/desk/a", "desk/a/main"


def _commit(
    appended: list[tuple[int, bytes]],
    *,
    sid: int = 1,
    token: bytes | None = None,
    path: str = PATH,
    url: str = URL,
    rewritten: frozenset[str] = frozenset(),
) -> Committed:
    ops: list[Op] = [Append(path, [data for _position, data in appended])]
    if token is not None:
        ops.append(KvPut(PENDING_NS, url, token))
    return Committed(
        [ops],
        {path},
        [(path, sid, position, data) for position, data in appended],
        rewritten,
    )


def _learn(tails: KnownTails, committed: Committed, *, own: bool) -> None:
    tails.learn(committed, pending_marks(committed.calls), own=own)


def _offsets(messages: list[Message] | None) -> list[str]:
    assert messages is not None
    return [m.offset for m in messages]


def _warm(tails: KnownTails) -> int:
    """A send at position 5 (marked t1), the wake that took it appends 6 and 7; its view is
    cached at 5. Returns the pinned stream id."""
    _learn(tails, _commit([(5, b"m5")], token=b"t1"), own=False)
    _learn(tails, _commit([(6, b"o6"), (7, b"o7")]), own=True)
    pinned = tails.pin(PATH, format_offset(5))
    assert pinned == 1
    return pinned


def test_a_claim_folds_the_messages_after_its_view_up_to_its_mark() -> None:
    tails = KnownTails()
    sid = _warm(tails)
    _learn(tails, _commit([(8, b"m8")], token=b"t2"), own=False)
    got = tails.after(PATH, format_offset(5), sid, b"t2")
    assert _offsets(got) == [format_offset(p) for p in (6, 7, 8)]
    assert got is not None and [m.data for m in got] == [b"o6", b"o7", b"m8"]
    # a mark nobody handed over (found by a scan, written elsewhere): read
    assert tails.after(PATH, format_offset(5), sid, b"elsewhere") is None
    # an offset the run does not hold
    assert tails.after(PATH, format_offset(3), sid, b"t2") is None
    assert tails.counts == {"known": 1, "read": 2}


def test_a_gap_in_positions_means_reading() -> None:
    tails = KnownTails()
    sid = _warm(tails)
    _learn(tails, _commit([(9, b"m9")], token=b"t3"), own=False)  # 8: another process's
    assert tails.after(PATH, format_offset(5), sid, b"t3") is None
    assert tails.after(PATH, format_offset(8), sid, b"t3") is not None  # from 8 on: known


def test_another_stream_at_the_same_path_is_never_folded() -> None:
    tails = KnownTails()
    sid = _warm(tails)
    # the entity purged and spawned again: positions counted anew, another stream id
    _learn(tails, _commit([(8, b"x8")], sid=2, token=b"t2"), own=False)
    assert tails.after(PATH, format_offset(5), sid, b"t2") is None
    assert tails.after(PATH, format_offset(7), 2, b"t2") is not None
    # a view pins only a run this worker's own commit extended last
    assert tails.pin(PATH, format_offset(7)) is None
    _learn(tails, _commit([(9, b"o9")], sid=2), own=True)
    assert tails.pin(PATH, format_offset(8)) == 2


def test_created_deleted_or_cut_streams_are_forgotten() -> None:
    tails = KnownTails()
    sid = _warm(tails)
    _learn(tails, Committed([], {PATH}, [], frozenset({PATH})), own=False)
    assert len(tails) == 0
    assert tails.after(PATH, format_offset(5), sid, b"t1") is None
    assert tails.pin(PATH, format_offset(5)) is None


def test_only_entities_wake_ups_and_own_commits_are_kept() -> None:
    tails = KnownTails()
    _learn(tails, _commit([(1, b"u1")], path="user/stream"), own=False)  # no mark: not a wake-up
    assert len(tails) == 0
    _learn(tails, _commit([(1, b"u1")], path="user/stream"), own=True)
    assert len(tails) == 1


def test_a_busy_stream_is_dropped() -> None:
    tails = KnownTails()
    _warm(tails)
    many = [(p, b"d") for p in range(8, 9 + known.MAX_MESSAGES)]
    _learn(tails, _commit(many), own=True)
    assert len(tails) == 0
    _learn(tails, _commit([(1, b"x" * (known.MAX_BYTES + 1))], path="b/b/main"), own=True)
    assert len(tails) == 0
