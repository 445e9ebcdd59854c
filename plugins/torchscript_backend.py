"""The ``torchscript`` backend (Triton's ``pytorch_libtorch`` platform): runs a ``torch.jit`` file.

Inputs are passed to ``forward`` positionally in config order; the module returns one tensor or a
tuple/list of tensors, mapped to the config's outputs in order. With ``max_batch_size > 0`` the
requests of a batch are concatenated along dim 0, run once, and split back. The file is
``default_model_filename`` (default ``model.pt``) under ``<yaml folder>/<version>/`` when that exists,
else under the YAML's folder; a name leading outside that folder is refused. torch is imported on load
only, so listing plugins stays cheap.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pagedserve.backend import LoadContext, Model, ModelBackend, ModelSpec, enum_name
from pagedserve.errors import InferenceError
from pagedserve.hookspecs import hookimpl
from pagedserve.inference import InferenceRequest, InferenceResponse

if TYPE_CHECKING:
    import torch
    from pagedserve.protocol import model_config_pb2

log = logging.getLogger(__name__)

_DEFAULT_FILENAME = "model.pt"
# Config datatype -> torch dtype attribute name. BF16 travels as raw 16-bit words in numpy.
_TORCH_DTYPES = {
    "TYPE_BOOL": "bool",
    "TYPE_UINT8": "uint8",
    "TYPE_UINT16": "uint16",
    "TYPE_UINT32": "uint32",
    "TYPE_UINT64": "uint64",
    "TYPE_INT8": "int8",
    "TYPE_INT16": "int16",
    "TYPE_INT32": "int32",
    "TYPE_INT64": "int64",
    "TYPE_FP16": "float16",
    "TYPE_FP32": "float32",
    "TYPE_FP64": "float64",
    "TYPE_BF16": "bfloat16",
}


def _check_types(config: model_config_pb2.ModelConfig) -> None:
    for kind, tensors in (("input", config.input), ("output", config.output)):
        for tensor in tensors:
            type_name = enum_name(tensor, "data_type")
            if type_name not in _TORCH_DTYPES:
                raise ValueError(
                    f"torchscript backend does not support {type_name} for {kind} '{tensor.name}' "
                    f"(supported: {', '.join(_TORCH_DTYPES)})"
                )


def model_path(spec: ModelSpec, version: int) -> Path:
    filename = spec.config.default_model_filename or _DEFAULT_FILENAME
    what = "default_model_filename"
    candidates = [spec.model_file(f"{version}/{filename}", what), spec.model_file(filename, what)]
    for path in candidates:
        if path.is_file():
            return path
    raise ValueError(
        f"model '{spec.name}' version {version}: TorchScript file not found (looked for "
        f"{', '.join(str(p) for p in candidates)})"
    )


def _device(spec: ModelSpec) -> torch.device:
    import torch

    kinds = {enum_name(group, "kind") for group in spec.config.instance_group} or {"KIND_AUTO"}
    if kinds & {"KIND_GPU", "KIND_AUTO"} and torch.cuda.is_available():
        gpus = [gpu for group in spec.config.instance_group for gpu in group.gpus]
        return torch.device("cuda", gpus[0] if gpus else 0)
    if "KIND_GPU" in kinds:
        log.warning("model '%s' asks for KIND_GPU but CUDA is not available; running on the CPU", spec.name)
    return torch.device("cpu")


class TorchScriptModel(Model):
    def __init__(self, spec: ModelSpec, module: Any, device: torch.device) -> None:
        import torch

        self.spec = spec
        self.module = module
        self.device = device
        self._batching = spec.config.max_batch_size > 0
        self._inputs = [
            (t.name, getattr(torch, _TORCH_DTYPES[enum_name(t, "data_type")])) for t in spec.config.input
        ]
        self._outputs = [
            (t.name, enum_name(t, "data_type"), getattr(torch, _TORCH_DTYPES[enum_name(t, "data_type")]))
            for t in spec.config.output
        ]

    def execute(self, requests: list[InferenceRequest]) -> None:
        for group in self._groups(requests):
            try:
                outputs = self._run(group)
            except Exception as error:  # noqa: BLE001 - one bad group must not fail the others
                if not isinstance(error, InferenceError):
                    error = InferenceError.internal(f"torchscript model '{self.spec.name}': {error}")
                for request in group:
                    request.responder.send(InferenceResponse(error=error), final=True)
                continue
            self._respond(group, outputs)

    def _groups(self, requests: list[InferenceRequest]) -> list[list[InferenceRequest]]:
        """Requests that can share one forward call: same shapes past the batch dimension."""
        if not self._batching:
            return [[request] for request in requests]
        groups: dict[tuple, list[InferenceRequest]] = {}
        for request in requests:
            key = tuple(
                request.inputs[name].shape[1:] if name in request.inputs else None for name, _ in self._inputs
            )
            groups.setdefault(key, []).append(request)
        return list(groups.values())

    def _run(self, group: list[InferenceRequest]) -> list[np.ndarray]:
        import torch

        arguments = []
        for name, dtype in self._inputs:
            if any(name not in request.inputs for request in group):
                raise InferenceError(f"torchscript model '{self.spec.name}' needs input '{name}'")
            arrays = [request.inputs[name] for request in group]
            array = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
            arguments.append(_to_torch(array, dtype).to(self.device))
        with torch.inference_mode():
            result = self.module(*arguments)
        tensors = list(result) if isinstance(result, tuple | list) else [result]
        if len(tensors) != len(self._outputs) or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise InferenceError.internal(
                f"torchscript model '{self.spec.name}' returned {len(tensors)} value(s); the config declares "
                f"{len(self._outputs)} output tensor(s)"
            )
        arrays = [
            self._to_numpy(tensor, output) for tensor, output in zip(tensors, self._outputs, strict=True)
        ]
        total = sum(request.batch_size for request in group)
        for (name, _, _), array in zip(self._outputs, arrays, strict=True):
            if self._batching and (array.ndim == 0 or array.shape[0] != total):
                raise InferenceError.internal(
                    f"torchscript model '{self.spec.name}' returned output '{name}' with shape "
                    f"{list(array.shape)}; expected a leading batch dimension of {total}"
                )
        return arrays

    def _to_numpy(self, tensor: torch.Tensor, output: tuple[str, str, torch.dtype]) -> np.ndarray:
        import torch

        name, type_name, dtype = output
        if tensor.dtype != dtype:
            raise InferenceError.internal(
                f"torchscript model '{self.spec.name}' produced {tensor.dtype} for output '{name}', "
                f"but the config declares {type_name}"
            )
        tensor = tensor.detach().cpu().contiguous()
        if dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(np.uint16)
        return tensor.numpy()

    def _respond(self, group: list[InferenceRequest], outputs: list[np.ndarray]) -> None:
        offset = 0
        for request in group:
            size = request.batch_size if self._batching else 0
            pieces = {}
            for (name, _, _), array in zip(self._outputs, outputs, strict=True):
                pieces[name] = array[offset : offset + size] if self._batching else array
            offset += size
            wanted = {name: pieces[name] for name in request.requested_outputs if name in pieces}
            request.responder.send(InferenceResponse(outputs=wanted), final=True)

    def memory_bytes(self) -> dict[str, int]:
        tensors = [*self.module.parameters(), *self.module.buffers()]
        total = sum(t.numel() * t.element_size() for t in tensors)
        return {"GPU" if self.device.type == "cuda" else "CPU": total} if total else {}


def _to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    import torch

    array = np.ascontiguousarray(array)
    if dtype == torch.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


class TorchScriptBackend(ModelBackend):
    """``backend: torchscript`` (or ``platform: pytorch_libtorch``)."""

    name: ClassVar[str] = "torchscript"

    @classmethod
    def auto_complete(cls, config: model_config_pb2.ModelConfig) -> None:
        _check_types(config)

    def load(self, spec: ModelSpec, context: LoadContext) -> Model:
        import torch

        _check_types(spec.config)
        path = model_path(spec, context.version)
        device = _device(spec)
        with warnings.catch_warnings():
            # TorchScript is exactly what Triton's pytorch_libtorch platform serves; torch's advice to
            # move to torch.export is for the model's author, not something a server log can act on.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location=device)
        module.eval()
        return TorchScriptModel(spec, module, device)


@hookimpl
def pagedserve_model_backends() -> list[type[ModelBackend]]:
    return [TorchScriptBackend]
