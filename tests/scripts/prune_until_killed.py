"""Run ``hf-vitprune prune ARGS`` and hold it at one point until it is killed (``kill -9``), for the tests
that kill a run and re-run the same command (tests/test_cli_resume.py).

    python tests/scripts/prune_until_killed.py POINT READY_FILE prune ARGS...

POINT is ``save:N`` (inside the save of checkpoint-N: the weights and trainer_state.json written, the
pruning state not yet) or ``step:N`` (optimizer step N done, its checkpoint not yet saved). There the
script writes its process id to READY_FILE and sleeps; the caller sends SIGKILL. A run that never
reaches POINT exits with the command's status (or 99 on an exception), so the caller can tell.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def hold(ready: str) -> None:
    """Say where we are, then wait for the SIGKILL."""
    partial = Path(f"{ready}.partial")
    partial.write_text(str(os.getpid()))
    partial.replace(ready)  # the caller never reads a half-written file
    while True:
        time.sleep(60)


def install(point: str, ready: str) -> None:
    """Patch the pruning so that the run holds at ``point`` (see the module docstring)."""
    from transformers import TrainerCallback

    import hf_vitprune.state
    import hf_vitprune.trainer

    kind, _, number = point.partition(":")
    step = int(number)
    if kind == "save":
        save = hf_vitprune.state.PruningState.save

        def save_then_hold(self, directory):
            if f"checkpoint-{step}" in Path(directory).parts[-1]:
                hold(ready)
            return save(self, directory)

        hf_vitprune.state.PruningState.save = save_then_hold
    elif kind == "step":
        class HoldAfterStep(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    hold(ready)

        init = hf_vitprune.trainer.PruningTrainer.__init__

        def init_with_hold(self, *args, **kwargs):
            init(self, *args, **kwargs)
            self.add_callback(HoldAfterStep())

        hf_vitprune.trainer.PruningTrainer.__init__ = init_with_hold
    else:
        raise SystemExit(f"POINT must be save:N or step:N, not {point!r}")


def run(point: str, ready: str, argv: list[str]) -> int:
    install(point, ready)
    from hf_vitprune.cli import main

    return main(argv)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2], sys.argv[3:]))
