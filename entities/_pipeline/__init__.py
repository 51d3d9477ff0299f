"""The wake pipeline: how an event becomes a handler run and its committed effects.

One module per stage, in the order a wake goes through them (DESIGN §4):

1. :mod:`.inbox`: anything that should wake an entity (a message, a child's finish, an observed
   change, a timer) is appended to the entity's stream and the entity is marked pending, in one
   transaction. This is the only place those two writes are made; spawns are made here too.
2. :mod:`.fire`: due timers (delayed sends, cron ticks, debounce and quiet-period wakes) are
   fired exactly once, each delivering through the inbox.
3. :mod:`.claim` (ordered by :mod:`.affinity`): a worker takes a pending entity with a lease,
   a compare-and-set of its record that bumps the fencing epoch and fixes the wake's range.
4. :mod:`.load`: the range's events and the entity's view at its end, folded with ``streams``'
   :class:`~streams.Materializer` from a cached view or a snapshot; the
   :class:`~entities.WakeEvent` the handler gets.
5. (the handler runs, buffering its effects: :mod:`entities._effects`, driven by
   :mod:`entities._worker`)
6. :mod:`.commit`: the outcome as one transaction checked against the claimed record: effects,
   run record, acknowledged offset and lease release, or a failed attempt and its retry time.
7. :mod:`.deliver`: inside that commit, what it owes others: the parent's ``finished_child``
   wake, observers' wakes, shared-db writes.

Stages take a :class:`~streams.Store` and plain values (records, effects, views), never a
:class:`~entities.Runtime` or a :class:`~entities.HandlerContext`; the worker loop
(:mod:`entities._worker`) strings them together and the runtime (:mod:`entities._runtime`)
offers them to Python, the CLI and HTTP.
"""
