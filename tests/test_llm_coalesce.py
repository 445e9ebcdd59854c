"""A stream that falls behind gets its queued outputs folded into one response, losing nothing."""

from __future__ import annotations

from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve_plugins.llm_backend import coalesce


def _output(
    rid: str, ids: list[int], text: str, new: list[int], delta: str, finished: bool = False
) -> RequestOutput:
    completion = CompletionOutput(0, text, delta, ids, len(new), finish_reason="length" if finished else None)
    return RequestOutput(rid, [1, 2], [completion], finished)


def test_queued_outputs_of_one_request_merge_in_order():
    a, b = object(), object()
    items = [
        (a, _output("a", [5], "x", [5], "x")),
        (b, _output("b", [7], "q", [7], "q")),
        (a, _output("a", [5, 6], "xy", [6], "y")),
        (a, _output("a", [5, 6, 9], "xyz", [9], "z", finished=True)),
    ]
    merged = coalesce(items)
    assert [active for active, _ in merged] == [a, b]
    out = merged[0][1].outputs[0]
    assert (out.text_delta, out.num_new_tokens, out.token_ids, out.text) == ("xyz", 3, [5, 6, 9], "xyz")
    assert merged[0][1].finished
    assert merged[1][1].outputs[0].text_delta == "q"


def test_stop_sentinel_comes_last_and_drops_nothing_before_it():
    a = object()
    merged = coalesce(
        [(a, _output("a", [5], "x", [5], "x")), None, (a, _output("a", [5, 6], "xy", [6], "y"))]
    )
    assert merged[-1] == (None, None) and merged[0][1].outputs[0].text_delta == "x"
