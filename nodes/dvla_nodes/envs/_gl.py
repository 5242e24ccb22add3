"""Offscreen GL selection. MuJoCo reads ``MUJOCO_GL`` when it is first imported, so this module
(which imports nothing heavy) runs before any ``import mujoco`` of the suite: EGL when libEGL is
installed, else OSMesa. An explicit ``MUJOCO_GL`` from the user is respected."""

from __future__ import annotations

import ctypes.util
import os


def configure_gl() -> str:
    """Choose the backend (if the user did not) and return it."""
    backend = os.environ.get("MUJOCO_GL")
    if backend is None:
        backend = "egl" if ctypes.util.find_library("EGL") else "osmesa"
        os.environ["MUJOCO_GL"] = backend
    os.environ.setdefault("PYOPENGL_PLATFORM", backend if backend != "glfw" else "")
    return backend


configure_gl()
