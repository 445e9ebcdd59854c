"""Client shared memory: system (POSIX) and CUDA IPC regions that requests read inputs from and write
outputs to, registered by name through the SharedMemory RPCs.

A request pins every region it touches with a :class:`RegionLease` until its final response, so an
unregister that arrives meanwhile only marks the region; the last request to let go releases it. The
messages are Triton's. Nothing here knows about protobuf, models or the event loop.

System regions are never mapped. The client owns the object and may ``ftruncate`` it at any moment;
a mapped page past the new end raises SIGBUS on access, which kills the whole server, and checking the
size first leaves a race with the truncate. So every access opens ``/dev/shm/<key>`` afresh and copies
with ``pread``/``pwrite``, which past the end just come back short: the worst a client can do is fail its
own request. Keeping no descriptor between accesses also means a registered region costs no fd (CPython's
``mmap`` keeps a dup of one per mapping), so registrations cannot exhaust the process's fd limit.
"""

from __future__ import annotations

import abc
import ctypes
import logging
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
DEFAULT_MAX_REGIONS = 4096
"""Registered regions (system and CUDA together) a server holds at most; Triton has no limit, but each
region is server memory that any client could otherwise grow without bound."""
_SHM_DIR = "/dev/shm"
_CUDA_IPC_HANDLE_SIZE = 64
# One pread/pwrite moves at most ~2 GiB on Linux; larger copies loop in chunks of this size.
_IO_CHUNK = 1 << 30
# O_NONBLOCK: if something other than the registered object appears under the key (a FIFO), opening it
# must not wait for a writer; the identity check then refuses it.
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _already_in_manager(name: str) -> InferenceError:
    return InferenceError(f"shared memory region '{name}' already in manager", grpc.StatusCode.ALREADY_EXISTS)


def _invalid_args(name: str) -> InferenceError:
    return InferenceError(f"failed to register shared memory region '{name}': invalid args")


def _too_many_regions(name: str, limit: int) -> InferenceError:
    return InferenceError(
        f"failed to register shared memory region '{name}': the server already holds the maximum of {limit} "
        "registered shared memory regions; unregister some first",
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


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
        """Release what the region holds (a CUDA IPC mapping); called once no request holds it."""


class SystemRegion(Region):
    """A POSIX shm object, copied from and to with ``pread``/``pwrite`` (see the module docstring)."""

    kind = "system"

    def __init__(
        self, name: str, key: str, offset: int, byte_size: int, path: str, identity: tuple[int, int]
    ) -> None:
        super().__init__(name, byte_size)
        self.key = key
        self.offset = offset
        self._path = path
        # (st_dev, st_ino) at registration: a later object under the same key is not this region.
        self._identity = identity

    @classmethod
    def open(cls, name: str, key: str, offset: int, byte_size: int) -> SystemRegion:
        path, fd = _open_shm_key(name, key)
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        if byte_size == 0 or offset + byte_size > info.st_size:
            raise _invalid_args(name)
        return cls(name, key, offset, byte_size, path, (info.st_dev, info.st_ino))

    def read(self, offset: int, byte_size: int) -> bytes:
        position = self.offset + offset
        chunks: list[bytes] = []
        fd = self._reopen(os.O_RDONLY)
        try:
            remaining = byte_size
            while remaining:
                chunk = os.pread(fd, min(remaining, _IO_CHUNK), position)
                if not chunk:  # the client truncated the object under its registered size
                    raise self._shrunk()
                chunks.append(chunk)
                position += len(chunk)
                remaining -= len(chunk)
        except OSError as error:
            raise self._io_error("read", error) from None
        finally:
            os.close(fd)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def write(self, offset: int, data: bytes) -> None:
        position = self.offset + offset
        fd = self._reopen(os.O_RDWR)
        try:
            # pwrite past the end would grow the object rather than fail; refuse a truncated region.
            # A truncate racing with this check only makes pwrite grow it back within the registered
            # range, which touches nothing outside the client's own object.
            if os.fstat(fd).st_size < position + len(data):
                raise self._shrunk()
            view = memoryview(data).cast("B")
            while view:
                written = os.pwrite(fd, view[:_IO_CHUNK], position)
                view = view[written:]
                position += written
        except OSError as error:
            raise self._io_error("write", error) from None
        finally:
            os.close(fd)

    def close(self) -> None:
        pass  # nothing is held between accesses

    def _reopen(self, flags: int) -> int:
        try:
            fd = os.open(self._path, flags | _OPEN_FLAGS)
        except OSError:
            raise self._gone() from None
        try:
            info = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise self._gone() from None
        if (info.st_dev, info.st_ino) != self._identity:
            os.close(fd)
            raise self._gone()
        return fd

    def _gone(self) -> InferenceError:
        return InferenceError(
            f"shared memory region '{self.name}' is no longer available: the object with key '{self.key}' "
            "was removed or replaced after it was registered"
        )

    def _shrunk(self) -> InferenceError:
        return InferenceError(
            f"shared memory region '{self.name}' was truncated after it was registered: key '{self.key}' "
            f"is smaller than its registered offset + byte size ({self.offset + self.byte_size} bytes)"
        )

    def _io_error(self, action: str, error: OSError) -> InferenceError:
        return InferenceError.internal(
            f"failed to {action} shared memory region '{self.name}': {error.strerror or error}"
        )


def _open_shm_key(name: str, key: str) -> tuple[str, int]:
    """Open ``/dev/shm/<key>`` read-write the way ``shm_open`` would, refusing anything outside it;
    returns the path and the descriptor."""
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
    path = os.path.join(_SHM_DIR, base)
    try:
        fd = os.open(path, os.O_RDWR | _OPEN_FLAGS)
    except OSError:
        raise unable from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise unable
    return path, fd


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
class InputSlot:
    """One input's bytes: ``byte_size`` bytes at ``offset`` of a leased region, copied on ``read``."""

    region: Region
    offset: int
    byte_size: int

    def read(self) -> bytes:
        return self.region.read(self.offset, self.byte_size)


@dataclass
class OutputSlot:
    """Where one requested output goes: ``byte_size`` bytes at ``offset`` of a leased region."""

    output: str
    region: Region
    offset: int
    byte_size: int

    def write(self, data: bytes) -> None:
        if len(data) > self.byte_size:
            # Triton answers INTERNAL, but a region too small is the client's mistake, not the server's.
            raise InferenceError(
                f"shared memory size specified with the request for output '{self.output}' "
                f"({self.byte_size} bytes) should be at least {len(data)} bytes to hold the results"
            )
        self.region.write(self.offset, data)


class SharedMemoryManager:
    """Every registered region by name; system and CUDA regions share one namespace."""

    def __init__(self, enabled: bool, max_regions: int = DEFAULT_MAX_REGIONS) -> None:
        self.enabled = enabled
        self.max_regions = max_regions
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
        """Fail early, before opening anything (a CUDA handle is costly to open and close)."""
        with self._lock:
            self._check_room(name)

    def _check_room(self, name: str) -> None:
        if name in self._regions:
            raise _already_in_manager(name)
        if len(self._regions) >= self.max_regions:
            raise _too_many_regions(name, self.max_regions)

    def _add(self, region: Region) -> None:
        try:
            with self._lock:
                # Again: another register may have taken the name or the last slot since _check_new.
                self._check_room(region.name)
                self._regions[region.name] = region
        except InferenceError:
            region.close()
            raise

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

    def input(self, name: str, offset: int, byte_size: int) -> InputSlot:
        return InputSlot(self._pin(name, offset, byte_size), offset, byte_size)

    def output(self, output: str, name: str, offset: int, byte_size: int) -> OutputSlot:
        return OutputSlot(output, self._pin(name, offset, byte_size), offset, byte_size)

    def release(self) -> None:
        held, self._held = self._held, []
        for region in held:
            self._manager._release(region)
