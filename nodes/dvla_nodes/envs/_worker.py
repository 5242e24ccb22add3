"""Entry point of a :class:`~dvla_nodes.envs.vector.RemoteVectorEnv` child process:
``python -m dvla_nodes.envs._worker READ_FD WRITE_FD NUM_ENVS IMAGE_SIZE``."""

from __future__ import annotations

import sys

from dvla_nodes.envs.vector import worker_main

if __name__ == "__main__":
    worker_main(*(int(a) for a in sys.argv[1:5]))
