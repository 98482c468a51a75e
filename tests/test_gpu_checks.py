"""scripts/gpu_checks.sh, the one device call that measures issues 5 and 6: every benchmark command in it parses,
and every training configuration it would measure composes and validates (real shapes, on the CPU, no model
built), so a typo cannot waste the GPU session's minutes."""

from __future__ import annotations

import io
import json
import re
import shlex
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from scripts import bench_infer, bench_train
from train.config import load_config

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_checks.sh"


def _script() -> tuple[str, str]:
    """gpu_checks.sh with its continuation lines joined, and its default micro-batch (MICRO)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    return text, re.search(r"MICRO=\$\{MICRO:-(\d+)\}", text).group(1)


def _commands(script: str, tmp: Path) -> list[str]:
    """The argument strings after `scripts/<script>` in gpu_checks.sh, with its shell variables filled in."""
    text, micro = _script()
    found = []
    for line in text.splitlines():
        if line.lstrip().startswith("#") or f"scripts/{script}" not in line:
            continue
        args = line.split(f"scripts/{script}", 1)[1]
        for var, value in (('"$MICRO"', micro), ("$TMP_OUT", str(tmp)), ("$OUT", str(tmp))):
            args = args.replace(var, value)
        found.append(args)
    return found


def test_every_training_benchmark_in_the_gpu_script_composes_at_real_shapes(tmp_path):
    commands = [shlex.split(args) for args in _commands("bench_train.py", tmp_path / "out")]
    assert len(commands) == 2  # KOALA-1B plain vs fast; KOALA-700M low-memory
    results = []
    for argv in commands:
        buffer = io.StringIO()
        with redirect_stdout(buffer):
            bench_train.main([*argv, "--dry-run", "--data", str(tmp_path / "lat" / argv[argv.index("--student") + 1])])
        results.append(json.loads(buffer.getvalue().strip().splitlines()[-1]))
    one_b, low = (r["configs"] for r in results)
    assert set(one_b) == {"plain", "fast"} and set(low) == {"lowmem"}
    plain, fast = one_b["plain"], one_b["fast"]
    # the anchor's batch-32 setting against the fast step at the same global batch
    assert plain["student"] == fast["student"] == "koala_1b" and plain["teacher"] == "sdxl_base"
    assert (plain["batch"], plain["micro_batch"], plain["options"]["gradient_checkpointing"]) == (32, 32, True)
    assert (fast["batch"], fast["micro_batch"], fast["accum"]) == (32, 8, 4)
    assert fast["options"]["compile"] and fast["options"]["fused_adam"] and fast["options"]["sdpa_backend"] == "flash"
    assert not plain["options"]["compile"] and not plain["options"]["fused_adam"]
    lowmem = low["lowmem"]
    assert lowmem["student"] == "koala_700m" and lowmem["teacher_dtype"] == "bf16"
    assert lowmem["options"]["optimizer"] == "adamw8bit" and lowmem["batch"] == 32
    assert not any((tmp_path / "out").glob("*")), "a dry run writes no results"


def test_every_inference_benchmark_in_the_gpu_script_parses(tmp_path):
    commands = [shlex.split(args) for args in _commands("bench_infer.py", tmp_path)]
    assert len(commands) == 3
    for argv in commands:
        bench_infer.parse(argv)  # argparse exits 2 on an unknown or malformed option


def test_the_gpu_scripts_memory_estimates_compose(tmp_path):
    text, micro = _script()
    loop = text[text.index("for args in"):text.index("; do", text.index("for args in"))]
    loop_args = [re.sub(r"\$\{MICRO:-\d+\}", micro, a) for a in re.findall(r'"([^"]+)"', loop)]
    assert len(loop_args) == 2
    composed = []
    for args in _commands("estimate_memory.py", tmp_path):
        for filled in ([args.replace("$args", a) for a in loop_args] if "$args" in args else [args]):
            composed.append(load_config(shlex.split(filled)))
    assert len(composed) == 3
    assert [c.student.name for c in composed] == ["koala_1b", "koala_1b", "koala_700m"]
    assert all(c.train.global_batch_size == 32 for c in composed) and composed[2].train.optimizer == "adamw8bit"


@pytest.mark.parametrize("bad, named", [
    (["--set", "train.compile_mod=max-autotune"], "compile_mod"),
    (["--student", "koala_700m", "--profile", "lowmem", "--set", "train.micro_batch_size=0"], "micro_batch_size=0"),
    (["--student", "koala_1b", "--profile", "lowmem"], "lowmem profile is KOALA-700M's"),
])
def test_a_bad_benchmark_override_is_one_line_and_exit_2(tmp_path, capsys, bad, named):
    with pytest.raises(SystemExit) as exc:
        bench_train.main(["--dry-run", "--data", str(tmp_path / "lat"), *bad])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("config error:") and named in err, err
