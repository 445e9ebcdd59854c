"""``simple_identity`` and ``identity_fp32``: each output is the input at the same position."""

from __future__ import annotations

from pagedserve.inference import InferenceRequest, InferenceResponse
from pagedserve_plugins.python_backend import PythonModelArgs


class IdentityModel:
    """Returns its inputs unchanged (any type, BYTES included), pairing the config's inputs and
    outputs by position."""

    def initialize(self, args: PythonModelArgs) -> None:
        config = args.model_config
        if len(config.input) != len(config.output):
            raise ValueError(
                f"identity model '{args.model_name}' needs as many outputs as inputs, "
                f"got {len(config.input)} and {len(config.output)}"
            )
        self.pairs = [(i.name, o.name) for i, o in zip(config.input, config.output, strict=True)]

    def execute(self, requests: list[InferenceRequest]) -> list[InferenceResponse]:
        return [
            InferenceResponse(
                outputs={out: request.inputs[name] for name, out in self.pairs if name in request.inputs}
            )
            for request in requests
        ]
