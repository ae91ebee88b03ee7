"""cluster.py's CpuShare on constructed /proc/stat readings: the thread count is the cores that
other processes leave free, between 1 and what torch started with; a user's OMP_NUM_THREADS is
left alone. (Ranks, collectives and run_cli are exercised end to end by test_train.py.)"""
import pytest
import torch

import cluster


@pytest.fixture
def share(monkeypatch):
    """A CpuShare on 2 cores whose readings come from `feed` (wall s, machine busy s, own CPU s)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cluster.os.path, "exists", lambda p: True)
    before = torch.get_num_threads()
    feed = [(0.0, 0.0, 0.0)]
    monkeypatch.setattr(cluster.CpuShare, "read", staticmethod(lambda: feed.pop(0)))
    monkeypatch.setattr(cluster.time, "sleep", lambda s: None)
    torch.set_num_threads(2)
    feed.append((0.25, 0.0, 0.0))  # the first look: nothing else busy
    s = cluster.CpuShare(interval=2.0)
    s.cores, s.feed = 2, feed
    yield s
    torch.set_num_threads(before)


def test_threads_follow_the_cores_others_leave(share):
    assert torch.get_num_threads() == 2
    share.feed.append((1.0, 1.5, 1.5))  # before the interval: no new count
    assert share.adjust() == 2 and len(share.feed) == 0
    for wall, busy, own, want in [(3.25, 6.0, 3.0, 1),    # 3 s: the machine busy 6 core-s, we 3: one core taken
                                  (5.25, 10.0, 5.0, 1),   # still
                                  (7.25, 12.0, 7.0, 2),   # the other process ended: both cores ours again
                                  (9.25, 14.3, 8.9, 2)]:  # 0.2 of a core elsewhere: rounds to none
        share.feed.append((wall, busy, own))
        assert share.adjust() == want and torch.get_num_threads() == want, (wall, want)


def test_never_more_than_torch_started_with_nor_below_one(share):
    share.max_threads = 1
    share.feed.append((3.25, 0.0, 0.0))
    assert share.adjust() == 1
    share.max_threads = 2
    share.feed.append((5.25, 8.0, 0.0))  # 4 cores' worth busy elsewhere (a bigger machine's reading)
    assert share.adjust() == 1


def test_a_users_thread_count_is_left_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    before = torch.get_num_threads()
    s = cluster.CpuShare()
    assert not s.enabled and s.adjust() == before == torch.get_num_threads()
