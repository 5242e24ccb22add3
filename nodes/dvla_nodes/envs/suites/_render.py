"""Small, fast offscreen frames for the suites' MuJoCo models, and resizing for the rest.

MuJoCo's defaults are made for screenshots: 4-fold multisampling and shadows make a 64-pixel frame
cost ~40 ms on a CPU rasteriser (measured: HalfCheetah through gymnasium's renderer, 11 → 630
steps/s once tuned). :func:`tune_model` drops the offscreen multisampling (it must run before a
GL context is made for the model); :func:`fast_flags` switches off shadows, reflections and the
skybox on a scene. Both change only how a frame looks, never the physics.
"""

from __future__ import annotations

from typing import Any

import mujoco
import numpy as np

_OFF = (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION)
_OFF_SKY = mujoco.mjtRndFlag.mjRND_SKYBOX


def tune_model(model: Any, size: int) -> None:
    """For ``model`` (a ``mujoco.MjModel``): no offscreen multisampling, an offscreen buffer of
    ``size`` squared instead of 640x480 and no shadow map (4096 squared by default: 64 MiB of
    the ~130 MiB a Meta-World renderer took; shadows are off anyway). Every environment has its
    own rendering context, so this is memory per environment. Call before a renderer exists."""
    model.vis.quality.offsamples = 0
    model.vis.quality.shadowsize = 0
    model.vis.global_.offwidth = size
    model.vis.global_.offheight = size


def fast_flags(scene: Any) -> None:
    """Shadows, reflections and skybox off on ``scene`` (a ``mujoco.MjvScene``)."""
    for flag in _OFF:
        scene.flags[flag] = 0
    scene.flags[_OFF_SKY] = 0


class FastRenderer:
    """Square RGB frames of one model from one camera (name, id, or None for the free camera).

    ``rotate`` turns the frame by 180 degrees, for cameras mounted upside down in their model
    (Meta-World's ``corner`` cameras). Owns a GL context: not thread-safe; call ``close``.
    """

    def __init__(self, model: Any, size: int, camera: str | int | None, rotate: bool = False):
        tune_model(model, size)
        self.size = size
        self.camera: str | int = -1 if camera is None else camera
        self.rotate = rotate
        self._renderer = mujoco.Renderer(model, size, size)

    def render(self, data: Any) -> np.ndarray:
        r = self._renderer
        r.update_scene(data, camera=self.camera)
        fast_flags(r.scene)
        image: np.ndarray = r.render()
        return np.ascontiguousarray(image[::-1, ::-1]) if self.rotate else image

    def close(self) -> None:
        self._renderer.close()


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (size, size, 3) from any uint8 (H, W, 3): the centre square, area-averaged when it
    is a whole multiple of ``size``, else nearest-neighbour."""
    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top : top + side, left : left + side, :3]
    if side == size:
        return np.ascontiguousarray(square)
    if side % size == 0:
        k = side // size
        pooled = square.reshape(size, k, size, k, 3).mean(axis=(1, 3))
        return np.asarray(np.rint(pooled), np.uint8)
    idx = (np.arange(size) * side) // size
    return np.ascontiguousarray(square[idx][:, idx])
