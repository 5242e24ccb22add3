"""One tabletop episode over a shared compiled model: layout sampling, stepping, success and
shaping. :class:`TabletopSim` holds no renderer and no gymnasium machinery, so the gymnasium
env and the vectorised env both build on it; rendering goes through a :class:`SceneRenderer`
that many sims of one process share.

Grasping is *kinematic*: when the gripper closes with a block between its fingertips the block
is attached to the gripper (carried rigidly) until the gripper opens. This keeps pick-and-place
robust at 10 Hz control without tuning friction grasps; pushing is ordinary contact physics.
"""

from __future__ import annotations

from dataclasses import dataclass

import mujoco
import numpy as np

from dvla_nodes.envs import _gl, scene
from dvla_nodes.envs.tasks import BLOCKS, TARGETS, TaskSpec

PROPRIO_DIM = 7
ACTION_DIM = 4
STATE_DIM = 3 * len(BLOCKS) + 2 * len(TARGETS)
LIFT_HEIGHT = 0.09  # block centre height that counts as lifted (m)
SUCCESS_RADIUS = 0.03  # block centre within this of a target centre (m)
REACH_RADIUS = 0.03
PUSH_CONTACT = 0.035  # pusher centre behind the block centre while pushing (m)
PUSH_Z_CONTACT = 0.008  # pusher height while pushing (m)


configure_gl = _gl.configure_gl


@dataclass(frozen=True, slots=True)
class SceneState:
    """Privileged state of one episode (for experts, shaping and tests), positions in metres."""

    grip: np.ndarray  # (3,) the point between the fingertips
    closed: bool  # gripper command
    grasped: str | None  # the block attached to the gripper, if any
    blocks: dict[str, np.ndarray]  # name -> (3,) centre
    targets: dict[str, np.ndarray]  # name -> (2,) centre


class SceneRenderer:
    """Offscreen renderer for one compiled model, shared by every sim on it (one GL context).

    Not thread-safe: the GL context belongs to the thread that created it. Close it explicitly.
    """

    def __init__(self, model: mujoco.MjModel, image_size: int) -> None:
        self.image_size = image_size
        self._renderer = mujoco.Renderer(model, image_size, image_size)
        self._camera = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "top")

    def render(self, data: mujoco.MjData, out: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 (H, W, 3) from the top camera; written into ``out`` when given."""
        r = self._renderer
        r.update_scene(data, camera=self._camera)
        flags = r.scene.flags
        flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
        flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0
        image: np.ndarray = r.render(out=out)
        return image

    def close(self) -> None:
        self._renderer.close()


class TabletopSim:
    """One environment instance: a ``MjData`` on a shared ``MjModel`` plus the episode's task.

    ``reset(spec, seed)`` fully determines the episode: the layout, the instruction paraphrase
    and the start pose come from ``numpy.random.default_rng(seed)``, and physics is deterministic.
    """

    def __init__(self, model: mujoco.MjModel) -> None:
        self.model = model
        self.data = mujoco.MjData(model)
        m = model
        self._mocap_grip = int(
            m.body_mocapid[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "gripper")]
        )
        self._mocap_target = {
            t: int(m.body_mocapid[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, f"target_{t}")])
            for t in TARGETS
        }
        self._qadr = {
            b: int(m.jnt_qposadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, f"block_{b}")])
            for b in BLOCKS
        }
        self._vadr = {
            b: int(m.jnt_dofadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, f"block_{b}")])
            for b in BLOCKS
        }
        self._finger_q = [
            int(m.jnt_qposadr[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, f)])
            for f in ("finger_l", "finger_r")
        ]
        self._lo = np.array(scene.WORKSPACE_LO)
        self._hi = np.array(scene.WORKSPACE_HI)
        self.spec: TaskSpec | None = None
        self.instruction = ""
        self.steps = 0
        self.closed = False
        self.grasped: str | None = None
        self._grasp_offset = np.zeros(3)
        self._grasp_quat = np.array([1.0, 0.0, 0.0, 0.0])

    # ----------------------------------------------------------------- episode

    def reset(self, spec: TaskSpec, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.spec = spec
        self.instruction = spec.instructions[int(rng.integers(len(spec.instructions)))]
        self.steps = 0
        self.closed = False
        self.grasped = None
        d = self.data
        mujoco.mj_resetData(self.model, d)
        blocks, targets = _sample_layout(spec, rng)
        for b in BLOCKS:
            q = self._qadr[b]
            yaw = float(rng.uniform(-0.3, 0.3))
            d.qpos[q : q + 3] = (*blocks[b], scene.BLOCK_HALF)
            d.qpos[q + 3 : q + 7] = (np.cos(yaw / 2), 0.0, 0.0, np.sin(yaw / 2))
        for t in TARGETS:
            d.mocap_pos[self._mocap_target[t]] = (*targets[t], 0.0005)
        d.mocap_pos[self._mocap_grip] = (
            float(rng.uniform(-0.1, 0.1)),
            float(rng.uniform(-0.1, 0.1)),
            float(rng.uniform(0.09, 0.13)),
        )
        d.ctrl[:] = 0.0
        mujoco.mj_forward(self.model, d)

    def step(self, action: np.ndarray) -> None:
        """Apply one action (dx, dy, dz, grip) in [-1, 1]: ``grip > 0`` closes the gripper."""
        a = np.clip(np.asarray(action, dtype=np.float64), -1.0, 1.0)
        d = self.data
        start = d.mocap_pos[self._mocap_grip].copy()
        goal = np.clip(start + a[:3] * scene.MAX_DELTA, self._lo, self._hi)
        closed = bool(a[3] > 0.0)
        if closed and not self.closed and self.grasped is None:
            self._try_grasp(start)
        elif not closed and self.grasped is not None:
            self._release()
        self.closed = closed
        d.ctrl[:] = scene.FINGER_TRAVEL if closed else 0.0
        n = scene.SUBSTEPS
        for k in range(n):
            d.mocap_pos[self._mocap_grip] = start + (goal - start) * ((k + 1) / n)
            mujoco.mj_step(self.model, d)
            if self.grasped is not None:
                self._carry()
        if self.grasped is not None:
            mujoco.mj_kinematics(self.model, d)
        self.steps += 1

    # ----------------------------------------------------------------- grasping

    def _try_grasp(self, grip: np.ndarray) -> None:
        for b in BLOCKS:
            q = self._qadr[b]
            rel = self.data.qpos[q : q + 3] - grip
            if abs(rel[0]) < 0.018 and abs(rel[1]) < 0.018 and -0.005 < rel[2] < 0.04:
                self.grasped = b
                self._grasp_offset = rel.copy()
                self._grasp_quat = self.data.qpos[q + 3 : q + 7].copy()
                return

    def _carry(self) -> None:
        assert self.grasped is not None
        d = self.data
        q, v = self._qadr[self.grasped], self._vadr[self.grasped]
        d.qpos[q : q + 3] = d.mocap_pos[self._mocap_grip] + self._grasp_offset
        d.qpos[q + 3 : q + 7] = self._grasp_quat
        d.qvel[v : v + 6] = 0.0

    def _release(self) -> None:
        self.grasped = None

    # ----------------------------------------------------------------- readouts

    def state(self) -> SceneState:
        d = self.data
        return SceneState(
            grip=d.mocap_pos[self._mocap_grip].copy(),
            closed=self.closed,
            grasped=self.grasped,
            blocks={b: d.qpos[self._qadr[b] : self._qadr[b] + 3].copy() for b in BLOCKS},
            targets={t: d.mocap_pos[self._mocap_target[t]][:2].copy() for t in TARGETS},
        )

    def privileged(self, out: np.ndarray | None = None) -> np.ndarray:
        """float32 (STATE_DIM,): every block's centre (xyz) then every target's centre (xy),
        scaled like the proprioception (x, y / 0.2; z offset 0.1 / 0.1). Not an observation:
        it supervises auxiliary losses (and lets tests look inside)."""
        d = self.data
        vals: list[float] = []
        for b in BLOCKS:
            p = d.qpos[self._qadr[b] : self._qadr[b] + 3]
            vals += [p[0] / 0.2, p[1] / 0.2, (p[2] - 0.1) / 0.1]
        for t in TARGETS:
            p = d.mocap_pos[self._mocap_target[t]]
            vals += [p[0] / 0.2, p[1] / 0.2]
        if out is None:
            out = np.empty(STATE_DIM, dtype=np.float32)
        out[:] = vals
        return out

    def proprio(self, out: np.ndarray | None = None) -> np.ndarray:
        """float32 (7,): grip xyz (normalised), finger opening, gripper command, grasp flag,
        elapsed fraction of the episode."""
        d = self.data
        g = d.mocap_pos[self._mocap_grip]
        opening = 1.0 - 2.0 * float(np.mean(d.qpos[self._finger_q])) / scene.FINGER_TRAVEL
        spec = self.spec
        frac = self.steps / spec.max_steps if spec is not None else 0.0
        vals = (
            g[0] / 0.2,
            g[1] / 0.2,
            (g[2] - 0.1) / 0.1,
            opening,
            1.0 if self.closed else -1.0,
            1.0 if self.grasped is not None else -1.0,
            2.0 * frac - 1.0,
        )
        if out is None:
            out = np.empty(PROPRIO_DIM, dtype=np.float32)
        out[:] = vals
        return out

    def success(self) -> bool:
        spec = self.spec
        assert spec is not None, "reset() first"
        d = self.data
        q = self._qadr[spec.block]
        block = d.qpos[q : q + 3]
        grip = d.mocap_pos[self._mocap_grip]
        if spec.skill == "reach":
            centre = grip + np.array([0.0, 0.0, scene.BLOCK_HALF])
            return bool(np.linalg.norm(centre - block) < REACH_RADIUS)
        if spec.skill == "pick":
            return self.grasped == spec.block and block[2] > LIFT_HEIGHT
        assert spec.target is not None
        tgt = d.mocap_pos[self._mocap_target[spec.target]][:2]
        on_target = bool(np.linalg.norm(block[:2] - tgt) < SUCCESS_RADIUS)
        resting = block[2] < scene.BLOCK_HALF + 0.01 and self.grasped is None
        return on_target and resting

    def potential(self) -> float:
        """Shaping potential (higher is closer to success, <= 0): distances in metres to the
        current sub-goal. Rewards ``potential(t+1) - potential(t)`` leave optimal policies
        unchanged (potential-based shaping)."""
        spec = self.spec
        assert spec is not None, "reset() first"
        d = self.data
        q = self._qadr[spec.block]
        block = d.qpos[q : q + 3]
        grip = d.mocap_pos[self._mocap_grip]
        reach = float(np.linalg.norm(grip + np.array([0.0, 0.0, scene.BLOCK_HALF]) - block))
        if spec.skill == "reach":
            return -reach
        if spec.skill == "pick":
            held = self.grasped == spec.block
            lift = max(0.0, LIFT_HEIGHT + 0.01 - float(block[2]))
            return -(0.0 if held else reach + 0.05) - lift
        assert spec.target is not None
        tgt = d.mocap_pos[self._mocap_target[spec.target]][:2]
        place = float(np.linalg.norm(block[:2] - tgt))
        if spec.skill == "push":
            # The pusher's sub-goal is the contact point behind the block on the line to the
            # target (where the scripted expert pushes from), not the block's centre: a
            # gripper passing over the block to get behind it is not penalised.
            to_goal = tgt - block[:2]
            u = to_goal / max(float(np.linalg.norm(to_goal)), 1e-6)
            behind = np.array([*(block[:2] - PUSH_CONTACT * u), PUSH_Z_CONTACT])
            return -0.3 * float(np.linalg.norm(grip - behind)) - place
        held = self.grasped == spec.block
        return -(0.0 if held else 0.3 * reach) - place - (0.02 if held else 0.0)


def _sample_layout(
    spec: TaskSpec, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Block and target centres (xy), pairwise apart; for pushes, the other block is kept off
    the push lane so the straight push the task asks for is possible."""
    names = [*(f"b:{b}" for b in BLOCKS), *(f"t:{t}" for t in TARGETS)]
    for _ in range(1000):
        pos = {n: rng.uniform(-0.15, 0.15, size=2) for n in names}
        pts = list(pos.values())
        if min(np.linalg.norm(a - b) for i, a in enumerate(pts) for b in pts[i + 1 :]) < 0.09:
            continue
        if spec.target is not None:
            b0, g = pos[f"b:{spec.block}"], pos[f"t:{spec.target}"]
            dist = float(np.linalg.norm(g - b0))
            if spec.skill == "push" and not 0.1 <= dist <= 0.22:
                continue
            if spec.skill == "push":
                u = (g - b0) / dist
                behind = b0 - 0.07 * u
                if np.any(np.abs(behind) > 0.2):
                    continue
                other = next(pos[f"b:{b}"] for b in BLOCKS if b != spec.block)
                if _segment_distance(other, behind, g) < 0.075:
                    continue
        break
    blocks = {b: pos[f"b:{b}"] for b in BLOCKS}
    targets = {t: pos[f"t:{t}"] for t in TARGETS}
    return blocks, targets


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / float(np.dot(ab, ab)), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))
