"""After a large final response the responder gives freed memory back to the OS (glibc keeps it
otherwise), whichever encoder made the response's message: its size is read from the tensors."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from pagedserve import responder as responder_module
from pagedserve.inference import InferenceRequest, InferenceResponse
from pagedserve.responder import ServerResponder
from pagedserve.statistics import ModelStats


def _json_like_encoder(spec: Any, request: Any, response: Any, options: Any) -> object:
    return object()  # neither protobuf nor serialized: as the HTTP front-end's JSON body


@pytest.mark.parametrize(("output_bytes", "trims"), [(1024, 0), (32 * 2**20, 1)])
def test_a_large_output_returns_freed_memory(
    monkeypatch: pytest.MonkeyPatch, output_bytes: int, trims: int
) -> None:
    trimmed: list[None] = []
    monkeypatch.setattr(responder_module, "_return_freed_memory", lambda: trimmed.append(None))
    loaded = SimpleNamespace(spec=SimpleNamespace(name="m"), stats=ModelStats(), release=lambda: None)
    mailbox = SimpleNamespace(post=lambda deliver, delivery, early: deliver(delivery))
    delivered: list[Any] = []
    responder = ServerResponder(mailbox, loaded, delivered.append, _json_like_encoder)  # type: ignore[arg-type]
    responder.request = InferenceRequest(
        model_name="m",
        model_version=1,
        inputs={"IN": np.zeros(4, np.uint8)},
        requested_outputs=["OUT"],
        responder=responder,
    )
    responder.send(InferenceResponse(outputs={"OUT": np.zeros(output_bytes, np.uint8)}), final=True)
    assert len(delivered) == 1 and delivered[0].error is None
    assert len(trimmed) == trims
