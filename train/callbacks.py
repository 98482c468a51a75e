"""Side features of a run as small callbacks on named events: progress bar, scalar logging, EMA, sample grids.

Events, in order: on_start(run) once; per optimizer step on_update(run) after a parameter update (skipped
updates do not fire it) and on_step_end(run, losses) with the step's detached loss sums; on_end(run) once.
Only the main process logs, draws and writes.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from train.loop import Run


class Callback:
    """Base class: every event is a no-op."""

    def on_start(self, run: Run) -> None: ...

    def on_update(self, run: Run) -> None: ...

    def on_step_end(self, run: Run, losses: dict[str, Tensor]) -> None: ...

    def on_end(self, run: Run) -> None: ...

    def on_stop(self, run: Run) -> None:
        """The loop ends early: an error is on its way out, or a stop request was checkpointed (on_end is not
        called then)."""


class EMA(Callback):
    """Exponential moving average of the student (diffusers' EMAModel), updated after each applied update."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.model = EMAModel(model.parameters(), decay=decay, model_cls=type(model), model_config=model.config)
        self._params = [p for p in model.parameters()]

    def on_update(self, run: Run) -> None:
        self.model.step(self._params)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the average beside the student: Accelerate loads it to the CPU, and EMAModel keeps the tensors it
        is given, so the next step would mix a CPU average with GPU weights."""
        self.model.load_state_dict(state)
        self.model.to(device=self._params[0].device)

    def copy_to(self, module: torch.nn.Module) -> None:
        """Write the averaged weights into `module`."""
        self.model.copy_to(module.parameters())


class ScalarLogger(Callback):
    """Every `log_every` steps: the mean of each loss term over the window and all processes, LR, grad norm,
    img/s, peak memory and the data stream's skip counts, to the tracker and the progress bar.

    Loss sums stay on the device between log steps, so the step itself never waits for the host.
    """

    def __init__(self, log_every: int, show_progress: bool = True) -> None:
        self.log_every = max(1, log_every)
        self.show_progress = show_progress
        self.bar = None
        self._sums: dict[str, Tensor] = {}
        self._count = 0
        self._t0 = 0.0
        self._paused0 = 0.0
        self._samples0 = 0
        self.last: dict[str, float] = {}

    def on_start(self, run: Run) -> None:
        if run.accelerator.is_main_process and self.show_progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.cfg.train.max_steps, initial=run.state.step, desc="distill",
                            unit="step", dynamic_ncols=True)
        self._start_window(run)

    def _start_window(self, run: Run) -> None:
        self._sums, self._count = {}, 0
        self._t0, self._paused0, self._samples0 = time.perf_counter(), run.paused_s, run.state.samples_seen

    def on_step_end(self, run: Run, losses: dict[str, Tensor]) -> None:
        for k, v in losses.items():
            self._sums[k] = self._sums.get(k, 0) + v
        self._count += 1
        if run.state.step % self.log_every and run.state.step != run.cfg.train.max_steps:
            if self.bar is not None:
                self.bar.update(1)
            return
        self._log_window(run)
        if self.bar is not None:
            self.bar.update(1)  # after the postfix is set: the redraw shows this window's values

    def _log_window(self, run: Run) -> None:
        """Reduce and log the window's means at run.state.step (every rank takes part), then start a new window."""
        names = sorted(self._sums)
        stacked = torch.stack([self._sums[k] / self._count for k in names])
        means = run.accelerator.reduce(stacked, reduction="mean").tolist()
        # training time only: checkpoint writes and preview grids in the window are left out of img/s
        elapsed = max(time.perf_counter() - self._t0 - (run.paused_s - self._paused0), 1e-9)
        logs = {f"loss/{k}": v for k, v in zip(names, means, strict=True)}
        logs["lr"] = run.last_lr  # the LR this step's update used
        if run.last_grad_norm is not None:
            logs["grad_norm"] = float(run.last_grad_norm)
        logs["img_per_s"] = (run.state.samples_seen - self._samples0) / elapsed
        logs["samples_seen"] = run.state.samples_seen
        logs["nonfinite_skipped"] = run.state.nonfinite_total
        if torch.cuda.is_available():
            logs["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        for reason, n in run.skip_counts_all_ranks().items():  # every rank's skips, not only the logger's
            logs[f"data/skipped_{reason}"] = n
        run.accelerator.log(logs, step=run.state.step)
        self.last = logs
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{logs['loss/total']:.4f}", kd=f"{logs['loss/kd']:.4f}",
                                 img_s=f"{logs['img_per_s']:.1f}", refresh=False)
        self._start_window(run)

    def on_end(self, run: Run) -> None:
        self.on_stop(run)

    def on_stop(self, run: Run) -> None:
        """Log the steps since the last log step when the run stops on request (the ranks agreed on it, so all of
        them are here for the reduction; after an error they may not be), then close the progress bar, so that the
        line printed next (an error, the stop notice) starts a line."""
        if run.stopping and self._count:
            self._log_window(run)
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class SampleGrid(Callback):
    """Every `every` steps (0: never) and, when `at_end`, at the end: teacher vs student images for fixed prompts
    and seeds, as one PNG (rows: prompts; columns: teacher, student) under <run>/samples/ and logged to the
    tracker."""

    def __init__(self, every: int, at_end: bool = True) -> None:
        self.every = every
        self.at_end = at_end
        self.last_path: Path | None = None
        self.skipped = 0  # grids that ran out of GPU memory or could not be written

    def on_step_end(self, run: Run, losses: dict[str, Tensor]) -> None:
        if self.every > 0 and run.state.step % self.every == 0 and run.state.step < run.cfg.train.max_steps:
            self.draw(run)

    def on_end(self, run: Run) -> None:
        if self.at_end:
            self.draw(run)

    def draw(self, run: Run) -> None:
        """Draw, save and log one grid (main process). A grid that runs out of GPU memory, or whose file cannot be
        written (a full disk, a quota), is skipped with one warning line and counted in `skipped`: a preview never
        ends a run."""
        if run.teacher.path is None:  # a random-weight benchmark teacher has no pipeline to sample with
            return
        started = time.perf_counter()
        try:
            self._draw(run)
        finally:
            run.paused_s += time.perf_counter() - started  # not training time: left out of the logged img/s

    def _draw(self, run: Run) -> None:
        if run.accelerator.is_main_process:
            from distill.preview import teacher_student_grid

            grid = None
            try:
                with run.preview_components() as components, run.student_for_export() as student:
                    grid = teacher_student_grid(
                        components, student, list(run.cfg.train.sample_prompts),
                        seed=run.cfg.train.sample_seed, steps=run.cfg.teacher.sampler.steps,
                        guidance_scale=run.cfg.teacher.sampler.guidance_scale, resolution=run.cfg.teacher.resolution,
                        timestep_spacing=run.cfg.teacher.sampler.timestep_spacing,
                    )
            except torch.OutOfMemoryError:
                self.skipped += 1
            if grid is None:  # outside the except block: its traceback (and the frames' tensors) are gone
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.last_path = None  # the summary names no older grid as this run's samples
                print(f"warning: sample grid of step {run.state.step} skipped: out of GPU memory ({self.skipped} "
                      "skipped); train.sample_every=0 train.sample_at_end=false turn the grids off",
                      file=sys.stderr)
            else:
                self._save(run, grid, run.output_dir / "samples" / f"step_{run.state.step:09d}.png")
        run.accelerator.wait_for_everyone()

    def _save(self, run: Run, grid: Any, path: Path) -> None:
        from train.checkpoint import write_error_reason

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
        except Exception as exc:
            reason = write_error_reason(exc)
            if reason is None:
                raise
            path.unlink(missing_ok=True)  # no half-written image
            self.skipped += 1
            self.last_path = None
            print(f"warning: sample grid of step {run.state.step} not written to {path}: {reason} ({self.skipped} "
                  "skipped); the run goes on", file=sys.stderr)
            return
        self.last_path = path
        run.log_image("samples/teacher_vs_student", path)


class Audit(Callback):
    """Per rank, one JSON line per step (step, LR, the sample keys it consumed) in <run>/audit/rank<r>.jsonl,
    and at the end the SHA-256 of the student's weights: evidence that a resumed or multi-process run consumed
    each sample once and ended with the same weights. Lines of steps redone after a resume appear again; the
    last line of a step counts."""

    def on_start(self, run: Run) -> None:
        self.path = run.output_dir / "audit" / f"rank{run.accelerator.process_index}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_step_end(self, run: Run, losses: dict[str, Tensor]) -> None:
        import json

        line = {"step": run.state.step, "lr": run.last_lr, "keys": run.last_keys}
        with self.path.open("a") as f:
            f.write(json.dumps(line) + "\n")

    def on_end(self, run: Run) -> None:
        import hashlib
        import json

        digest = hashlib.sha256()
        for name, tensor in sorted(run.unwrapped.state_dict().items()):
            digest.update(name.encode())
            raw = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(raw.view(torch.uint8).numpy().tobytes())  # bytes of any dtype (numpy has no bf16)
        out = self.path.with_name(self.path.stem + "_final.json")
        out.write_text(json.dumps({"step": run.state.step, "weights_sha256": digest.hexdigest()}))
