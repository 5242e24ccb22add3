"""``cheetah_sampler`` and ``cheetah_learner``: on-policy RL on a state-based gymnasium MuJoCo task
(``HalfCheetah-v5`` by default; any gymnasium task with Box observations and Box actions works)
through dvla's data plane — the comparison with established RL frameworks in
``dvla bench pipeline`` (Sample Factory's figure on this machine is in MEASURED.md).

* **cheetah_sampler** steps ``envs`` environments in one gymnasium ``SyncVectorEnv``
  (:func:`make_vector_env`) with a Gaussian MLP policy run locally in numpy on the weight version
  it holds (:class:`NumpyPolicy`), and every ``rollout`` steps sends one block of transitions to
  the learner's inbox (:meth:`Outbox.send`: a shared-memory slab on one host, credit flow
  control). Between blocks it picks the newest version up from the learner's weight pool.
* **cheetah_learner** admits a block if the version that acted lags the current one by at most
  ``max_version_lag`` (older blocks are dropped and counted: ``stale_blocks``); every
  ``batch_frames`` admitted frames make one PPO update (clipped importance ratio against the
  recorded behaviour log-probs, GAE, a separate value MLP trained on normalised returns), after
  which it publishes the new policy — weights and observation-normalisation statistics — into
  its weight pool and announces the version on the control bus. After ``seconds`` of training
  (or ``max_frames`` admitted frames) it writes a ``final`` record, asks every node for its lane
  trace and stops the job.

Block arrays (T = ``rollout`` steps, N = ``envs``, D observation and A action dimensions):
``obs`` float32 (T, N, D) raw observations, ``actions`` float32 (T, N, A) unclipped Gaussian
samples (the environment receives them clipped to its bounds), ``logp`` float32 (T, N) their
behaviour log-probabilities, ``rewards`` float32 (T, N), ``dones`` uint8 (T, N) the episode ended
at this step (terminated or truncated; not bootstrapped, as in CleanRL), ``last_obs`` float32
(N, D) the observation after the block. Meta: ``version``, ``index`` (sampler), ``episodes`` and
``return_sum`` of the episodes that ended in the block.

Settings: ``[roles.cheetah_learner]`` (:class:`CheetahConfig`; samplers read it too, so the task
is named once) and ``[roles.cheetah_sampler]`` (``envs``, ``rollout``, overriding the learner
table). The samplers learn the policy's shapes from the weight pool's manifest.

Run directory: ``metrics.jsonl`` — a ``start`` record when the first weights are published,
one ``update`` record per update (time ``t`` in seconds since the learner started, admitted
``frames`` so far, ``version``, mean episode ``return`` of the episodes that ended in the batch,
losses, ``update_seconds``), and a ``final`` record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from dvla_bus import wire
from dvla_bus.deploy import load_job_topology
from dvla_bus.errors import ConfigError, DvlaError
from dvla_bus.node import Node
from dvla_bus.sockets import open_context
from dvla_bus.transport import Delivery, Inbox, Outbox, open_outbox
from dvla_bus.weights import Manifest, WeightPool, WeightReader, attach_weights, create_weight_pool

if typing.TYPE_CHECKING:
    import gymnasium

__all__ = [
    "CheetahConfig",
    "CheetahLearner",
    "CheetahSampler",
    "NumpyPolicy",
    "cheetah_config",
    "make_vector_env",
    "route_mujoco_warnings",
]

TOPIC: Final = "transitions"
LEARNER_ROLE: Final = "cheetah_learner"
F32 = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class CheetahConfig:
    """The task, the sampler's shape and the PPO settings (``[roles.cheetah_learner]``)."""

    env_id: str = "HalfCheetah-v5"
    seed: int = 0
    # sampler
    envs: int = 8  # environments per sampler, stepped in one SyncVectorEnv
    rollout: int = 64  # steps per block sent to the learner
    # learner
    hidden: int = 64
    lr: float = 3e-4
    gamma: float = 0.99
    lam: float = 0.95
    clip: float = 0.2
    epochs: int = 4
    minibatch: int = 1024
    batch_frames: int = 4096
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5
    max_version_lag: int = 2
    seconds: float = 60.0  # training time, from the first published weights
    max_frames: int = 0  # admitted frames after which training ends (0: no limit)
    torch_threads: int = 1

    def __post_init__(self) -> None:
        for name in ("envs", "rollout", "hidden", "epochs", "minibatch", "batch_frames"):
            if getattr(self, name) < 1:
                raise ConfigError(f"cheetah: {name}={getattr(self, name)} must be >= 1")
        if self.max_version_lag < 0:
            raise ConfigError(f"cheetah: max_version_lag={self.max_version_lag} must be >= 0")
        if not 0 < self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"cheetah: gamma={self.gamma}, lam={self.lam} out of range")


def cheetah_config(settings: Mapping[str, wire.Scalar]) -> CheetahConfig:
    """A :class:`CheetahConfig` from role settings; keys that are not fields (``watchdog_s``
    and other node settings) are ignored, values of the wrong kind raise :class:`ConfigError`."""
    hints = typing.get_type_hints(CheetahConfig)
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(CheetahConfig):
        if f.name not in settings:
            continue
        value, kind = settings[f.name], hints[f.name]
        try:
            if kind is int and not isinstance(value, bool):
                changes[f.name] = int(value)
            elif kind is float and not isinstance(value, bool):
                changes[f.name] = float(value)
            elif kind is str:
                changes[f.name] = str(value)
            else:
                raise ValueError(f"expected {kind.__name__}")
        except ValueError as exc:
            raise ConfigError(f"cheetah: {f.name}={value!r}: {exc}") from None
    return CheetahConfig(**changes)


_warned: set[str] = set()


def _mujoco_warning(message: str) -> None:
    if message not in _warned:  # gymnasium's models repeat theirs at every construction
        _warned.add(message)
        logging.getLogger("dvla.mujoco").warning("%s", message)


def route_mujoco_warnings() -> None:
    """Send MuJoCo's warnings to :mod:`logging`, once each, instead of stderr and a
    ``MUJOCO_LOG.TXT`` in the working directory (HalfCheetah's model warns on every build)."""
    import mujoco

    mujoco.set_mju_user_warning(_mujoco_warning)


def make_vector_env(env_id: str, num_envs: int) -> gymnasium.vector.SyncVectorEnv:
    """``num_envs`` copies of ``env_id`` in one gymnasium ``SyncVectorEnv``: every step is a real
    environment frame (``SAME_STEP`` autoreset) and observations are not copied (``copy=False``;
    callers copy what they keep). The samplers and the bare-environment ceiling of
    ``dvla bench pipeline`` both build their environments here."""
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    route_mujoco_warnings()

    def make() -> gymnasium.Env[Any, Any]:
        return gym.make(env_id)

    return SyncVectorEnv([make] * num_envs, copy=False, autoreset_mode=AutoresetMode.SAME_STEP)


# --- the policy, as the samplers run it --------------------------------------------------------

_LOG_2PI: Final = math.log(2 * math.pi)
POLICY_LAYERS: Final = ("pi.0", "pi.2", "pi.4")  # torch Sequential indices of the Linear layers


class NumpyPolicy:
    """The Gaussian MLP policy (tanh hidden layers, state-independent ``log_std``) evaluated in
    numpy: at a sampler's batch sizes (8 observations) numpy's per-call cost is a fraction of
    torch's. Holds copies of the weights; not thread-safe (one sampler loop uses it)."""

    def __init__(self, arrays: Mapping[str, npt.NDArray[Any]], version: int) -> None:
        self.version = version
        self.mean = np.array(arrays["obs_mean"], np.float64)
        self.inv_std = 1.0 / np.array(arrays["obs_std"], np.float64)
        self.layers = [
            (
                np.array(arrays[f"{n}.weight"], np.float32).T,
                np.array(arrays[f"{n}.bias"], np.float32),
            )
            for n in POLICY_LAYERS
        ]
        log_std = np.array(arrays["log_std"], np.float32)
        self.std = np.exp(log_std)
        self.logp_const = float(log_std.sum()) + 0.5 * len(log_std) * _LOG_2PI

    def act(self, obs: npt.NDArray[Any], rng: np.random.Generator) -> tuple[F32, F32]:
        """Sampled actions (N, A) and their log-probabilities (N,) for observations (N, D)."""
        x = np.clip((obs - self.mean) * self.inv_std, -10.0, 10.0).astype(np.float32)
        (w0, b0), (w1, b1), (w2, b2) = self.layers
        h = np.tanh(x @ w0 + b0)
        h = np.tanh(h @ w1 + b1)
        mu = h @ w2 + b2
        eps = rng.standard_normal(mu.shape, dtype=np.float32)
        logp = (-0.5 * (eps * eps).sum(-1) - self.logp_const).astype(np.float32)
        return mu + self.std * eps, logp


# --- the sampler -------------------------------------------------------------------------------


class CheetahSampler(Node):
    role = "cheetah_sampler"
    description = "steps vectorised gymnasium envs with the latest policy; sends transitions"

    outbox: Outbox

    @classmethod
    def check_settings(cls, settings: Mapping[str, wire.Scalar]) -> None:
        cheetah_config(settings)

    async def setup(self) -> None:
        cfg = self.config
        topology = load_job_topology(cfg.topology_file) if cfg.topology_file else None
        learner = topology.settings(LEARNER_ROLE) if topology else {}
        self.cc = cheetah_config({**learner, **cfg.settings})
        self.envs = make_vector_env(self.cc.env_id, self.cc.envs)
        self.resources.callback(self.envs.close)
        from gymnasium.spaces import Box

        space, act_space = self.envs.single_observation_space, self.envs.single_action_space
        if not isinstance(space, Box) or not isinstance(act_space, Box):
            raise ConfigError(f"cheetah: {self.cc.env_id} needs Box observations and actions")
        self.obs_dim, self.act_dim = int(np.prod(space.shape)), int(np.prod(act_space.shape))
        self.low = np.asarray(act_space.low, np.float32)
        self.high = np.asarray(act_space.high, np.float32)
        self.rng = np.random.default_rng(self.cc.seed + 1000 * (cfg.index + 1))
        ctx = await self.resources.enter_async_context(
            open_context(credentials=cfg.data_credentials)
        )
        t, n = self.cc.rollout, self.cc.envs
        block = t * n * (4 * (self.obs_dim + self.act_dim) + 4 + 4 + 1) + 4 * n * self.obs_dim
        self.outbox = await self.resources.enter_async_context(
            open_outbox(
                ctx,
                name=cfg.node_id,
                host=cfg.host,
                run=cfg.run_id,
                slab_size=block + (64 << 10),  # headroom for per-array alignment
                slabs=4,
                policy="block",
                credentials=cfg.data_credentials,
            )
        )
        self.meters.append(self.outbox.counters)
        self.reader: WeightReader | None = None
        self.weights_segment = ""
        self.policy: NumpyPolicy | None = None
        self.resources.callback(self._close_reader)
        self._returns = np.zeros(n, np.float64)
        self._frames = 0
        self._inference_s = 0.0

    def _close_reader(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    def on_members(self, members: tuple[wire.MemberInfo, ...]) -> None:
        for m in members:
            if m.role != LEARNER_ROLE or m.state == "dead":
                continue
            if m.endpoints.get("data"):
                asyncio.get_running_loop().create_task(self.outbox.connect(m.endpoints["data"]))
            segment = m.endpoints.get("weights", "")
            if segment and segment != self.weights_segment:
                self._close_reader()  # a restarted learner has a new pool: follow it
                try:
                    self.reader = attach_weights(segment)
                    self.weights_segment = segment
                    self.policy = None
                except (DvlaError, OSError) as exc:  # the learner may still be creating it
                    self.log.info("weights not ready yet: %s", exc)

    def _refresh(self) -> None:
        reader = self.reader
        if reader is None or reader.active_version < 1:
            return
        if self.policy is not None and reader.active_version <= self.policy.version:
            return
        with reader.pin() as pinned:
            self.policy = NumpyPolicy(pinned.arrays, pinned.version)
        self.set_weight_version(self.policy.version)

    def _rollout(
        self, policy: NumpyPolicy, obs: npt.NDArray[Any]
    ) -> tuple[dict[str, wire.Scalar], dict[str, npt.NDArray[Any]], npt.NDArray[Any]]:
        """``rollout`` steps of every environment; returns the block and the next observation."""
        t_max, n = self.cc.rollout, self.cc.envs
        b_obs = np.empty((t_max, n, self.obs_dim), np.float32)
        b_act = np.empty((t_max, n, self.act_dim), np.float32)
        b_logp = np.empty((t_max, n), np.float32)
        b_rew = np.empty((t_max, n), np.float32)
        b_done = np.empty((t_max, n), np.uint8)
        rets = self._returns
        ended_sum, ended = 0.0, 0
        infer = 0.0
        with self.lanes.busy("sampling"):
            for t in range(t_max):
                b_obs[t] = obs  # the env reuses its buffer (copy=False): keep a copy now
                t0 = time.perf_counter()
                act, logp = policy.act(obs, self.rng)
                infer += time.perf_counter() - t0
                obs, rew, term, trunc, _ = self.envs.step(np.clip(act, self.low, self.high))
                done = term | trunc
                b_act[t], b_logp[t], b_rew[t], b_done[t] = act, logp, rew, done
                rets += rew
                if done.any():
                    ended_sum += float(rets[done].sum())
                    ended += int(done.sum())
                    rets[done] = 0.0
        self._inference_s += infer
        self._frames += t_max * n
        meta: dict[str, wire.Scalar] = {
            "version": policy.version,
            "index": self.config.index,
            "episodes": ended,
            "return_sum": ended_sum,
        }
        arrays: dict[str, npt.NDArray[Any]] = {
            "obs": b_obs,
            "actions": b_act,
            "logp": b_logp,
            "rewards": b_rew,
            "dones": b_done,
            "last_obs": np.asarray(obs, np.float32).copy(),
        }
        return meta, arrays, obs

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        obs, _ = self.envs.reset(seed=self.cc.seed + 7919 * (self.config.index + 1))
        t_start = time.perf_counter()
        while True:
            await self.wait_unpaused()
            self._refresh()
            policy = self.policy
            if policy is None or not self.outbox.statistics().peers:
                await asyncio.sleep(0.05)
                t_start = time.perf_counter()
                continue
            # In the executor: the event loop stays free for credits and heartbeats.
            meta, arrays, obs = await loop.run_in_executor(None, self._rollout, policy, obs)
            await self.outbox.send(meta, arrays, topic=TOPIC, timeout=120)
            self.counters["blocks_sent"] = self.counters.get("blocks_sent", 0) + 1
            self.counters["frames"] = self._frames
            elapsed = max(1e-9, time.perf_counter() - t_start)
            self.gauges["frames_per_s"] = self._frames / elapsed
            self.gauges["inference_share"] = self._inference_s / elapsed


# --- the learner -------------------------------------------------------------------------------


class _RunningStats:
    """Running mean and variance (Chan et al.'s parallel update), float64."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, x: npt.NDArray[Any]) -> None:
        x = x.reshape(-1, *self.mean.shape).astype(np.float64)
        b_mean, b_var, b_count = x.mean(0), x.var(0), x.shape[0]
        delta = b_mean - self.mean
        total = self.count + b_count
        self.mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta**2 * self.count * b_count / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> npt.NDArray[np.float64]:
        return np.sqrt(self.var + 1e-8)


@dataclass(frozen=True, slots=True)
class _Block:
    version: int
    episodes: int
    return_sum: float
    arrays: dict[str, npt.NDArray[Any]]

    @property
    def frames(self) -> int:
        return int(self.arrays["rewards"].size)


class CheetahLearner(Node):
    role = "cheetah_learner"
    description = "PPO on transitions from the cheetah samplers; publishes weight versions"

    inbox: Inbox
    pool: WeightPool

    @classmethod
    def check_settings(cls, settings: Mapping[str, wire.Scalar]) -> None:
        cheetah_config(settings)

    async def setup(self) -> None:
        import gymnasium as gym
        import torch
        from torch import nn

        from dvla_nodes.torch_thread import TorchThread

        cfg = self.config
        self.cc = cc = cheetah_config(cfg.settings)
        # Updates run on one thread with torch_threads torch threads; this (event-loop) thread
        # keeps one, so the process has one OpenMP team (dvla_nodes/torch_thread.py).
        self.torch = self.resources.enter_context(TorchThread(cc.torch_threads, cfg.node_id))
        torch.manual_seed(cc.seed)
        route_mujoco_warnings()
        probe = gym.make(cc.env_id)
        try:
            obs_shape, act_shape = probe.observation_space.shape, probe.action_space.shape
        finally:
            probe.close()
        if obs_shape is None or act_shape is None:
            raise ConfigError(f"cheetah: {cc.env_id} needs Box observations and actions")
        d, a, h = int(np.prod(obs_shape)), int(np.prod(act_shape)), cc.hidden

        def mlp(out: int, gain: float) -> nn.Sequential:
            net = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh())
            net.append(nn.Linear(h, out))
            for layer in net:
                if isinstance(layer, nn.Linear):
                    nn.init.orthogonal_(layer.weight, math.sqrt(2))
                    nn.init.zeros_(layer.bias)
            last = net[-1]
            assert isinstance(last, nn.Linear)
            nn.init.orthogonal_(last.weight, gain)
            return net

        self.pi = mlp(a, 0.01)
        self.log_std = nn.Parameter(torch.full((a,), -0.5))
        self.v = mlp(1, 1.0)
        params = [*self.pi.parameters(), self.log_std, *self.v.parameters()]
        self.params = params
        self.optimizer = torch.optim.Adam(params, lr=cc.lr, eps=1e-5)
        self.obs_stats = _RunningStats((d,))
        self.ret_stats = _RunningStats(())
        self.version = 0
        self.inbox = await self.open_inbox(window=4)
        self.pool = self.resources.enter_context(
            create_weight_pool(cfg.run_id, "cheetah-learner", Manifest.from_arrays(self._arrays()))
        )
        self.endpoints["weights"] = self.pool.name
        from dvla_nodes.learn.metrics import MetricsLog

        self.metrics = MetricsLog(cfg.run_dir / "metrics.jsonl")
        self.resources.callback(self.metrics.close)

    def _arrays(self) -> dict[str, npt.NDArray[Any]]:
        """What the samplers need: the policy's weights and the observation statistics."""
        out: dict[str, npt.NDArray[Any]] = {
            "obs_mean": self.obs_stats.mean.astype(np.float32),
            "obs_std": self.obs_stats.std.astype(np.float32),
            "log_std": self.log_std.detach().numpy().astype(np.float32),
        }
        for name, p in self.pi.named_parameters():
            out[f"pi.{name}"] = p.detach().numpy().astype(np.float32)
        return out

    async def _publish(self) -> None:
        self.version += 1
        with self.lanes.busy("distribution"):
            digest = self.pool.publish(self.version, self._arrays())
        self.set_weight_version(self.version)
        await self.control.send(
            wire.VersionAnnounce(version=self.version, digest=digest, nbytes=self.pool.nbytes)
        )

    def _normalise(self, obs: npt.NDArray[Any]) -> Any:
        import torch

        x = np.clip((obs - self.obs_stats.mean) / self.obs_stats.std, -10.0, 10.0)
        return torch.from_numpy(x.astype(np.float32))

    def _update(self, blocks: list[_Block]) -> dict[str, float]:
        """One PPO update on ``blocks`` (runs in the executor thread)."""
        import torch

        cc = self.cc
        t0 = time.perf_counter()
        self.obs_stats.update(np.concatenate([b.arrays["obs"] for b in blocks]))
        ret_scale = float(self.ret_stats.std)
        ret_mean = float(self.ret_stats.mean)
        xs, acts, logps, advs, rets = [], [], [], [], []
        with torch.no_grad():
            for b in blocks:
                obs, done = b.arrays["obs"], b.arrays["dones"].astype(np.float32)
                t_len, n = done.shape
                x = self._normalise(obs.reshape(t_len * n, -1))
                values = self.v(x).reshape(t_len, n).numpy() * ret_scale + ret_mean
                last = self.v(self._normalise(b.arrays["last_obs"])).reshape(n).numpy()
                next_value = last * ret_scale + ret_mean
                rew = b.arrays["rewards"]
                adv = np.zeros((t_len, n), np.float32)
                gae = np.zeros(n, np.float32)
                for t in reversed(range(t_len)):
                    nonterminal = 1.0 - done[t]
                    delta = rew[t] + cc.gamma * next_value * nonterminal - values[t]
                    gae = delta + cc.gamma * cc.lam * nonterminal * gae
                    adv[t] = gae
                    next_value = values[t]
                xs.append(x)
                acts.append(torch.from_numpy(b.arrays["actions"].reshape(t_len * n, -1)))
                logps.append(torch.from_numpy(b.arrays["logp"].reshape(-1)))
                advs.append(adv.reshape(-1))
                rets.append((adv + values).reshape(-1))
        ret_np = np.concatenate(rets)
        self.ret_stats.update(ret_np)
        x_all, a_all, lp_all = torch.cat(xs), torch.cat(acts), torch.cat(logps)
        adv_all = torch.from_numpy(np.concatenate(advs))
        adv_all = (adv_all - adv_all.mean()) / (adv_all.std() + 1e-8)
        target = torch.from_numpy(
            ((ret_np - self.ret_stats.mean) / float(self.ret_stats.std)).astype(np.float32)
        )
        n_total = x_all.shape[0]
        stats = {"policy_loss": 0.0, "value_loss": 0.0, "approx_kl": 0.0, "clip_fraction": 0.0}
        steps = 0
        for _ in range(cc.epochs):
            perm = torch.randperm(n_total)
            for start in range(0, n_total, cc.minibatch):
                idx = perm[start : start + cc.minibatch]
                mu = self.pi(x_all[idx])
                z = (a_all[idx] - mu) / self.log_std.exp()
                logp = -0.5 * (z * z).sum(-1) - self.log_std.sum() - 0.5 * z.shape[-1] * _LOG_2PI
                log_ratio = logp - lp_all[idx]
                ratio = log_ratio.exp()
                a = adv_all[idx]
                pg = -torch.min(ratio * a, ratio.clamp(1 - cc.clip, 1 + cc.clip) * a).mean()
                v_loss = 0.5 * ((self.v(x_all[idx]).squeeze(-1) - target[idx]) ** 2).mean()
                entropy = self.log_std.sum() + 0.5 * z.shape[-1] * (1 + _LOG_2PI)
                loss = pg + cc.vf_coef * v_loss - cc.ent_coef * entropy
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.params, cc.max_grad_norm)
                self.optimizer.step()
                with torch.no_grad():
                    stats["policy_loss"] += float(pg)
                    stats["value_loss"] += float(v_loss)
                    stats["approx_kl"] += float(((ratio - 1) - log_ratio).mean())
                    stats["clip_fraction"] += float(((ratio - 1).abs() > cc.clip).float().mean())
                steps += 1
        out = {k: v / max(1, steps) for k, v in stats.items()}
        out["update_seconds"] = time.perf_counter() - t0
        return out

    async def run(self) -> None:
        cc = self.cc
        t0 = time.perf_counter()

        def now() -> float:
            return time.perf_counter() - t0

        await self._publish()
        self.metrics.write({"kind": "start", "t": now(), "version": self.version})
        pending: list[_Block] = []
        frames = received = stale = updates = 0
        while now() < cc.seconds and (cc.max_frames <= 0 or frames < cc.max_frames):
            await self.wait_unpaused()
            try:
                got: Delivery = await self.inbox.recv(timeout=0.5)
            except TimeoutError:
                continue
            with got:
                meta = got.meta
                block = _Block(
                    version=int(meta.get("version", -1)),
                    episodes=int(meta.get("episodes", 0)),
                    return_sum=float(meta.get("return_sum", 0.0)),
                    arrays={k: np.array(v) for k, v in got.arrays.items()},
                )
            received += block.frames
            lag = self.version - block.version
            if lag > cc.max_version_lag or lag < 0:
                stale += 1
                self.counters["stale_blocks"] = stale
                continue
            pending.append(block)
            if sum(b.frames for b in pending) < cc.batch_frames:
                continue
            batch, pending = pending, []
            frames += sum(b.frames for b in batch)
            with self.lanes.busy("gradient"):
                stats = await self.torch.run(self._update, batch)
            await self._publish()
            updates += 1
            episodes = sum(b.episodes for b in batch)
            record: dict[str, Any] = {
                "kind": "update",
                "t": now(),
                "update": updates,
                "version": self.version,
                "frames": frames,
                "frames_received": received,
                "stale_blocks": stale,
                "lag_max": max(self.version - 1 - b.version for b in batch),
                "episodes": episodes,
                **stats,
            }
            if episodes:
                record["return"] = sum(b.return_sum for b in batch) / episodes
                self.gauges["return"] = record["return"]
            self.metrics.write(record)
            self.counters["updates"] = updates
            self.counters["frames"] = frames
        self.metrics.write(
            {
                "kind": "final",
                "t": now(),
                "updates": updates,
                "frames": frames,
                "frames_received": received,
                "stale_blocks": stale,
                "version": self.version,
            }
        )
        self.log.info("training done: %d updates, %d frames", updates, frames)
        # Every node writes its lane intervals (dvla up merges them into trace.json); then stop.
        await self.control.send(wire.Command(command="trace", args={"tag": "final"}))
        self._write_trace("final")
        await asyncio.sleep(1.0)  # let the trace command reach the others before the stop
        await self.control.send(wire.Command(command="stop", target="*"))
