"""Weights into a model: from a Hugging Face directory of safetensors, or random (``dummy``).

Tensors are streamed one at a time with ``safe_open`` (memory-mapped, then copied into the model's
parameter on its device), so loading never holds a second full copy of the model. Checkpoint names
such as ``...self_attn.q_proj.weight`` are mapped onto merged parameters through the architecture's
``packed_modules_mapping``. A float8 checkpoint (:class:`Fp8Checkpoint`) loads its weights and scales
into linears built for it; its scale names (``weight_scale_inv`` or ``weight_scale``) both land in the
layer's ``weight_scale``. Each tensor arrives as a :class:`CheckpointSlice`, so a tensor-parallel rank
reads only the slices its weight loaders narrow it to.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from pagedserve.models.checkpoint_slice import CheckpointSlice
from pagedserve.models.layers.quantization import ACTIVATION_SCALE_SUFFIXES, FP8, Fp8Checkpoint
from pagedserve.models.registry import ModelArchitecture
from rich.progress import Progress
from safetensors import safe_open
from torch import nn

_PROGRESS_MIN_BYTES = 512 * 2**20  # show a progress bar for checkpoints larger than this
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {model_dir}; point the model at a directory "
            f"with weights, or use load_format=dummy for random weights"
        )
    return files


def load_weights(
    model: ModelArchitecture,
    model_dir: Path,
    *,
    show_progress: bool = True,
    checkpoint: Fp8Checkpoint | None = None,
) -> None:
    files = safetensors_files(model_dir)
    params = dict(model.named_parameters())
    loaded: Counter[str] = Counter()
    show = show_progress and sum(f.stat().st_size for f in files) > _PROGRESS_MIN_BYTES
    with Progress(transient=True, disable=not show) as progress:
        task = progress.add_task(f"loading {model_dir.name}", total=_count_tensors(files))
        for name, tensor in _iter_tensors(files):
            progress.advance(task)
            loaded.update(_load_one(model, params, name, tensor, checkpoint))
    _check_complete(model, params, loaded)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights, reproducible from ``seed``: N(0, 0.02) matrices, unit norms, zero biases."""
    for name, param in model.named_parameters():
        generator = torch.Generator(device=param.device).manual_seed(seed + _stable_hash(name))
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith(".bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, 0.02, generator=generator)


def _stable_hash(text: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(text)) % 1_000_003


def _count_tensors(files: list[Path]) -> int:
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            total += len(list(f.keys()))
    return total


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, CheckpointSlice]]:
    """Each tensor as a lazy slice: a tensor-parallel rank reads only the rows it keeps."""
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                yield name, CheckpointSlice(f.get_slice(name))


def _load_one(
    model: ModelArchitecture,
    params: dict[str, nn.Parameter],
    name: str,
    tensor: CheckpointSlice,
    checkpoint: Fp8Checkpoint | None,
) -> list[str]:
    """The parameters ``name`` filled (a full-precision weight of a float8 layer fills its scale too)."""
    if name.endswith(_IGNORED_SUFFIXES):
        return []
    if checkpoint is not None and name.endswith(ACTIVATION_SCALE_SUFFIXES):
        return []  # static activation scales: activations are quantized per token instead
    own_name = name if checkpoint is None else _scale_name(name, checkpoint)
    target, shard_id = _map_name(own_name, model.packed_modules_mapping)
    param = params.get(target)
    if param is None:
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            return []  # tied to the embedding, which is loaded under its own name
        raise KeyError(f"checkpoint tensor {name!r} has no matching parameter in {type(model).__name__}")
    _check_float8(name, tensor, param)
    loader = getattr(param, "weight_loader", None)
    try:
        if loader is None:
            param.data.copy_(tensor)
        else:
            loader(param, tensor, shard_id)
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"checkpoint tensor {name!r} {list(tensor.shape)}: {error}") from None
    if param.dtype == FP8 and tensor.dtype != FP8:
        return [target, target.removesuffix("weight") + "weight_scale"]
    return [target]


def _scale_name(name: str, checkpoint: Fp8Checkpoint) -> str:
    for suffix in checkpoint.scale_suffixes:
        if name.endswith(suffix):
            return name.removesuffix(suffix) + ".weight_scale"
    return name


def _check_float8(name: str, tensor: CheckpointSlice, param: nn.Parameter) -> None:
    if tensor.dtype.is_floating_point and tensor.dtype.itemsize == 1 and tensor.dtype != param.dtype:
        raise ValueError(
            f"checkpoint tensor {name!r} is {tensor.dtype} but the model expects {param.dtype}: "
            f"float8 weights load only as float8_e4m3fn, described by a quantization_config "
            f"(quant_method 'fp8' or 'compressed-tensors') in config.json"
        )


def _map_name(name: str, mapping: dict[str, tuple[str, str | int]]) -> tuple[str, str | int | None]:
    for checkpoint_name, (merged_name, shard_id) in mapping.items():
        part = f".{checkpoint_name}."
        if part in name:
            return name.replace(part, f".{merged_name}."), shard_id
    return name, None


def _check_complete(model: ModelArchitecture, params: dict[str, nn.Parameter], loaded: Counter[str]) -> None:
    shards_per_param = Counter(merged for merged, _ in model.packed_modules_mapping.values())
    missing = []
    for name in params:
        module_name = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
        expected = shards_per_param.get(module_name, 1)
        if loaded[name] < expected:
            missing.append(name)
    if missing:
        raise ValueError(
            f"the checkpoint is missing weights for {len(missing)} parameters, e.g. {missing[:5]}"
        )
