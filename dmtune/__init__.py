"""dmtune: fine-tune language models toward constraints without catastrophic forgetting."""

import os

# OpenMP threads that spin while waiting fight over a busy machine's cores: with another job
# on 2 cores, 2 spinning threads ran ~5x slower than 1. Passive waiting costs little when the
# cores are free. Only a default: set OMP_WAIT_POLICY yourself to override (before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
