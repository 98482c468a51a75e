"""Scale-out and fault tolerance, as separate processes: two gloo ranks agree, under DDP and under DeepSpeed ZeRO-2;
SIGKILL after or during a checkpoint loses nothing; SIGTERM and a STOP file checkpoint and exit 0."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "train" / "main.py")
pytestmark = pytest.mark.slow


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    env.update(extra)
    return env


def _args(out: Path, shards: Path, tiny: Path, *extra: str) -> list[str]:
    """The trainer's overrides: these defaults, each replaced by an `extra` of the same key (main refuses a key
    given twice)."""
    args = {o.partition("=")[0]: o for o in (
        "+experiment=demo", f"train.output_dir={out}", f"data.shards={shards}", f"teacher.path={tiny}",
        "data.num_workers=0", "tracking=none", "train.export=false", "train.audit=true", "train.sample_every=0",
        "train.sample_at_end=false", "train.ema=true", "train.lr_schedule=cosine", "train.warmup_steps=2", *extra)}
    return list(args.values())


def _start(args: list[str], nproc: int = 1, launch: tuple[str, ...] = ("--multi_gpu",), script: str = MAIN,
           **env: str) -> subprocess.Popen:
    """The trainer (`script`) as a process: alone, or `nproc` ranks started by `accelerate launch <launch>`."""
    if nproc == 1:
        cmd = [sys.executable, script, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), script, *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _run(args: list[str], nproc: int = 1, launch: tuple[str, ...] = ("--multi_gpu",)) -> dict:
    code, out, err = _finish(_start(args, nproc, launch))
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _audit(out: Path, rank: int = 0) -> dict[int, dict]:
    """step -> its audit line; a step redone after a resume counts with its last line."""
    lines = [json.loads(x) for x in (out / "audit" / f"rank{rank}.jsonl").read_text().splitlines() if x]
    return {line["step"]: line for line in lines}


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1][-3000:]}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def _student(out: Path, step: int) -> dict[str, torch.Tensor]:
    folder = out / "checkpoints" / f"step_{step:09d}" / "student"
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


# 2 ranks x micro-batch 2 x accumulation 2, clipping active (gradient norms here are about 7, clipped to 0.05); 12 demo
# samples in 4 shards, so each rank's 6 samples of an epoch end in the middle of step 2
SCALE_OUT = ("train.max_steps=3", "train.global_batch_size=8", "train.micro_batch_size=2", "train.max_grad_norm=0.05",
             "train.checkpoint_every=1")


@pytest.fixture(scope="module")
def ddp_two_ranks(tmp_path_factory, demo_shards, tiny_pipeline_dir) -> Path:
    """A 2-rank DDP run of SCALE_OUT (fp32), shared by the tests that compare with it."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    assert _run(_args(out, demo_shards, tiny_pipeline_dir, *SCALE_OUT), nproc=2)["steps"] == 3
    return out


def test_two_ranks_agree_consume_disjoint_samples_and_share_the_lr_schedule(tmp_path, demo_shards,
                                                                            tiny_pipeline_dir, ddp_two_ranks):
    two = ddp_two_ranks
    finals = [json.loads((two / "audit" / f"rank{r}_final.json").read_text()) for r in (0, 1)]
    assert finals[0]["weights_sha256"] == finals[1]["weights_sha256"]  # bitwise-identical students
    keys = [[k for _, line in sorted(_audit(two, r).items()) for k in line["keys"]] for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 12  # 3 steps x 2 micro-batches x 2 samples: two epochs per rank
    for epoch in (keys[0][:6], keys[1][:6]), (keys[0][6:], keys[1][6:]):
        # per epoch: each rank sees 6 distinct samples, the two halves are disjoint and cover all 12
        assert all(len(set(half)) == 6 for half in epoch)
        assert not set(epoch[0]) & set(epoch[1]) and len(set(epoch[0]) | set(epoch[1])) == 12

    one = tmp_path / "one"  # the same global batch from one process (accumulation 4)
    _run(_args(one, demo_shards, tiny_pipeline_dir, *SCALE_OUT, "train.checkpoint_every=0"))
    lr_two = [line["lr"] for _, line in sorted(_audit(two).items())]
    lr_one = [line["lr"] for _, line in sorted(_audit(one).items())]
    assert lr_two == lr_one and len(set(lr_one)) > 1  # warmup + cosine, identical per optimizer step


TWO_RANKS = """
import os, sys, time
sys.path.insert(0, sys.argv[2])
import torch.distributed as dist
from train.loop import Run, _process_group
_process_group(float(sys.argv[1]))
rank = dist.get_rank()


class Loader:  # rank 0 met 5 bad images, rank 1 met 6 and a truncated tar
    def skip_counts(self):
        return {"bad_image": 5} if rank == 0 else {"bad_image": 6, "tar_error": 1}


run = Run.__new__(Run)
run.loader = Loader()
print(f"rank {rank} skips {run.skip_counts_all_ranks()}", flush=True)
if rank == 1:  # rank 1 is slow (a long checkpoint write): it is back only after rank 0 stopped waiting for it
    t0 = time.time()
    while not os.path.exists(sys.argv[3]) and time.time() - t0 < 60:
        time.sleep(0.1)
    sys.exit(0)
t0 = time.time()
try:
    dist.barrier()
    print(f"rank {rank} passed")
except RuntimeError as err:
    print(f"rank {rank} gave up after {time.time() - t0:.1f} s: {str(err)[:200]}", flush=True)
open(sys.argv[3], "w").close()
"""


def test_two_ranks_sum_their_skip_counts_and_give_up_waiting_after_the_collective_timeout(tmp_path):
    """Logged skip counts are every rank's, not only the logger's; and train.collective_timeout_min (here 0.2,
    12 s: the ranks' start-up on a busy machine must fit in it too) bounds how long a rank waits at a barrier for a
    slow one."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    _, out, err = _finish(_start(["0.2", str(ROOT), str(tmp_path / "rank0_done")], nproc=2, script=str(script)),
                          timeout=120)
    # the two ranks share one stdout, so their lines may interleave: match the pieces, not whole lines
    skips = dict(re.findall(r"rank (\d) skips (\{[^}]*\})", out))
    assert skips == {"0": "{'bad_image': 11, 'tar_error': 1}", "1": "{'bad_image': 11, 'tar_error': 1}"}, (out, err)
    given_up = re.search(r"rank 0 gave up after ([\d.]+) s: ", out)
    assert given_up and "rank 0 passed" not in out, out  # rank 0 stops waiting long before rank 1 arrives
    assert 11 < float(given_up.group(1)) < 20


def test_deepspeed_zero2_trains_saves_and_resumes_exactly(tmp_path, demo_shards, tiny_pipeline_dir):
    """The shipped ZeRO-2 accelerate config, two ranks on the CPU (gloo), bf16: the student's inputs follow its
    bf16 weights, the feature hooks fire on the engine's module (the step raises otherwise), both ranks hold the
    same student, and a run resumed from the step-2 checkpoint (partitioned fp32 optimizer states, LR schedule,
    RNG, data position) ends bitwise like the uninterrupted one."""
    launch = ("--config_file", str(ROOT / "conf" / "accelerate" / "deepspeed_zero2.yaml"))
    common = ("train.max_steps=3", "train.checkpoint_every=2", "train.global_batch_size=2",
              "train.micro_batch_size=1", "train.mixed_precision=bf16")  # DeepSpeed's bf16 mode, as on GPUs
    full = tmp_path / "full"
    assert _run(_args(full, demo_shards, tiny_pipeline_dir, *common), nproc=2, launch=launch)["steps"] == 3
    step2 = full / "checkpoints" / "step_000000002"
    assert sorted(p.name for p in (step2 / "pytorch_model").iterdir()) == [
        "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
        "mp_rank_00_model_states.pt"]  # DeepSpeed's own layout: the optimizer split over 2 ranks
    finals = [json.loads((full / "audit" / f"rank{r}_final.json").read_text()) for r in (0, 1)]
    assert finals[0]["weights_sha256"] == finals[1]["weights_sha256"]
    with pytest.raises(AssertionError):  # the student did train between the two checkpoints
        _assert_same_weights(_student(full, 2), _student(full, 3))
    # the saved student is the fp32 master copy gathered from the optimizer, not the bf16 working weights
    saved = _student(full, 3)
    assert all(t.dtype == torch.float32 for t in saved.values())
    assert any(not torch.equal(t, t.bfloat16().float()) for t in saved.values())

    resumed = tmp_path / "resumed"
    summary = _run(_args(resumed, demo_shards, tiny_pipeline_dir, *common, f"train.resume={step2}"), nproc=2,
                   launch=launch)
    assert summary["steps"] == 3
    _assert_same_weights(_student(resumed, 3), _student(full, 3))
    for rank in (0, 1):
        seen_full, seen_resumed = _audit(full, rank), _audit(resumed, rank)
        assert sorted(seen_resumed) == [3]
        assert seen_resumed[3] == seen_full[3]  # keys and LR


def test_deepspeed_zero2_updates_like_ddp(tmp_path, demo_shards, tiny_pipeline_dir, ddp_two_ranks):
    """SCALE_OUT in fp32: ZeRO-2's partitioned accumulation, clipping and AdamW give the student DDP gives, to float
    rounding."""
    zero2 = tmp_path / "zero2"
    _run(_args(zero2, demo_shards, tiny_pipeline_dir, *SCALE_OUT), nproc=2,
         launch=("--config_file", str(ROOT / "conf" / "accelerate" / "deepspeed_zero2.yaml")))
    a, b, a2 = _student(zero2, 3), _student(ddp_two_ranks, 3), _student(zero2, 2)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max((a[k] - a2[k]).abs().max().item() for k in a)
    assert diff < 1e-6 and moved > 100 * max(diff, 1e-8), (diff, moved)


@pytest.mark.parametrize("rank, max_bytes", [
    (1, 2**20),  # its optimizer partition fails in DeepSpeed's checkpoint engine
    (0, 16 * 2**10),  # its model states fail there, then its copy of DeepSpeed's recovery script fails outside it
    (1, "mkdir"),  # it cannot create the checkpoint's folder: before the fix it skipped DeepSpeed's collectives
])
def test_a_full_disk_on_one_deepspeed_rank_ends_every_rank_with_one_line(tmp_path, demo_shards, tiny_pipeline_dir,
                                                                         rank, max_bytes):
    """ZeRO-2, two ranks: one rank's disk fills at the end of step 2, so its part of the step-2 checkpoint fails in
    DeepSpeed's save, before DeepSpeed's closing barrier. The ranks agree on the failure: the launch ends (before
    the fix it waited at that barrier until the collective timeout), with exit code 5 and one line naming the
    failed rank and the step-1 checkpoint; no rank prints a traceback, and the partial folder is gone. A rank that
    cannot even create the folder (a full node-local disk) is agreed on before any rank enters DeepSpeed's save.
    fp32: the failure path does not depend on the precision, and bf16 steps are slow on CPUs."""
    from train.checkpoint import latest_checkpoint, temp_dir

    out = tmp_path / "run"
    args = _args(out, demo_shards, tiny_pipeline_dir, "train.max_steps=3", "train.checkpoint_every=1",
                 "train.global_batch_size=4", "train.micro_batch_size=2", "train.ema=false")
    proc = _start(args, nproc=2, launch=("--config_file", str(ROOT / "conf" / "accelerate" / "deepspeed_zero2.yaml")),
                  script=str(ROOT / "tests" / "disk_full.py"), KOALA_TEST_DISK_FULL=f"{rank}:2:{max_bytes}")
    try:
        code, _, err = _finish(proc, timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the ranks did not end: one of them waits for the other")
    assert code != 0
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    assert "step 2" in errors[0] and f"(rank {rank})" in errors[0] and "step_000000001" in errors[0], errors[0]
    assert "Traceback" not in "".join(ln for ln in err.splitlines() if ln.startswith("[rank")), err[-3000:]
    assert re.search(r"Root Cause.*?exitcode\s*:\s*5\b", err, re.S), err[-2000:]
    assert not temp_dir(out, 2).exists() and latest_checkpoint(out).name == "step_000000001"


def test_sigkill_after_a_checkpoint_then_resume_matches_an_uninterrupted_run(tmp_path, demo_shards,
                                                                             tiny_pipeline_dir):
    common = ("train.max_steps=12", "train.checkpoint_every=4", "train.micro_batch_size=2",
              "train.global_batch_size=2")
    full = tmp_path / "full"
    uninterrupted = _start(_args(full, demo_shards, tiny_pipeline_dir, *common))  # beside the cut run: 2 cores

    cut = tmp_path / "cut"
    kill_at = random.Random().randint(5, 11)  # any step after the first checkpoint
    proc = _start(_args(cut, demo_shards, tiny_pipeline_dir, *common))
    audit = cut / "audit" / "rank0.jsonl"
    _wait_for(lambda: audit.exists() and max(_audit(cut), default=0) >= kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    code, _, err = _finish(uninterrupted)
    assert code == 0, err[-3000:]
    summary = _run(_args(cut, demo_shards, tiny_pipeline_dir, *common, "train.resume=latest"))
    assert summary["steps"] == 12, f"killed at {kill_at}"

    _assert_same_weights(_student(cut, 12), _student(full, 12))
    seen_full, seen_cut = _audit(full), _audit(cut)
    assert [seen_cut[s]["keys"] for s in range(1, 13)] == [seen_full[s]["keys"] for s in range(1, 13)]
    # per epoch (12 samples = 6 steps of 2) every sample exactly once: nothing repeated or lost
    for first in (1, 7):
        epoch = [k for s in range(first, first + 6) for k in seen_cut[s]["keys"]]
        assert len(epoch) == len(set(epoch)) == 12


def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, demo_shards, tiny_pipeline_dir):
    from train.checkpoint import FAULT_PAUSE_ENV, latest_checkpoint

    out = tmp_path / "run"
    args = _args(out, demo_shards, tiny_pipeline_dir, "train.max_steps=5", "train.checkpoint_every=2",
                 "train.micro_batch_size=2", "train.global_batch_size=2")
    proc = _start(args, **{FAULT_PAUSE_ENV: "3"})  # each checkpoint stays half-written for 3 s
    half = out / "checkpoints" / ".tmp-step_000000004"
    _wait_for(half.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert half.exists() and not (half / "meta.json").exists()
    assert latest_checkpoint(out).name == "step_000000002"
    summary = _run([*args, "train.resume=latest"])
    assert summary["steps"] == 5
    assert latest_checkpoint(out).name == "step_000000005" and not half.exists()


def test_sigterm_writes_a_checkpoint_and_exits_zero(tmp_path, demo_shards, tiny_pipeline_dir):
    out = tmp_path / "run"
    proc = _start(_args(out, demo_shards, tiny_pipeline_dir, "train.max_steps=1000", "train.checkpoint_every=0",
                        "train.micro_batch_size=2", "train.global_batch_size=2"))
    _wait_for(lambda: (out / "audit" / "rank0.jsonl").exists() and max(_audit(out), default=0) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    code, stdout, stderr = _finish(proc)
    assert code == 0, stderr[-2000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["preempted"] and 3 <= summary["steps"] < 1000
    from train.checkpoint import latest_checkpoint, read_meta

    assert read_meta(latest_checkpoint(out))["step"] == summary["steps"]


LAUNCHER = """
import os, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]],
                         env={**os.environ, "ACCELERATE_MIXED_PRECISION": "no"})
while not os.path.exists(sys.argv[3] + ".ready"):
    time.sleep(0.05)
os._exit(143)  # as accelerate launch does on SIGTERM: gone, without passing the signal on
"""

TRAINER = """
import signal, sys, time
sys.path.insert(0, sys.argv[1])
from train.main import follow_launcher
signal.signal(signal.SIGTERM, lambda *_: open(sys.argv[2], "w").write("SIGTERM") or sys.exit(0))
print(follow_launcher(), file=open(sys.argv[2] + ".ready", "w"))
time.sleep(60)
"""


def test_the_trainer_stops_when_its_launcher_dies(tmp_path):
    """A SIGTERM to a one-process `accelerate launch` ended the launcher and left the trainer running unseen; under
    a launcher the trainer now gets SIGTERM when the launcher dies (and so checkpoints and stops)."""
    mark = tmp_path / "trainer"
    launcher = subprocess.run([sys.executable, "-c", LAUNCHER, TRAINER, str(ROOT), str(mark)], timeout=120)
    assert launcher.returncode == 143
    deadline = time.time() + 30
    while not mark.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert (tmp_path / "trainer.ready").read_text().strip() == "True"
    assert mark.read_text() == "SIGTERM"


def test_a_two_rank_run_into_a_live_runs_folder_ends_every_rank_with_one_line(tmp_path, demo_shards,
                                                                              tiny_pipeline_dir):
    """The run lock is global rank 0's: with two ranks, rank 0 stops with the one line and exit code 2 before
    loading anything, and the launcher ends rank 1, which would otherwise wait for rank 0 in the process group."""
    from train.checkpoint import LOCK

    out = tmp_path / "run"
    holder = subprocess.Popen(  # another process holds the lock, as a live run's rank 0 does
        [sys.executable, "-c", "import sys, time; from train.checkpoint import run_lock\n"
         f"with run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(180)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = (out / LOCK).read_text().strip()
        proc = _start(_args(out, demo_shards, tiny_pipeline_dir, "train.max_steps=2", "train.global_batch_size=4",
                            "train.micro_batch_size=2"), nproc=2)
        try:
            code, _, err = _finish(proc, timeout=150)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the ranks did not end: rank 1 waits for rank 0")
    finally:
        holder.kill()
        holder.wait()
    assert code != 0 and re.search(r"Root Cause.*?rank\s*:\s*0 .*?exitcode\s*:\s*2\b", err, re.S), err[-3000:]
    errors = [ln for ln in err.splitlines() if "config error: " in ln]
    assert len(errors) == 1 and f"is in use by a live run ({who})" in errors[0], err[-3000:]
    assert not (out / "checkpoints").exists()
