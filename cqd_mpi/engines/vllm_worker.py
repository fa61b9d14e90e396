"""What runs inside vLLM's worker processes for `engine.kind: vllm`, and the pipe format.

`WeightReceiver` is the engine's `worker_extension_cls`: vLLM mixes it into each of its
workers, and the engine reaches its methods with `LLM.collective_rpc`. Every update goes
through the worker's `reload_weights(weights_iterator=...)`, vLLM's in-place reload: it
takes `(name, tensor)` pairs in the checkpoint's names, packs q/k/v and gate/up itself,
processes each layer once all its tensors have come (the CPU back-end repacks weights
for its kernels), and copies the result into the tensors the engine already uses.

The tensors come one at a time through a named pipe per worker (the engine writes the
conductor's stream into it as it arrives, so neither side holds more than a tensor and
the layer it belongs to), or from a Hugging Face dir (transport `file`). A frame is an
8-byte little-endian header length, a JSON header (name, dtype, shape), then the raw
bytes; a zero length ends the stream.

The watchdog ends a worker whose engine process is gone (killed with kill -9, say): vLLM's
processes would otherwise outlive it, holding their memory and cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import threading
import time
from collections.abc import Iterable, Iterator

_LENGTH = struct.Struct("<Q")
_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031


class StreamError(RuntimeError):
    """The weight stream ended before its end marker, or a frame was malformed."""


class PipeWriter:
    """The engine's end of one fifo per worker, opened before the workers open theirs.

    Each fifo is opened read-write and non-blocking: the open never waits, a worker that
    opens its end later finds a writer there, and a write that would block waits in short
    steps while `alive()` holds, so a worker that failed cannot leave the engine waiting.
    """

    def __init__(self, paths: Iterable[str], alive=lambda: True):
        import fcntl

        self.alive = alive
        self.fds = []
        for path in paths:
            os.mkfifo(path, 0o600)
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)
            self.fds.append(fd)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)

    def _write_all(self, fd: int, data) -> None:
        import select

        view = memoryview(data).cast("B")
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                select.select([], [fd], [], 0.2)
                if not self.alive():
                    raise StreamError("vLLM's worker stopped reading the weight stream") from None

    def write(self, name: str, tensor) -> None:
        """One tensor to every worker."""
        import torch

        tensor = tensor.detach().to("cpu").contiguous()
        header = json.dumps({"name": name, "dtype": str(tensor.dtype).removeprefix("torch."),
                             "shape": list(tensor.shape)}).encode()
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        for fd in self.fds:
            self._write_all(fd, _LENGTH.pack(len(header)) + header)
            self._write_all(fd, data)

    def end(self) -> None:
        """Write the end marker, then wait until every worker has read its stream to the end:
        the fifo's buffer goes with the last descriptor on it, which may be ours alone."""
        import array
        import fcntl
        import termios

        for fd in self.fds:
            self._write_all(fd, _LENGTH.pack(0))
        unread = array.array("i", [0])
        for fd in self.fds:
            while self.alive():
                fcntl.ioctl(fd, termios.FIONREAD, unread)
                if unread[0] == 0:
                    break
                time.sleep(0.001)

    def close(self) -> None:
        """Close every fifo: a worker still reading sees the stream end (and reports it cut short)."""
        fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)


def open_pipe_reader(path: str):
    """A worker's blocking reader on the fifo `path` (its writer opened it first, or is gone)."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return open(fd, "rb", buffering=0)


def _read_exactly(handle, view: memoryview) -> None:
    while view:
        count = handle.readinto(view)
        if not count:
            raise StreamError(f"the weight stream ended {len(view)} bytes short of a frame's end")
        view = view[count:]


def read_frames(handle) -> Iterator[tuple[str, object]]:
    """The (name, tensor) pairs of a stream written by `PipeWriter`, up to its end marker."""
    import torch

    length = bytearray(_LENGTH.size)
    while True:
        _read_exactly(handle, memoryview(length))
        (size,) = _LENGTH.unpack(length)
        if size == 0:
            return
        header = bytearray(size)
        _read_exactly(handle, memoryview(header))
        meta = json.loads(header)
        dtype = getattr(torch, meta["dtype"])
        numel = 1
        for dim in meta["shape"]:
            numel *= dim
        raw = torch.empty(numel * dtype.itemsize, dtype=torch.uint8)
        _read_exactly(handle, memoryview(raw.numpy()))
        yield meta["name"], raw.view(dtype).reshape(meta["shape"])


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class WeightReceiver:
    """vLLM worker extension: in-place updates from a pipe or a dir, and the watchdog."""

    def cqd_load_pipe(self, paths: list[str]) -> list[str]:
        """Reload the weights from this worker's pipe (paths[rank]); returns the names taken.

        A stream cut short still ends the reload, so vLLM's layers stay materialised, then
        raises: the engine reports the update as failed and waits for a complete one.
        """
        names: list[str] = []
        failure: list[BaseException] = []
        with open_pipe_reader(paths[_rank()]) as handle:

            def stream():
                try:
                    for name, tensor in read_frames(handle):
                        names.append(name)
                        yield name, tensor
                except StreamError as exc:
                    failure.append(exc)

            self.reload_weights(weights_iterator=stream())
        if failure:
            raise failure[0]
        return names

    def cqd_load_dir(self, path: str) -> list[str]:
        """Reload the weights from the Hugging Face dir `path`; returns the names taken."""
        from cqd_mpi.merging.weights import ModelDir

        names: list[str] = []

        def stream():
            for name, tensor in ModelDir(path).tensors():
                names.append(name)
                yield name, tensor

        self.reload_weights(weights_iterator=stream())
        return names

    def cqd_watch(self, pid: int, create_time: float) -> int:
        """End this worker once process `pid` (started at `create_time`) is gone; returns own pid."""
        import psutil

        def gone() -> bool:
            try:
                process = psutil.Process(pid)
                return process.create_time() != create_time or process.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        def watch():
            while not gone():
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="cqd-watchdog", daemon=True).start()
        return os.getpid()
