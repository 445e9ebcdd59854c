"""Client shared memory: system (POSIX) and CUDA IPC regions that requests read inputs from and write
outputs to, registered by name through the SharedMemory RPCs.

A request pins every region it touches with a :class:`RegionLease` until its final response, so an
unregister that arrives meanwhile only marks the region; the last request to let go unmaps it. The
messages are Triton's. Nothing here knows about protobuf, models or the event loop.
"""

from __future__ import annotations

import abc
import ctypes
import logging
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc
import numpy as np
from pagedserve.errors import InferenceError

log = logging.getLogger(__name__)

RESERVED_KEY_PREFIX = "triton_python_backend_shm_region_"
DISABLED_MESSAGE = (
    "Client shared memory is disabled. Start the server with 'server.allow_client_shm=true' to enable."
)
_SHM_DIR = "/dev/shm"
_CUDA_IPC_HANDLE_SIZE = 64


def _already_in_manager(name: str) -> InferenceError:
    return InferenceError(f"shared memory region '{name}' already in manager", grpc.StatusCode.ALREADY_EXISTS)


def _invalid_args(name: str) -> InferenceError:
    return InferenceError(f"failed to register shared memory region '{name}': invalid args")


class Region(abc.ABC):
    """One registered region; ``users`` counts the requests holding it."""

    kind: ClassVar[str]

    def __init__(self, name: str, byte_size: int) -> None:
        self.name = name
        self.byte_size = byte_size
        self.users = 0
        self.retired = False

    @abc.abstractmethod
    def read(self, offset: int, byte_size: int) -> bytes:
        """A copy of ``byte_size`` bytes at ``offset`` (relative to the registered start)."""

    @abc.abstractmethod
    def write(self, offset: int, data: bytes) -> None:
        """Copy ``data`` into the region at ``offset``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Unmap; called once no request holds the region."""


class SystemRegion(Region):
    kind = "system"

    def __init__(self, name: str, key: str, offset: int, byte_size: int, mapping: mmap.mmap, start: int):
        super().__init__(name, byte_size)
        self.key = key
        self.offset = offset
        self._mapping = mapping
        self._start = start  # where the registered range begins inside the page-aligned mapping

    @classmethod
    def open(cls, name: str, key: str, offset: int, byte_size: int) -> SystemRegion:
        fd = _open_shm_key(name, key)
        try:
            size = os.fstat(fd).st_size
            if byte_size == 0 or offset + byte_size > size:
                raise _invalid_args(name)
            # mmap offsets must be page aligned; map from the page holding ``offset``.
            aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
            try:
                mapping = mmap.mmap(fd, byte_size + offset - aligned, offset=aligned)
            except (OSError, ValueError) as error:
                raise InferenceError(
                    f"failed to register shared memory region '{name}': unable to process address space "
                    f"({error})"
                ) from None
        finally:
            os.close(fd)  # the mapping stays valid without the descriptor
        return cls(name, key, offset, byte_size, mapping, offset - aligned)

    def read(self, offset: int, byte_size: int) -> bytes:
        start = self._start + offset
        return self._mapping[start : start + byte_size]

    def write(self, offset: int, data: bytes) -> None:
        start = self._start + offset
        self._mapping[start : start + len(data)] = data

    def close(self) -> None:
        self._mapping.close()


def _open_shm_key(name: str, key: str) -> int:
    """Open ``/dev/shm/<key>`` read-write the way ``shm_open`` would, refusing anything outside it."""
    base = key.lstrip("/")
    if not base:
        raise InferenceError(f"cannot register shared memory region '{name}' - invalid shm key '{key}'")
    if base.startswith(RESERVED_KEY_PREFIX):
        raise InferenceError(
            f"cannot register shared memory region '{name}' with key '{key}' as the key contains the "
            f"reserved prefix '{RESERVED_KEY_PREFIX}'"
        )
    unable = InferenceError.internal(f"Unable to open shared memory region: '{key}'")
    # shm_open rejects these too; for us they would also escape /dev/shm.
    if "/" in base or "\0" in base or base in (".", ".."):
        raise unable
    try:
        fd = os.open(os.path.join(_SHM_DIR, base), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise unable from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise unable
    return fd


class CudaRegion(Region):
    """A device allocation of another process, opened from its raw ``cudaIpcMemHandle_t``."""

    kind = "cuda"

    def __init__(self, name: str, device_id: int, byte_size: int, pointer: int, runtime: Any) -> None:
        super().__init__(name, byte_size)
        self.device_id = device_id
        self._pointer = pointer
        self._rt = runtime

    @classmethod
    def open(cls, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> CudaRegion:
        if len(raw_handle) != _CUDA_IPC_HANDLE_SIZE or byte_size == 0 or device_id < 0:
            raise _invalid_args(name)
        rt, driver = _cuda_modules(name)
        _cuda_call(name, rt.cudaSetDevice(device_id))
        handle = rt.cudaIpcMemHandle_t()
        ctypes.memmove(handle.getPtr(), raw_handle, _CUDA_IPC_HANDLE_SIZE)
        flags = getattr(rt, "cudaIpcMemLazyEnablePeerAccess", 1)
        (pointer,) = _cuda_call(name, rt.cudaIpcOpenMemHandle(handle, flags))
        pointer = int(pointer)
        try:
            base, size = _cuda_call(name, driver.cuMemGetAddressRange(pointer))
            if pointer + byte_size > int(base) + int(size):
                raise _invalid_args(name)
        except InferenceError:
            rt.cudaIpcCloseMemHandle(pointer)
            raise
        return cls(name, device_id, byte_size, pointer, rt)

    def _copy(self, dst: int, src: int, count: int, kind: Any) -> None:
        rt = self._rt
        _cuda_call(self.name, rt.cudaSetDevice(self.device_id))  # current device is per thread
        _cuda_call(self.name, rt.cudaMemcpy(dst, src, count, kind))

    def read(self, offset: int, byte_size: int) -> bytes:
        host = np.empty(byte_size, dtype=np.uint8)
        if byte_size:
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._copy(host.ctypes.data, self._pointer + offset, byte_size, kind)
        return host.tobytes()

    def write(self, offset: int, data: bytes) -> None:
        if data:
            host = np.frombuffer(data, dtype=np.uint8)
            kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._copy(self._pointer + offset, host.ctypes.data, len(data), kind)

    def close(self) -> None:
        self._rt.cudaIpcCloseMemHandle(self._pointer)


def _cuda_modules(name: str) -> tuple[Any, Any]:
    """cuda-python's runtime and driver bindings (the same package tritonclient's CUDA utilities use)."""
    try:
        from cuda.bindings import driver, runtime
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6
            from cuda import cudart as runtime
        except ImportError:
            log.warning("CUDA shared memory needs the 'cuda-python' package and a CUDA device")
            raise InferenceError(
                f"failed to register CUDA shared memory region: '{name}', GPUs not supported"
            ) from None
    return runtime, driver


def _cuda_call(name: str, result: tuple[Any, ...]) -> tuple[Any, ...]:
    """Unpack a cuda-python call's ``(error, *values)``; any error means the handle is unusable."""
    error, *values = result
    if int(error) != 0:
        log.info("CUDA shared memory region '%s': %s", name, error)
        raise _invalid_args(name)
    return tuple(values)


@dataclass
class OutputSlot:
    """Where one requested output goes: ``byte_size`` bytes at ``offset`` of a leased region."""

    output: str
    region: Region
    offset: int
    byte_size: int

    def write(self, data: bytes) -> None:
        if len(data) > self.byte_size:
            raise InferenceError.internal(
                f"shared memory size specified with the request for output '{self.output}' "
                f"({self.byte_size} bytes) should be at least {len(data)} bytes to hold the results"
            )
        self.region.write(self.offset, data)


class SharedMemoryManager:
    """Every registered region by name; system and CUDA regions share one namespace."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()

    def check_enabled(self) -> None:
        if not self.enabled:
            raise InferenceError.unimplemented(DISABLED_MESSAGE)

    # -- registration -----------------------------------------------------------------------------

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_new(name)
        self._add(SystemRegion.open(name, key, offset, byte_size))

    def register_cuda(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        self._check_new(name)
        self._add(CudaRegion.open(name, raw_handle, device_id, byte_size))

    def _check_new(self, name: str) -> None:
        with self._lock:
            if name in self._regions:
                raise _already_in_manager(name)

    def _add(self, region: Region) -> None:
        with self._lock:
            if region.name not in self._regions:
                self._regions[region.name] = region
                return
        region.close()  # lost a race with another register of the same name
        raise _already_in_manager(region.name)

    def status(self, kind: str, name: str = "") -> list[Region]:
        """Regions of ``kind`` (all, or the one named); retiring regions still count until released."""
        with self._lock:
            if not name:
                return [r for r in self._regions.values() if r.kind == kind]
            region = self._regions.get(name)
        label = "system" if kind == "system" else "cuda"
        if region is None:
            raise InferenceError.not_found(f"Unable to find {label} shared memory region: '{name}'")
        if region.kind != kind:
            registered, wanted = ("CUDA", "system") if region.kind == "cuda" else ("system", "CUDA")
            raise InferenceError.not_found(
                f"The region named '{name}' is registered as {registered} shared memory, not {wanted} "
                "shared memory"
            )
        return [region]

    def unregister(self, kind: str, name: str = "") -> None:
        """Unregister one region of ``kind`` (unknown names are fine) or, with no name, all of them."""
        with self._lock:
            if name:
                region = self._regions.get(name)
                targets = [region] if region is not None and region.kind == kind else []
            else:
                targets = [r for r in self._regions.values() if r.kind == kind]
            closing = [r for r in targets if self._retire(r)]
        for region in closing:
            region.close()

    def _retire(self, region: Region) -> bool:
        """Mark ``region`` for removal; True when nobody holds it and the caller must close it now."""
        region.retired = True
        if region.users:
            return False
        del self._regions[region.name]
        return True

    def close(self) -> None:
        with self._lock:
            regions = list(self._regions.values())
            self._regions.clear()
        for region in regions:
            region.close()

    # -- use by requests ----------------------------------------------------------------------------

    def lease(self) -> RegionLease:
        return RegionLease(self)

    def _acquire(self, name: str) -> Region:
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise InferenceError.not_found(f"Unable to find shared memory region: '{name}'")
            region.users += 1
            return region

    def _release(self, region: Region) -> None:
        with self._lock:
            region.users -= 1
            close = region.users == 0 and region.retired and self._regions.get(region.name) is region
            if close:
                del self._regions[region.name]
        if close:
            region.close()


class RegionLease:
    """The regions one request uses, held from decoding until its final response."""

    def __init__(self, manager: SharedMemoryManager) -> None:
        self._manager = manager
        self._held: list[Region] = []

    def _pin(self, name: str, offset: int, byte_size: int) -> Region:
        region = self._manager._acquire(name)
        self._held.append(region)
        if offset < 0 or offset >= region.byte_size:
            raise InferenceError(f"Invalid offset for shared memory region: '{name}'")
        if byte_size < 0 or offset + byte_size > region.byte_size:
            raise InferenceError(f"Invalid offset + byte size for shared memory region: '{name}'")
        return region

    def read(self, name: str, offset: int, byte_size: int) -> bytes:
        return self._pin(name, offset, byte_size).read(offset, byte_size)

    def output(self, output: str, name: str, offset: int, byte_size: int) -> OutputSlot:
        return OutputSlot(output, self._pin(name, offset, byte_size), offset, byte_size)

    def release(self) -> None:
        held, self._held = self._held, []
        for region in held:
            self._manager._release(region)
