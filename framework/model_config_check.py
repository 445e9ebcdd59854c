"""Model config validation: a config is checked completely when the model loads, not when a request
first trips over it, and a config override from the network cannot choose code or files.

Four entry points, each raising ``ValueError`` whose text names the offending field:

* :func:`parse_override` bounds and parses the JSON of a RepositoryModelLoad ``config`` parameter;
* :func:`contain_override` keeps an override away from what decides which code runs and which files
  are read: the repository's operator decides those, a network client only tunes the model;
* :func:`check_model_config` validates a whole ``ModelConfig`` (names, types, dims, batching, instance
  groups), following Triton's ``ValidateModelConfig`` rules plus bounds on sizes;
* :func:`check_parameters` refuses ``parameters`` a backend does not read (a misspelled switch would
  otherwise be ignored without a word), for backends whose parameters are a fixed set.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from google.protobuf.descriptor import FieldDescriptor
from pagedserve.protocol import model_config_pb2 as mc

if TYPE_CHECKING:
    from google.protobuf.message import Message

# Bounds: generous for any real model, small enough that a config cannot exhaust the server.
MAX_CONFIG_BYTES = 1 << 20
MAX_OVERRIDE_DEPTH = 32
MAX_VERSIONS = 64
MAX_BATCH_SIZE = 1 << 20
MAX_TENSORS = 1024
MAX_NAME_CHARS = 1024
MAX_DIMS = 32  # numpy's limit for years; no served model needs more
MAX_DIM = (1 << 31) - 1
MAX_INSTANCES_PER_GROUP = 64
MAX_INSTANCES = 128  # each instance is a worker thread (and, for python models, a user object)
MAX_PRIORITY_LEVELS = 1024  # each level is a queue
MAX_DURATION_US = 24 * 3600 * 1_000_000  # delays, timeouts and idle times: one day
WILDCARD_DIM = -1

# Parameters that pick code, files or the model to build (an LLM preset decides the memory it takes).
# The repository's YAML may set them; an override may not.
CODE_PARAMETERS = ("python_file", "python_class", "weights", "preset")
# pagedserve's own YAML keys: not ModelConfig fields, so never part of an override.
_REPOSITORY_KEYS = ("versions", "autoload")
# Values of a boolean parameter, compared without case ("True" and "TRUE" are "true").
BOOLEAN = ("true", "false")
_SHOWN_CHARS = 80  # of a refused key in an error message: a hostile key may be a megabyte


# -- the override's JSON ------------------------------------------------------------------------------


def parse_override(text: str) -> dict[str, Any]:
    """The override as a dict of top-level ModelConfig fields."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"config override is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
    try:
        override = json.loads(text)
    except RecursionError:
        raise ValueError(f"config override is nested deeper than {MAX_OVERRIDE_DEPTH} levels") from None
    except ValueError as error:  # JSONDecodeError, and lone surrogates
        raise ValueError(f"config override is not valid JSON: {error}") from None
    if not isinstance(override, dict):
        raise ValueError("config override must be a JSON object of ModelConfig fields")
    if _depth(override) > MAX_OVERRIDE_DEPTH:
        raise ValueError(f"config override is nested deeper than {MAX_OVERRIDE_DEPTH} levels")
    for key in _REPOSITORY_KEYS:
        if key in override:
            raise ValueError(f"'{key}' is not a ModelConfig field; a config override cannot change it")
    return override


def _depth(value: Any) -> int:
    """Nesting depth, counted without recursion (json.loads accepts ~1000 levels)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_OVERRIDE_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


# -- what an override may not touch -------------------------------------------------------------------


def contain_override(base: mc.ModelConfig, merged: mc.ModelConfig) -> None:
    """Check ``merged`` (the repository's config with an override applied) against ``base`` (the
    repository's own): the override may not add, change or drop code-loading and file fields, and a
    parameter value it sets must not name a path (a model's own code may open what its parameters
    name). The repository's code parameters are carried over when an override replaces
    ``parameters``, so a client may send back the config it read, with one field changed."""
    for key in CODE_PARAMETERS:
        if key in base.parameters and key not in merged.parameters:
            merged.parameters[key].CopyFrom(base.parameters[key])
    before, after = _code_and_files(base), _code_and_files(merged)
    for field, value in after.items():
        if value != before[field]:
            raise ValueError(
                f"a config override may not set or change '{field}': which code runs and which files "
                "it reads come from the model repository only"
            )
    for key, value in merged.parameters.items():
        if key in base.parameters and base.parameters[key] == value:
            continue
        if _names_a_path(value.string_value):
            raise ValueError(
                f"parameters.{key}: a config override may not set a value that names a file or directory "
                "(one with '/', '\\', a leading '~', or '..')"
            )


def _code_and_files(config: mc.ModelConfig) -> dict[str, object]:
    facts: dict[str, object] = {
        f"parameters.{key}": config.parameters[key].string_value if key in config.parameters else None
        for key in CODE_PARAMETERS
    }
    # The backend decides which plugin's code runs (a python backend, an LLM engine...).
    facts["backend"] = config.backend
    facts["platform"] = config.platform
    facts["default_model_filename"] = config.default_model_filename
    facts["cc_model_filenames"] = dict(config.cc_model_filenames)
    facts["runtime"] = config.runtime
    facts["model_repository_agents"] = config.model_repository_agents.SerializeToString(deterministic=True)
    facts["model_operations"] = config.model_operations.SerializeToString(deterministic=True)
    facts["model_warmup"] = [w.SerializeToString(deterministic=True) for w in config.model_warmup]
    facts["output label_filename"] = {o.name: o.label_filename for o in config.output if o.label_filename}
    return facts


def _names_a_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.startswith("~") or value in (".", "..")


# -- the whole config ---------------------------------------------------------------------------------


def check_model_config(config: mc.ModelConfig) -> None:
    """Validate ``config``; the first problem found is raised, naming its field."""
    _check_enums(config, "")
    if config.max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0, got {config.max_batch_size}")
    if config.max_batch_size > MAX_BATCH_SIZE:
        raise ValueError(f"max_batch_size is {config.max_batch_size}; the limit is {MAX_BATCH_SIZE}")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        if len(tensors) > MAX_TENSORS:
            raise ValueError(f"the config has {len(tensors)} {kind}s; the limit is {MAX_TENSORS}")
        seen: set[str] = set()
        for index, tensor in enumerate(tensors):
            _check_tensor(kind, index, tensor, config.max_batch_size)
            if tensor.name in seen:
                raise ValueError(f"{kind}[{index}]: the name '{tensor.name}' is used by two {kind}s")
            seen.add(tensor.name)
    _check_version_policy(config)
    _check_instance_groups(config)
    if config.HasField("dynamic_batching"):
        _check_dynamic_batching(config)
    if config.HasField("sequence_batching"):
        _check_sequence_batching(config)


def _check_enums(message: Message, path: str) -> None:
    """protobuf-JSON accepts any number for an enum; a value the enum does not define is refused here,
    before code that turns it into a name (``enum_name``) meets it."""
    for field, value in message.ListFields():
        where = f"{path}{field.name}"
        if field.type == FieldDescriptor.TYPE_ENUM:
            values = value if field.is_repeated else [value]
            for item in values:
                if item not in field.enum_type.values_by_number:
                    known = ", ".join(v.name for v in field.enum_type.values)
                    raise ValueError(f"{where}: {item} is not a known value (one of {known})")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                    for key, item in value.items():
                        _check_enums(item, f"{where}[{key!r}].")
            elif field.is_repeated:
                for index, item in enumerate(value):
                    _check_enums(item, f"{where}[{index}].")
            else:
                _check_enums(value, f"{where}.")


def _check_tensor(kind: str, index: int, tensor: Any, max_batch_size: int) -> None:
    if not tensor.name:
        raise ValueError(f"{kind}[{index}].name must be set")
    if len(tensor.name) > MAX_NAME_CHARS:
        raise ValueError(f"{kind}[{index}].name is longer than {MAX_NAME_CHARS} characters")
    if not tensor.name.isprintable():
        raise ValueError(f"{kind}[{index}].name {tensor.name!r} must not contain control characters")
    where = f"{kind}[{index}] '{tensor.name}'"
    if tensor.data_type == mc.TYPE_INVALID:
        types = ", ".join(name for name in mc.DataType.keys() if name != "TYPE_INVALID")  # noqa: SIM118
        raise ValueError(f"{where}: data_type must be set (one of {types})")
    if not tensor.dims:
        raise ValueError(f"{where}: dims must be set ([-1]: any length; [1] and reshape {{}}: a scalar)")
    _check_shape(f"{where}: dims", tensor.dims)
    if tensor.HasField("reshape"):
        _check_reshape(where, tensor, max_batch_size)
    if tensor.is_shape_tensor:
        raise ValueError(f"{where}: is_shape_tensor is only supported for TensorRT models")
    if tensor.is_non_linear_format_io:
        raise ValueError(f"{where}: is_non_linear_format_io is only supported for TensorRT models")
    image_formats = (mc.ModelInput.FORMAT_NHWC, mc.ModelInput.FORMAT_NCHW)
    if kind == "input" and tensor.format in image_formats and len(tensor.dims) != 3:
        raise ValueError(f"{where}: format NHWC/NCHW needs 3 dims, got {len(tensor.dims)}")


def _check_shape(where: str, dims: Any) -> None:
    if len(dims) > MAX_DIMS:
        raise ValueError(f"{where} has {len(dims)} dimensions; the limit is {MAX_DIMS}")
    for dim in dims:
        if (dim < 1 and dim != WILDCARD_DIM) or dim > MAX_DIM:
            raise ValueError(
                f"{where}: each dimension must be an integer in [1, {MAX_DIM}], or -1 for a variable-size "
                f"dimension; got {dim}"
            )


def _check_reshape(where: str, tensor: Any, max_batch_size: int) -> None:
    shape = tensor.reshape.shape
    if not shape and max_batch_size == 0:
        raise ValueError(
            f"{where}: reshape cannot be empty for a model without batching (max_batch_size 0): the "
            "tensor would be a scalar"
        )
    _check_shape(f"{where}: reshape.shape", shape)
    # Triton's rule: the runs of fixed dimensions between variable ones hold as many elements, so
    # [2, 4, -1, 6] may become [8, -1, 1, 6]; an empty reshape makes a one-element tensor a scalar.
    dims_runs, shape_runs = _runs(tensor.dims), _runs(shape)
    if not shape and dims_runs == [1]:
        return
    if len(dims_runs) != len(shape_runs):
        raise ValueError(f"{where}: dims and reshape.shape have different numbers of -1 dimensions")
    if dims_runs != shape_runs:
        raise ValueError(f"{where}: dims and reshape.shape hold different numbers of elements")


def _runs(dims: Any) -> list[int]:
    runs, current = [], 1
    for dim in dims:
        if dim == WILDCARD_DIM:
            runs.append(current)
            current = 1
        else:
            current *= dim
    return [*runs, current]


def _check_version_policy(config: mc.ModelConfig) -> None:
    if config.version_policy.WhichOneof("policy_choice") != "specific":
        return
    for version in config.version_policy.specific.versions:
        if version < 1:
            raise ValueError(f"version_policy.specific.versions: versions are integers >= 1, got {version}")


def _check_instance_groups(config: mc.ModelConfig) -> None:
    total = 0
    for index, group in enumerate(config.instance_group):
        where = f"instance_group[{index}]"
        if group.count < 0:
            raise ValueError(f"{where}.count must be >= 1 (0 or unset means 1), got {group.count}")
        if group.count > MAX_INSTANCES_PER_GROUP:
            raise ValueError(f"{where}.count is {group.count}; the limit is {MAX_INSTANCES_PER_GROUP}")
        if group.gpus and group.kind in (mc.ModelInstanceGroup.KIND_CPU, mc.ModelInstanceGroup.KIND_MODEL):
            kind = mc.ModelInstanceGroup.Kind.Name(group.kind)
            raise ValueError(f"{where}: kind {kind} must not list gpus")
        for gpu in group.gpus:
            if gpu < 0:
                raise ValueError(f"{where}.gpus: GPU ids are integers >= 0, got {gpu}")
        total += max(group.count, 1)
        if total > MAX_INSTANCES:
            raise ValueError(f"instance_group: more than {MAX_INSTANCES} instances in all groups")


def _check_duration(where: str, microseconds: int) -> None:
    if microseconds > MAX_DURATION_US:
        raise ValueError(f"{where} is {microseconds}; the limit is {MAX_DURATION_US} (one day)")


def _check_preferred(where: str, sizes: Any, max_batch_size: int) -> None:
    for size in sizes:
        if size <= 0:
            raise ValueError(f"{where}: sizes must be >= 1, got {size}")
        if size > max_batch_size:
            raise ValueError(f"{where}: {size} exceeds max_batch_size {max_batch_size}")


def _check_dynamic_batching(config: mc.ModelConfig) -> None:
    batching, where = config.dynamic_batching, "dynamic_batching"
    _check_preferred(f"{where}.preferred_batch_size", batching.preferred_batch_size, config.max_batch_size)
    _check_duration(f"{where}.max_queue_delay_microseconds", batching.max_queue_delay_microseconds)
    levels = batching.priority_levels
    if levels > MAX_PRIORITY_LEVELS:
        raise ValueError(f"{where}.priority_levels is {levels}; the limit is {MAX_PRIORITY_LEVELS}")
    if levels and not 1 <= batching.default_priority_level <= levels:
        raise ValueError(
            f"{where}.default_priority_level must be in [1, {levels}] when priority_levels is {levels}, "
            f"got {batching.default_priority_level}"
        )
    if batching.preserve_ordering and levels > 1:
        raise ValueError(f"{where}: preserve_ordering allows only one priority level")
    policies = {"default_queue_policy": batching.default_queue_policy}
    for level, policy in batching.priority_queue_policy.items():
        if not 1 <= level <= levels:
            raise ValueError(f"{where}.priority_queue_policy: level {level} is outside [1, {levels}]")
        policies[f"priority_queue_policy[{level}]"] = policy
    for name, policy in policies.items():
        timeout = policy.default_timeout_microseconds
        _check_duration(f"{where}.{name}.default_timeout_microseconds", timeout)
        if batching.preserve_ordering and timeout and policy.timeout_action == mc.ModelQueuePolicy.DELAY:
            raise ValueError(f"{where}.{name}: timeout_action DELAY cannot be used with preserve_ordering")


def _check_sequence_batching(config: mc.ModelConfig) -> None:
    batching, where = config.sequence_batching, "sequence_batching"
    _check_duration(f"{where}.max_sequence_idle_microseconds", batching.max_sequence_idle_microseconds)
    control_kinds = mc.ModelSequenceBatching.Control
    kinds_seen: set[int] = set()
    names_seen: set[str] = set()
    for index, control_input in enumerate(batching.control_input):
        at = f"{where}.control_input[{index}]"
        if not control_input.name:
            raise ValueError(f"{at}.name must be set")
        if control_input.name in names_seen:
            raise ValueError(f"{at}: the name '{control_input.name}' is used by two control inputs")
        names_seen.add(control_input.name)
        at = f"{at} '{control_input.name}'"
        if not control_input.control:
            raise ValueError(f"{at}: control must list at least one control")
        for control in control_input.control:
            kind = control_kinds.Kind.Name(control.kind)
            if control.kind in kinds_seen:
                raise ValueError(f"{at}: {kind} is given by two control inputs")
            kinds_seen.add(control.kind)
            if control.kind == control_kinds.CONTROL_SEQUENCE_CORRID:
                allowed = ("TYPE_UINT64", "TYPE_INT64", "TYPE_UINT32", "TYPE_INT32", "TYPE_STRING")
                if mc.DataType.Name(control.data_type) not in allowed:
                    raise ValueError(f"{at}: {kind} needs data_type {', '.join(allowed)}")
                continue
            lists = (control.int32_false_true, control.fp32_false_true, control.bool_false_true)
            given = [values for values in lists if values]
            if len(given) != 1 or len(given[0]) != 2:
                raise ValueError(
                    f"{at}: {kind} needs exactly two false/true values in one of int32_false_true, "
                    "fp32_false_true or bool_false_true"
                )
    if batching.HasField("oldest"):
        oldest, at = batching.oldest, f"{where}.oldest"
        if oldest.max_candidate_sequences < 0:
            candidates = oldest.max_candidate_sequences
            raise ValueError(f"{at}.max_candidate_sequences must be >= 0, got {candidates}")
        _check_preferred(f"{at}.preferred_batch_size", oldest.preferred_batch_size, config.max_batch_size)
        _check_duration(f"{at}.max_queue_delay_microseconds", oldest.max_queue_delay_microseconds)
    if batching.HasField("direct"):
        direct, at = batching.direct, f"{where}.direct"
        _check_duration(f"{at}.max_queue_delay_microseconds", direct.max_queue_delay_microseconds)
        utilization = direct.minimum_slot_utilization
        if not (math.isfinite(utilization) and 0.0 <= utilization <= 1.0):
            raise ValueError(f"{at}.minimum_slot_utilization must be in [0, 1], got {utilization}")


# -- a backend's parameters ---------------------------------------------------------------------------


def check_parameters(
    config: mc.ModelConfig, known: Mapping[str, tuple[str, ...] | None], backend: str
) -> None:
    """Refuse a parameter that is not in ``known`` (name -> allowed values, compared without case, or
    None for any value), naming it and the closest known name."""
    for key, value in config.parameters.items():
        if key not in known:
            raise ValueError(
                f"parameters.{_shown(key)}: the {backend} backend has no such parameter"
                f"{_closest(key, known)}; it reads {', '.join(sorted(known))}"
            )
        allowed = known[key]
        if allowed is not None and value.string_value.strip().lower() not in allowed:
            raise ValueError(
                f"parameters.{key} must be {' or '.join(allowed)}, got '{_shown(value.string_value)}'"
            )


def _closest(key: str, known: Mapping[str, object]) -> str:
    if len(key) > _SHOWN_CHARS:
        return ""
    by_lower = {name.lower(): name for name in known}
    matches = difflib.get_close_matches(key.lower(), list(by_lower), n=1)
    return f" (did you mean '{by_lower[matches[0]]}'?)" if matches else ""


def _shown(text: str) -> str:
    text = text if text.isprintable() else repr(text)[1:-1]
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}..."
