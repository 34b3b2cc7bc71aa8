"""The built-in approximate-time synchronizer, alone and against message_filters' own.

The behaviour tests pin down the pairing rule; the comparison feeds the same random
arrival sequences to message_filters.ApproximateTimeSynchronizer (where importable) and
asserts identical output, which is what "the same semantics" means.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from dense_match_ros.ros.sync import ApproximateTimeSynchronizer

MS = 1_000_000


def _msg(stamp_ns: int, tag: str = ''):
    stamp = SimpleNamespace(sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
    return SimpleNamespace(header=SimpleNamespace(stamp=stamp), tag=tag)


def _run(sync_cls_factory, events):
    out = []
    sync = sync_cls_factory(out)
    for index, stamp in events:
        sync(index, _msg(stamp, f'{index}@{stamp}'))
    return [tuple(m.tag for m in group) for group in out]


def _builtin(n, queue, slop):
    def make(out):
        sync = ApproximateTimeSynchronizer(n, queue, slop, lambda *m: out.append(m))
        return sync.add
    return make


def test_pairs_within_slop_and_not_beyond():
    out = []
    sync = ApproximateTimeSynchronizer(2, 10, 0.02, lambda *m: out.append(m))
    sync.add(0, _msg(1000 * MS, 'a'))
    sync.add(1, _msg(1030 * MS, 'far'))      # 30 ms off: no pair
    assert out == []
    sync.add(1, _msg(1012 * MS, 'b'))        # 12 ms: pair (a, b)
    assert [(x.tag, y.tag) for x, y in out] == [('a', 'b')]
    sync.add(0, _msg(1050 * MS, 'c'))        # 'far' (20 ms away) is not < slop: no pair
    assert len(out) == 1
    sync.add(0, _msg(1045 * MS, 'd'))        # 15 ms from 'far'
    assert [(x.tag, y.tag) for x, y in out][-1] == ('d', 'far')
    assert list(sync.queues[0]) == [1050 * MS] and sync.queues[1] == {}


def test_nearest_candidate_wins_and_queue_size_drops_oldest():
    out = []
    sync = ApproximateTimeSynchronizer(2, 2, 0.05, lambda *m: out.append(m))
    for t, tag in ((100, 'x'), (110, 'y'), (120, 'z')):   # queue 2: 'x' is pushed out
        sync.add(1, _msg(t * MS, tag))
    assert sorted(sync.queues[1]) == [110 * MS, 120 * MS]
    sync.add(0, _msg(118 * MS, 'L'))
    assert [(a.tag, b.tag) for a, b in out] == [('L', 'z')]  # 2 ms beats 8 ms


def test_three_inputs_need_all():
    out = []
    sync = ApproximateTimeSynchronizer(3, 5, 0.01, lambda *m: out.append(m))
    sync.add(0, _msg(0, 'a'))
    sync.add(1, _msg(4 * MS, 'b'))
    assert out == []
    sync.add(2, _msg(8 * MS, 'c'))
    assert [tuple(m.tag for m in g) for g in out] == [('a', 'b', 'c')]


def test_invalid_arguments():
    for args in ((1, 5, 0.1), (2, 0, 0.1), (2, 5, -1.0)):
        with pytest.raises(ValueError):
            ApproximateTimeSynchronizer(*args)


def _random_events(rng: random.Random, n_inputs: int, count: int):
    events = []
    for k in range(count):
        base = 1_000_000_000 + k * 33 * MS
        for i in range(n_inputs):
            if rng.random() < 0.15:
                continue  # a dropped frame
            events.append((i, base + rng.randint(-15, 15) * MS + rng.randint(0, 999)))
    # Arrival order differs from stamp order by a little.
    events.sort(key=lambda e: e[1] + rng.randint(-20, 20) * MS)
    return events


@pytest.mark.parametrize('n_inputs,queue,slop', [(2, 10, 0.02), (2, 3, 0.01), (3, 5, 0.025)])
def test_same_output_as_message_filters(n_inputs, queue, slop):
    mf = pytest.importorskip('message_filters')
    from builtin_interfaces.msg import Time

    def make_mf(out):
        inputs = [mf.SimpleFilter() for _ in range(n_inputs)]
        sync = mf.ApproximateTimeSynchronizer(inputs, queue, slop)
        sync.registerCallback(lambda *m: out.append(m))

        def feed(index, msg):
            stamp = msg.header.stamp
            msg.header = SimpleNamespace(stamp=Time(sec=stamp.sec, nanosec=stamp.nanosec))
            inputs[index].signalMessage(msg)
        return feed

    rng = random.Random(n_inputs * 1000 + queue)
    total = 0
    for trial in range(20):
        events = _random_events(rng, n_inputs, 40)
        ours = _run(_builtin(n_inputs, queue, slop), events)
        theirs = _run(make_mf, events)
        assert ours == theirs, f'trial {trial}'
        total += len(ours)
    assert total > 100  # the sequences do produce sets
