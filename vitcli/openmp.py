"""How torch's OpenMP threads wait: chosen before torch (and its OpenMP runtime) loads.

`vit predict` and `vit attention` decode images in worker processes while the model runs on
the same CPU. With OpenMP's default waiting, a thread that reaches a barrier first spins for a
while; when the decoder has pre-empted its partner, the spinning burns the very core the
partner needs, and the whole forward pass slows to the pace of the pre-empted thread. Passive
waiting (sleep at once) gives the core back. It costs the forward pass a few percent when it
has the machine to itself and wins more than that end to end (bench/wait_policy.py; README).
"""

from __future__ import annotations

import os
import sys


def prefer_passive_waiting() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a policy or torch is already loaded
    (OpenMP reads it once, at load). Returns whether it was set."""
    if "OMP_WAIT_POLICY" in os.environ or "torch" in sys.modules:
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True
