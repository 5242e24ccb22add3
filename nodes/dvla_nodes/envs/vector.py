"""Many environments per process, stepped as one batch; and the same batch in a worker process.

:class:`VectorEnv` runs N sims on one compiled model with one shared renderer (one GL context
per process). Each slot is reset to its own (task, seed); a slot whose episode ended stays done
(not stepped, reward 0) until the next ``reset`` — rollouts for GRPO are whole episodes.

:class:`RemoteVectorEnv` hosts a :class:`VectorEnv` in a child process and exchanges raw numpy
buffers over two pipes (a msgpack header, then one frame per array; no pickle). Both expose the
split-phase API ``send_reset`` / ``send_step`` / ``send_expert`` then ``recv``, so a caller can
infer actions for one shard while another steps: that is how the trainer keeps both cores busy.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

import msgspec
import numpy as np

from dvla_bus.errors import ConfigError, ResourceError
from dvla_nodes.envs.experts import expert_action
from dvla_nodes.envs.scene import build_model
from dvla_nodes.envs.sim import ACTION_DIM, PROPRIO_DIM, STATE_DIM, SceneRenderer, TabletopSim
from dvla_nodes.envs.tasks import TASKS


@dataclass(frozen=True, slots=True)
class StepBatch:
    """What N slots report after a reset or a step. Arrays have leading dimension N.

    ``reward`` is the sparse task reward of this step (1.0 on success); ``shaping`` the change of
    the shaping potential over this step (0 for done slots); ``done`` = terminated or truncated,
    now or earlier in the episode.
    """

    images: np.ndarray  # uint8 (N, H, W, 3)
    proprio: np.ndarray  # float32 (N, 7)
    state: np.ndarray  # float32 (N, STATE_DIM) privileged object positions (not an observation)
    instructions: tuple[str, ...]
    reward: np.ndarray  # float32 (N,)
    shaping: np.ndarray  # float32 (N,)
    success: np.ndarray  # bool (N,) succeeded on this step
    done: np.ndarray  # bool (N,)

    _ARRAYS = ("images", "proprio", "state", "reward", "shaping", "success", "done")

    @staticmethod
    def concat(parts: Sequence[StepBatch]) -> StepBatch:
        return StepBatch(
            images=np.concatenate([p.images for p in parts]),
            proprio=np.concatenate([p.proprio for p in parts]),
            state=np.concatenate([p.state for p in parts]),
            instructions=tuple(i for p in parts for i in p.instructions),
            reward=np.concatenate([p.reward for p in parts]),
            shaping=np.concatenate([p.shaping for p in parts]),
            success=np.concatenate([p.success for p in parts]),
            done=np.concatenate([p.done for p in parts]),
        )


class VectorEnv:
    """N tabletop sims in this process. Not thread-safe (one GL context); call ``close``."""

    def __init__(self, num_envs: int, image_size: int = 64) -> None:
        if num_envs < 1:
            raise ConfigError(f"num_envs={num_envs}: need at least one environment")
        self.num_envs = num_envs
        self.image_size = image_size
        self._model = build_model(image_size)
        self._renderer = SceneRenderer(self._model, image_size)
        self._sims = [TabletopSim(self._model) for _ in range(num_envs)]
        self._images = np.zeros((num_envs, image_size, image_size, 3), np.uint8)
        self._proprio = np.zeros((num_envs, PROPRIO_DIM), np.float32)
        self._state = np.zeros((num_envs, STATE_DIM), np.float32)
        self._done = np.ones(num_envs, bool)
        self._potential = np.zeros(num_envs, np.float64)
        self._pending: StepBatch | np.ndarray | None = None

    @property
    def sims(self) -> list[TabletopSim]:
        return self._sims

    def _observe(self, i: int) -> None:
        self._renderer.render(self._sims[i].data, out=self._images[i])
        self._sims[i].proprio(out=self._proprio[i])
        self._sims[i].privileged(out=self._state[i])

    def _batch(self, reward: np.ndarray, shaping: np.ndarray, success: np.ndarray) -> StepBatch:
        return StepBatch(
            images=self._images.copy(),
            proprio=self._proprio.copy(),
            state=self._state.copy(),
            instructions=tuple(s.instruction for s in self._sims),
            reward=reward,
            shaping=shaping,
            success=success,
            done=self._done.copy(),
        )

    def reset(
        self, tasks: Sequence[str], seeds: Sequence[int], mask: Sequence[bool] | None = None
    ) -> StepBatch:
        """Start slot i on task ``tasks[i]`` with episode seed ``seeds[i]``; with ``mask``, only
        the slots where it is true (the others keep their episode; their entries are ignored)."""
        if len(tasks) != self.num_envs or len(seeds) != self.num_envs:
            raise ConfigError(
                f"reset needs {self.num_envs} tasks and seeds, got {len(tasks)} and {len(seeds)}"
            )
        for i, (task, seed) in enumerate(zip(tasks, seeds, strict=True)):
            if mask is not None and not mask[i]:
                continue
            spec = TASKS.get(task)
            if spec is None:
                raise ConfigError(f"unknown task {task!r}; the suite has: {', '.join(TASKS)}")
            sim = self._sims[i]
            sim.reset(spec, int(seed))
            self._potential[i] = sim.potential()
            self._observe(i)
            self._done[i] = False
        n = self.num_envs
        return self._batch(np.zeros(n, np.float32), np.zeros(n, np.float32), np.zeros(n, bool))

    def step(self, actions: np.ndarray) -> StepBatch:
        """Step every slot not yet done with its row of ``actions`` (float (N, 4))."""
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs, ACTION_DIM):
            raise ConfigError(f"actions shape {actions.shape}, expected ({self.num_envs}, 4)")
        n = self.num_envs
        reward = np.zeros(n, np.float32)
        shaping = np.zeros(n, np.float32)
        success = np.zeros(n, bool)
        for i, sim in enumerate(self._sims):
            if self._done[i]:
                continue
            sim.step(actions[i])
            potential = sim.potential()
            shaping[i] = potential - self._potential[i]
            self._potential[i] = potential
            assert sim.spec is not None
            if sim.success():
                success[i] = True
                reward[i] = 1.0
                self._done[i] = True
            elif sim.steps >= sim.spec.max_steps:
                self._done[i] = True
            self._observe(i)
        return self._batch(reward, shaping, success)

    def expert_actions(self) -> np.ndarray:
        """The scripted experts' actions for every slot's current state, float32 (N, 4)."""
        out = np.zeros((self.num_envs, ACTION_DIM), np.float32)
        for i, sim in enumerate(self._sims):
            if sim.spec is not None:
                out[i] = expert_action(sim.spec, sim.state())
        return out

    # split-phase API, same as RemoteVectorEnv (computed at send, returned by recv)
    def send_reset(
        self, tasks: Sequence[str], seeds: Sequence[int], mask: Sequence[bool] | None = None
    ) -> None:
        self._pending = self.reset(tasks, seeds, mask)

    def send_step(self, actions: np.ndarray) -> None:
        self._pending = self.step(actions)

    def send_expert(self) -> None:
        self._pending = self.expert_actions()

    def recv(self) -> Any:
        out, self._pending = self._pending, None
        if out is None:
            raise ResourceError("VectorEnv.recv() without a pending send_*()")
        return out

    def close(self) -> None:
        self._renderer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- process shard
# Framing on the two pipes: each frame is an 8-byte little-endian length, then the bytes. A
# message is a msgpack header {kind, meta, arrays: [[name, dtype, shape], ...]} followed by one
# frame per array (raw C-order bytes). No pickle; no multiprocessing machinery (its resource
# tracker would outlive the shard).

_HEADER = msgspec.msgpack.Encoder()
_DECODE = msgspec.msgpack.Decoder()
_LEN = struct.Struct("<Q")


class _Pipe:
    def __init__(self, rfd: int, wfd: int) -> None:
        self._r = os.fdopen(rfd, "rb", buffering=0)
        self._w = os.fdopen(wfd, "wb", buffering=0)
        self.rfd = rfd

    def _read_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._r.readinto(view[got:])
            if not k:
                raise EOFError("env worker pipe closed")
            got += k
        return buf

    def send(self, kind: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        specs = [[k, a.dtype.str, list(a.shape)] for k, a in arrays.items()]
        header = _HEADER.encode({"kind": kind, "meta": meta, "arrays": specs})
        self._w.write(_LEN.pack(len(header)) + header)
        for a in arrays.values():
            data = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            self._w.write(_LEN.pack(data.nbytes))
            self._w.write(data.data)

    def recv(self) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
        (n,) = _LEN.unpack(self._read_exact(_LEN.size))
        header = _DECODE.decode(bytes(self._read_exact(n)))
        arrays: dict[str, np.ndarray] = {}
        for name, dtype, shape in header["arrays"]:
            (m,) = _LEN.unpack(self._read_exact(_LEN.size))
            arrays[name] = np.frombuffer(self._read_exact(m), dtype=np.dtype(dtype)).reshape(shape)
        return str(header["kind"]), dict(header["meta"]), arrays

    def close(self) -> None:
        for f in (self._r, self._w):
            with contextlib.suppress(OSError):
                f.close()


def _send_batch(pipe: _Pipe, b: StepBatch) -> None:
    pipe.send(
        "batch",
        {"instructions": list(b.instructions)},
        {k: getattr(b, k) for k in StepBatch._ARRAYS},
    )


class Served(Protocol):
    """What :func:`serve` runs in a worker process: :class:`VectorEnv`, or any vector of
    environments with the same synchronous API (the external suites' adapters)."""

    def reset(
        self, tasks: Sequence[str], seeds: Sequence[int], mask: Sequence[bool] | None = None
    ) -> StepBatch: ...

    def step(self, actions: np.ndarray) -> StepBatch: ...

    def expert_actions(self) -> np.ndarray: ...

    def close(self) -> None: ...


def serve(
    rfd: int,
    wfd: int,
    make: Callable[[], Served],
    ready: Callable[[Served], dict[str, Any]] | None = None,
) -> None:
    """The child side of :class:`RemoteVectorEnv`: build the environments with ``make``, say
    ``ready`` (with ``ready(env)`` as its metadata), then answer commands until ``close``."""
    pipe = _Pipe(rfd, wfd)
    try:
        env = make()
    except Exception as exc:
        pipe.send("error", {"error": repr(exc)}, {})
        return
    try:
        pipe.send("ready", ready(env) if ready is not None else {}, {})
        while True:
            kind, meta, arrays = pipe.recv()
            try:
                if kind == "reset":
                    _send_batch(pipe, env.reset(meta["tasks"], meta["seeds"], meta["mask"]))
                elif kind == "step":
                    _send_batch(pipe, env.step(arrays["actions"]))
                elif kind == "expert":
                    pipe.send("expert", {}, {"actions": env.expert_actions()})
                else:
                    return
            except Exception as exc:  # reported to the parent, which raises it
                pipe.send("error", {"error": repr(exc)}, {})
    except (EOFError, OSError, KeyboardInterrupt):
        return
    finally:
        env.close()
        pipe.close()


def worker_main(rfd: int, wfd: int, num_envs: int, image_size: int) -> None:
    """The embedded suite's worker (``python -m dvla_nodes.envs._worker``)."""
    serve(rfd, wfd, lambda: VectorEnv(num_envs, image_size))


def is_this_interpreter(python: str) -> bool:
    """Whether ``python`` is the interpreter running this process. A venv's python is a
    symlink to its base interpreter: paths are compared, not targets."""
    return os.path.abspath(python) == os.path.abspath(sys.executable)


def worker_environ(python: str | None) -> dict[str, str] | None:
    """The environment for a worker run by interpreter ``python``: ``None`` (inherit) for this
    interpreter; for another (a suite's own venv) this process's dvla source directories come
    first on ``PYTHONPATH``. That venv is shared by every checkout on the machine and holds an
    editable install of whichever checkout made it: without this, a worker would run that
    checkout's code (another version of the pipe protocol), or fail to import dvla at all once
    that checkout is gone."""
    if python is None or is_this_interpreter(python):
        return None
    import dvla_bus
    import dvla_nodes

    roots = [str(Path(next(iter(m.__path__))).parent) for m in (dvla_nodes, dvla_bus)]
    inherited = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys([*roots, *inherited]))}


class RemoteVectorEnv:
    """A :class:`VectorEnv` of ``num_envs`` slots in a child process (a fresh interpreter that
    imports no torch). Use as a context manager or call ``close``: the child is stopped and
    reaped (SIGKILL after a grace period).

    ``python`` (default: this interpreter), ``worker`` (a module run with ``-m``, given the two
    pipe descriptors then ``worker_args``) select another worker, e.g. an external suite's
    adapter under that suite's own interpreter (:mod:`dvla_nodes.envs.suites`); ``info`` is
    the metadata of the worker's ``ready`` message."""

    def __init__(
        self,
        num_envs: int,
        image_size: int = 64,
        start_timeout: float = 60.0,
        *,
        python: str | None = None,
        worker: str = "dvla_nodes.envs._worker",
        worker_args: Sequence[str] | None = None,
    ) -> None:
        self.num_envs = num_envs
        self.image_size = image_size
        self.info: dict[str, Any] = {}
        down_r, down_w = os.pipe()  # parent -> child
        up_r, up_w = os.pipe()  # child -> parent
        args = [str(num_envs), str(image_size)] if worker_args is None else list(worker_args)
        cmd = [python or sys.executable, "-m", worker, str(down_r), str(up_w), *args]
        try:
            self._proc = subprocess.Popen(
                cmd,
                pass_fds=(down_r, up_w),
                stdin=subprocess.DEVNULL,
                env=worker_environ(python),
            )
        finally:
            os.close(down_r)
            os.close(up_w)
        self._pipe = _Pipe(up_r, down_w)
        self._busy = False
        ready, _, _ = select.select([up_r], [], [], start_timeout)
        try:
            if not ready:
                raise ResourceError(
                    f"env worker pid {self._proc.pid} did not start in {start_timeout}s"
                )
            try:
                kind, meta, _ = self._pipe.recv()
            except (EOFError, OSError) as exc:
                raise ResourceError(
                    f"env worker pid {self._proc.pid} exited while starting"
                ) from exc
            if kind != "ready":
                raise ResourceError(f"env worker failed to start: {meta.get('error')}")
            self.info = meta
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _send(self, kind: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        if self._busy:
            raise ResourceError("RemoteVectorEnv: recv() the previous result first")
        self._pipe.send(kind, meta, arrays)
        self._busy = True

    def send_reset(
        self, tasks: Sequence[str], seeds: Sequence[int], mask: Sequence[bool] | None = None
    ) -> None:
        meta = {
            "tasks": list(tasks),
            "seeds": [int(s) for s in seeds],
            "mask": None if mask is None else [bool(m) for m in mask],
        }
        self._send("reset", meta, {})

    def send_step(self, actions: np.ndarray) -> None:
        self._send("step", {}, {"actions": np.asarray(actions, np.float32)})

    def send_expert(self) -> None:
        self._send("expert", {}, {})

    def recv(self) -> Any:
        try:
            kind, meta, arrays = self._pipe.recv()
        except (EOFError, OSError) as exc:
            raise ResourceError(f"env worker pid {self._proc.pid} died: {exc}") from exc
        finally:
            self._busy = False
        if kind == "error":
            raise ResourceError(f"env worker pid {self._proc.pid}: {meta['error']}")
        if kind == "expert":
            return arrays["actions"]
        return StepBatch(instructions=tuple(meta["instructions"]), **arrays)

    def reset(
        self, tasks: Sequence[str], seeds: Sequence[int], mask: Sequence[bool] | None = None
    ) -> StepBatch:
        self.send_reset(tasks, seeds, mask)
        out: StepBatch = self.recv()
        return out

    def step(self, actions: np.ndarray) -> StepBatch:
        self.send_step(actions)
        out: StepBatch = self.recv()
        return out

    def expert_actions(self) -> np.ndarray:
        self.send_expert()
        out: np.ndarray = self.recv()
        return out

    def close(self, grace: float = 2.0) -> None:
        """Ask the worker to exit; kill it after ``grace`` seconds. Short by default: a node's
        teardown (which closes its shards) has its own grace period, 3-5 s."""
        if self._proc.poll() is None:
            with contextlib.suppress(OSError, EOFError, ResourceError):
                if self._busy:  # let the worker finish the command it is on
                    self.recv()
                self._pipe.send("close", {}, {})
            try:
                self._proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._pipe.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
