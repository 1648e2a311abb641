"""Hypothesis strategies shared by the record and codec tests."""

from __future__ import annotations

from hypothesis import strategies as st

from kvcluster.core.dvvset import Clock, Entry
from kvcluster.core.record import Record, Sibling, live, tombstone

actors = st.text(st.characters(codec="utf-8"), max_size=12)
timestamps = st.integers(-(2**63), 2**64 - 1)
short_data = st.binary(max_size=40)


def siblings(data: st.SearchStrategy[bytes] = short_data) -> st.SearchStrategy[Sibling]:
    """Live versions holding ``data``, and tombstones."""
    return st.one_of(st.builds(live, data, timestamps), st.builds(tombstone, timestamps))


@st.composite
def records(
    draw: st.DrawFn,
    data: st.SearchStrategy[bytes] = short_data,
    max_counter: int = 2**40,
) -> Record:
    """Valid records: up to 5 actors with up to 4 values each (counters up to
    ``max_counter``), up to 3 anonymous values."""
    values = siblings(data)
    entries = []
    for actor in sorted(draw(st.sets(actors, max_size=5))):
        vals = draw(st.lists(values, max_size=4))
        counter = len(vals) + draw(st.integers(0, max_counter - len(vals)))
        entries.append(Entry(actor, counter, tuple(vals)))
    return Clock(tuple(entries), tuple(sorted(draw(st.sets(values, max_size=3)))))
