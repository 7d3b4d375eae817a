"""sync=gossip on 3 real ranks (gloo, 127.0.0.1): a ring round preserves the mean over ranks
and shrinks the consensus distance; the exchange is with the two neighbours only.
(With 3 ranks the ring's neighbourhoods are everyone, so one round is the exact mean.)"""

from __future__ import annotations

import torch

from rlfuse.plugins.sync.gossip import neighbours


def test_ring_neighbours():
    assert neighbours(0, 4, "ring") == [1, 3]
    assert neighbours(1, 2, "ring") == [0]
    assert neighbours(2, 3, "full") == [0, 1]


def test_gossip_ring_preserves_mean_and_shrinks_distance(sync_checks):
    before = torch.tensor([r["gossip"]["before"] for r in sync_checks])  # (ranks, N)
    after = torch.tensor([r["gossip"]["after"] for r in sync_checks])
    torch.testing.assert_close(after.mean(0), before.mean(0), rtol=0, atol=1e-6)
    spread = lambda x: float((x - x.mean(0)).pow(2).sum())  # noqa: E731
    assert spread(after) < 0.5 * spread(before)
    # 3 ranks on a ring: everyone's neighbours are everyone -> exact mean in one round
    torch.testing.assert_close(after, before.mean(0).expand_as(after), rtol=0, atol=1e-6)
    m = sync_checks[0]["gossip"]["metrics"]
    n = before.shape[1]
    assert m["sync/participants"] == 3
    assert m["sync/bytes"] == 2 * n * 4 + 2 * 3 * 4  # to two neighbours, fp32 (+ two 3-flag agreements)
    assert m["consensus/param_distance"] > 0
