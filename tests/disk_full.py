"""A disk that fills in the middle of a run, for the write-failure tests: from a chosen step on, no file larger
than a limit can be written (RLIMIT_FSIZE), so torch.save, safetensors and shutil meet a real I/O error (EFBIG,
"File too large"), as they would meet ENOSPC on a full disk.

Imported by tests in-process, or run as the trainer in place of train/main.py:

    KOALA_TEST_DISK_FULL="RANK:STEP:BYTES" accelerate launch tests/disk_full.py <overrides>

fills rank RANK's disk after step STEP (STEP=end: after the last step, before the export). BYTES=mkdir: the
folder of a checkpoint cannot be created there instead (ENOSPC), e.g. a node-local disk that is full.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from train.callbacks import Callback  # noqa: E402


class DiskFills(Callback):
    """From the end of step `step` (or from the end of training, before the export, with step=None), files over
    `max_bytes` cannot be written in this process. `release()` (also called when the loop stops on an error)
    lifts the limit."""

    def __init__(self, step: int | None, max_bytes: int | None) -> None:
        self.step, self.max_bytes = step, max_bytes  # max_bytes None: checkpoint folders cannot be created
        self._saved: tuple[Any, tuple[int, int]] | None = None
        self._mkdir: Any = None

    def fill(self) -> None:
        if self.max_bytes is None and self._mkdir is None:
            self._mkdir = mkdir = Path.mkdir

            def full(path: Path, *args: Any, **kwargs: Any) -> None:
                if path.name.startswith(".tmp-step_"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                mkdir(path, *args, **kwargs)

            Path.mkdir = full  # type: ignore[method-assign]
        elif self.max_bytes is not None and self._saved is None:
            # the kernel sends SIGXFSZ (which ends the process) unless it is ignored; then the write fails with EFBIG
            self._saved = (signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE))
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_bytes, self._saved[1][1]))

    def release(self) -> None:
        if self._mkdir is not None:
            Path.mkdir, self._mkdir = self._mkdir, None  # type: ignore[method-assign]
        if self._saved is not None:
            handler, limits = self._saved
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)
            signal.signal(signal.SIGXFSZ, handler)
            self._saved = None

    def on_step_end(self, run: Any, losses: Any) -> None:
        if self.step is not None and run.state.step == self.step:
            self.fill()

    def on_end(self, run: Any) -> None:
        if self.step is None:
            self.fill()

    def on_stop(self, run: Any) -> None:
        self.release()


def with_callback(callback: Callback) -> Any:
    """train.loop.setup with `callback` added (for monkeypatching)."""
    from train import loop

    setup = loop.setup

    def patched(cfg: Any, *, callbacks: list[Callback] | None = None, **kwargs: Any) -> Any:
        return setup(cfg, callbacks=[*(callbacks or []), callback], **kwargs)

    return patched


if __name__ == "__main__":
    from train import loop, main

    rank, step, max_bytes = os.environ["KOALA_TEST_DISK_FULL"].split(":")
    if os.environ.get("RANK", "0") == rank:
        loop.setup = with_callback(DiskFills(None if step == "end" else int(step),
                                             None if max_bytes == "mkdir" else int(max_bytes)))
    sys.exit(main.main(sys.argv[1:]))
