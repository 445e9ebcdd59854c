"""A stream that falls behind gets its queued outputs folded into one response, losing nothing."""

from __future__ import annotations

from pagedserve.engine.outputs import CompletionOutput, RequestOutput
from pagedserve_plugins.llm_backend import StreamPacer, coalesce


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


class _Client:
    """What the pacer asks about each stream: how many of its responses are still unwritten."""

    def __init__(self) -> None:
        self.unwritten: dict[str, int] = {}

    def may_wait(self, active: object, output: RequestOutput) -> bool:
        return not output.finished and self.unwritten.get(output.request_id, 0) > 0


def test_pacer_holds_a_stream_behind_its_unwritten_response_and_folds_the_next_in():
    client, a, b = _Client(), object(), object()
    pacer = StreamPacer(client.may_wait)
    client.unwritten["a"] = 1
    ready = pacer.pace([(a, _output("a", [5], "x", [5], "x")), (b, _output("b", [7], "q", [7], "q"))])
    assert [active for active, _ in ready] == [b] and pacer.holding
    assert pacer.pace([(a, _output("a", [5, 6], "xy", [6], "y"))]) == []
    client.unwritten["a"] = 0  # the client took its response
    [(active, output)] = pacer.pace([])
    assert active is a and not pacer.holding
    out = output.outputs[0]
    assert (out.text_delta, out.num_new_tokens, out.token_ids) == ("xy", 2, [5, 6])


def test_pacer_never_holds_the_last_output_and_merges_what_it_held_into_it():
    client, a = _Client(), object()
    pacer = StreamPacer(client.may_wait)
    client.unwritten["a"] = 1
    assert pacer.pace([(a, _output("a", [5], "x", [5], "x"))]) == []
    [(_, output)] = pacer.pace([(a, _output("a", [5, 6], "xy", [6], "y", finished=True))])
    assert output.finished and output.outputs[0].text_delta == "xy" and not pacer.holding


def test_pacer_stop_releases_everything_before_the_marker():
    client, a = _Client(), object()
    pacer = StreamPacer(client.may_wait)
    client.unwritten["a"] = 1
    assert pacer.pace([(a, _output("a", [5], "x", [5], "x"))]) == []
    ready = pacer.pace([None])
    assert ready[-1] == (None, None) and ready[0][1].outputs[0].text_delta == "x"
