"""Which captured decode graph a batch runs on: the smallest that fits, unless a larger one replays
measurably faster (pure routing logic; the graphs themselves are covered by the GPU parity tests)."""

from __future__ import annotations

import pytest
from pagedserve.engine.cuda_graphs import DecodeGraphs, fastest_at_or_above


@pytest.mark.parametrize(
    ("times", "route"),
    [
        ([1.0, 1.1, 1.2, 1.3], [0, 1, 2, 3]),  # growing with size: every graph keeps its batches
        ([1.0, 1.1, 2.0, 1.5], [0, 1, 3, 3]),  # a slow size hands its batches to the faster larger one
        ([3.0, 2.5, 2.0], [2, 2, 2]),  # chains to the fastest of the larger ones
        ([1.0, 0.98], [0, 1]),  # 2% faster is within timing noise
        ([1.0, 0.9], [1, 1]),
        ([5.0], [0]),
    ],
)
def test_route_prefers_a_larger_graph_only_when_it_is_faster_by_the_margin(times, route):
    assert fastest_at_or_above(times) == route


def test_size_for_follows_the_route():
    graphs = DecodeGraphs(model=None, buffers=None, sizes=[16, 32, 48, 64])  # type: ignore[arg-type]
    assert [graphs.size_for(n) for n in (1, 16, 17, 33, 48, 64, 65)] == [16, 16, 32, 48, 48, 64, None]
    graphs.route = fastest_at_or_above([1.0, 1.1, 2.0, 1.5])
    assert [graphs.size_for(n) for n in (1, 16, 17, 33, 48, 64, 65)] == [16, 16, 32, 64, 64, 64, None]
    assert graphs.rerouted() == {48: 64}
