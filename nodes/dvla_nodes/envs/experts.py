"""Scripted experts: closed-loop controllers that read the privileged scene state and return an
action in [-1, 1]^4 (dx, dy, dz, grip). They are the source of behaviour-cloning demonstrations
and the proof, in tests, that every task is solvable within its episode limit."""

from __future__ import annotations

import numpy as np

from dvla_nodes.envs import scene
from dvla_nodes.envs.sim import SceneState
from dvla_nodes.envs.tasks import TaskSpec

SAFE_Z = 0.07  # fingertips clear of a block's top (m)
PUSH_Z = 0.008
PUSH_BACKOFF = 0.048  # pusher centre behind the block centre (m)
PUSH_SPEED = 0.03
OPEN, CLOSE = -1.0, 1.0


def _move(grip: np.ndarray, goal: np.ndarray, grip_cmd: float) -> np.ndarray:
    delta = (goal - grip) / scene.MAX_DELTA
    return np.array([*np.clip(delta, -1.0, 1.0), grip_cmd], dtype=np.float32)


def _go_above_then_down(
    grip: np.ndarray, xy: np.ndarray, z: float, grip_cmd: float, tol: float = 0.006
) -> np.ndarray:
    """Travel at a safe height until over ``xy``, then descend to ``z``."""
    err = float(np.linalg.norm(grip[:2] - xy))
    if err > tol:
        if grip[2] < SAFE_Z - 0.01 and err > 0.03:
            return _move(grip, np.array([grip[0], grip[1], SAFE_Z]), grip_cmd)
        return _move(
            grip, np.array([xy[0], xy[1], max(grip[2], SAFE_Z if err > 0.03 else z)]), grip_cmd
        )
    return _move(grip, np.array([xy[0], xy[1], z]), grip_cmd)


def expert_action(spec: TaskSpec, s: SceneState) -> np.ndarray:
    """The expert's action for task ``spec`` in state ``s``."""
    grip = s.grip
    block = s.blocks[spec.block]
    if spec.skill == "reach":
        return _go_above_then_down(grip, block[:2], block[2] - scene.BLOCK_HALF, OPEN)
    if spec.skill == "pick":
        if s.grasped == spec.block:
            return _move(grip, np.array([grip[0], grip[1], 0.13]), CLOSE)
        return _pick(grip, block, s)
    assert spec.target is not None
    target = s.targets[spec.target]
    if spec.skill == "place":
        if s.grasped == spec.block:
            err = float(np.linalg.norm(block[:2] - target))
            if err > 0.006:
                goal_xy = grip[:2] + (target - block[:2])
                if grip[2] < SAFE_Z - 0.005 and err > 0.02:
                    return _move(grip, np.array([grip[0], grip[1], SAFE_Z + 0.01]), CLOSE)
                return _move(grip, np.array([goal_xy[0], goal_xy[1], grip[2]]), CLOSE)
            if block[2] > scene.BLOCK_HALF + 0.006:
                return _move(grip, grip - np.array([0.0, 0.0, block[2] - scene.BLOCK_HALF]), CLOSE)
            return _move(grip, grip, OPEN)
        if float(np.linalg.norm(block[:2] - target)) < 0.01 and block[2] < scene.BLOCK_HALF + 0.01:
            return _move(grip, np.array([grip[0], grip[1], SAFE_Z]), OPEN)
        return _pick(grip, block, s)
    return _push(grip, block, target)


def _pick(grip: np.ndarray, block: np.ndarray, s: SceneState) -> np.ndarray:
    err = float(np.linalg.norm(grip[:2] - block[:2]))
    if s.closed:  # closed on nothing: open before trying again
        return _move(grip, np.array([grip[0], grip[1], max(grip[2], 0.03)]), OPEN)
    z = block[2] - scene.BLOCK_HALF + 0.004
    if err <= 0.006 and grip[2] <= z + 0.004:
        return _move(grip, grip, CLOSE)
    return _go_above_then_down(grip, block[:2], z, OPEN)


def _push(grip: np.ndarray, block: np.ndarray, target: np.ndarray) -> np.ndarray:
    to_goal = target - block[:2]
    dist = float(np.linalg.norm(to_goal))
    if dist < 0.012:
        return _move(grip, np.array([grip[0], grip[1], SAFE_Z]), CLOSE)
    u = to_goal / dist
    rel = grip[:2] - block[:2]
    along = float(np.dot(rel, u))
    cross = float(np.linalg.norm(rel - along * u))
    behind = block[:2] - PUSH_BACKOFF * u
    in_lane = along < -0.015 and cross < 0.012  # in contact the pusher sits ~3 cm behind
    low = grip[2] <= PUSH_Z + 0.01
    if low and not in_lane and along < -0.04:
        # still behind the block: slide back onto the lane at table height (no lift)
        return _move(grip, np.array([behind[0], behind[1], PUSH_Z]), CLOSE)
    if not in_lane or not low:
        if not in_lane and grip[2] < SAFE_Z - 0.01 and float(np.linalg.norm(rel)) < 0.075:
            return _move(grip, np.array([grip[0], grip[1], SAFE_Z]), CLOSE)
        return _go_above_then_down(grip, behind, PUSH_Z, CLOSE, tol=0.005)
    # Advance along the lane, steering back onto the line through the block and the goal.
    lane_point = block[:2] - (PUSH_BACKOFF - 0.005) * u
    correction = (lane_point - grip[:2]) - float(np.dot(lane_point - grip[:2], u)) * u
    step = min(PUSH_SPEED, dist)
    goal_xy = grip[:2] + step * u + correction
    return _move(grip, np.array([goal_xy[0], goal_xy[1], PUSH_Z]), CLOSE)
