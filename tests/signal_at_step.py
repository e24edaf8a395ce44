"""`python -m neva_jax.main` that signals itself after a chosen step: a test driver.

    python tests/signal_at_step.py STEP SIGNAL [neva_jax.main flags ...]

Runs the real entry point with one `loop.Hooks.after_step` function added: once step
STEP is done (and its checkpoint, if one was due, has committed) the process sends
itself SIGNAL (SIGTERM or SIGKILL). The in-process tests use `signal_at` directly.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def signal_at(step: int, signum: int) -> Callable[[Any], None]:
    """An after-step hook: at `step`, wait for pending checkpoint writes, send `signum`."""

    def hook(loop: Any) -> None:
        if loop.step == step:
            loop.ckpt.wait()
            os.kill(os.getpid(), signum)

    return hook


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # this checkout's neva_jax
    from neva_jax import main
    from neva_jax.train import loop

    at, name = int(sys.argv[1]), sys.argv[2]
    del sys.argv[1:3]
    hooks = loop.Hooks(after_step=(signal_at(at, getattr(signal, name)),))
    loop.train = functools.partial(loop.train, hooks=hooks)
    main.run()
