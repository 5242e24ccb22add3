"""The suite's one MJCF scene and its geometry constants.

A table, two free blocks (red, blue), two flat target squares (green, yellow) and a parallel
gripper on a mocap body. The mocap body's position is the point between the fingertips; its two
fingers slide on position actuators. All tasks use this scene, so one compiled model (and one
renderer) serves every environment in a process.
"""

from __future__ import annotations

import mujoco

from dvla_nodes.envs.tasks import BLOCKS, TARGETS

BLOCK_HALF = 0.02
TARGET_HALF = 0.04
FINGER_OPEN = 0.04  # finger centre offset from the grip point, gripper open (m)
FINGER_CLOSED = 0.008
FINGER_TRAVEL = FINGER_OPEN - FINGER_CLOSED
WORKSPACE_LO = (-0.22, -0.22, 0.003)
WORKSPACE_HI = (0.22, 0.22, 0.20)
CONTROL_DT = 0.05  # one env step (s)
PHYSICS_DT = 0.005
SUBSTEPS = round(CONTROL_DT / PHYSICS_DT)
MAX_DELTA = 0.05  # end-effector displacement for action 1.0 (m per step)

COLORS: dict[str, str] = {
    "red": "0.85 0.12 0.10 1",
    "blue": "0.12 0.25 0.90 1",
    "green": "0.15 0.75 0.20 1",
    "yellow": "0.95 0.85 0.10 1",
}


def scene_xml(image_size: int = 64) -> str:
    """The MJCF text of the scene, with an offscreen buffer of ``image_size`` pixels."""
    blocks = "\n".join(
        f'    <body name="block_{b}" pos="0 {0.1 * i} {BLOCK_HALF}"><freejoint name="block_{b}"/>'
        f'<geom name="block_{b}" type="box" size="{BLOCK_HALF} {BLOCK_HALF} {BLOCK_HALF}" '
        f'rgba="{COLORS[b]}" mass="0.1" friction="0.6 0.005 0.0001"/></body>'
        for i, b in enumerate(BLOCKS)
    )
    targets = "\n".join(
        f'    <body name="target_{t}" mocap="true" pos="{0.1 * i} 0 0.0005">'
        f'<geom name="target_{t}" type="box" size="{TARGET_HALF} {TARGET_HALF} 0.0005" '
        f'rgba="{COLORS[t]}" contype="0" conaffinity="0"/></body>'
        for i, t in enumerate(TARGETS)
    )
    return f"""<mujoco model="dvla_tabletop">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{PHYSICS_DT}" integrator="implicitfast"/>
  <visual>
    <quality offsamples="0" shadowsize="0"/>
    <global offwidth="{image_size}" offheight="{image_size}"/>
    <headlight ambient="0.55 0.55 0.55" diffuse="0.45 0.45 0.45" specular="0 0 0"/>
  </visual>
  <worldbody>
    <camera name="top" pos="0 0 0.95" xyaxes="1 0 0 0 1 0" fovy="29"/>
    <geom name="table" type="box" size="0.3 0.3 0.02" pos="0 0 -0.02" rgba="0.45 0.42 0.40 1"
          friction="0.6 0.005 0.0001"/>
{targets}
{blocks}
    <body name="gripper" mocap="true" pos="0 0 0.12">
      <geom name="palm" type="box" size="0.05 0.014 0.006" pos="0 0 0.056"
            rgba="0.92 0.92 0.92 1" contype="0" conaffinity="0"/>
      <body name="finger_l" pos="{-FINGER_OPEN} 0 0.025">
        <joint name="finger_l" type="slide" axis="1 0 0" range="0 {FINGER_TRAVEL}" damping="4"/>
        <geom name="finger_l" type="box" size="0.006 0.012 0.025" rgba="0.7 0.7 0.7 1" mass="0.05"/>
      </body>
      <body name="finger_r" pos="{FINGER_OPEN} 0 0.025">
        <joint name="finger_r" type="slide" axis="-1 0 0" range="0 {FINGER_TRAVEL}" damping="4"/>
        <geom name="finger_r" type="box" size="0.006 0.012 0.025" rgba="0.7 0.7 0.7 1" mass="0.05"/>
      </body>
    </body>
  </worldbody>
  <contact>
    <exclude body1="finger_l" body2="finger_r"/>
  </contact>
  <actuator>
    <position name="finger_l" joint="finger_l" kp="100" ctrlrange="0 {FINGER_TRAVEL}"/>
    <position name="finger_r" joint="finger_r" kp="100" ctrlrange="0 {FINGER_TRAVEL}"/>
  </actuator>
</mujoco>
"""


def build_model(image_size: int = 64) -> mujoco.MjModel:
    """Compile the scene, with multisampling off (a 64-px image does not need it)."""
    model = mujoco.MjModel.from_xml_string(scene_xml(image_size))
    model.vis.quality.offsamples = 0
    return model
