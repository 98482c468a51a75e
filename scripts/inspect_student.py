"""Print a student's per-stage structure beside its teacher's, from configs alone (meta device, no weights).

    python scripts/inspect_student.py student=koala_700m teacher=sdxl_base

Ends with one JSON line: {"teacher", "student", "teacher_params", "student_params", "ratio"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import ConfigError, check_choices, config_help, load_config  # noqa: E402


def inspect(overrides: list[str]) -> dict:
    """Build teacher and student on the meta device, print the stage table and the init map; return the figures."""
    from distill.students import (
        StudentSpecError,
        build_unet,
        count_params,
        derive_student_config,
        format_stage_tables,
        init_student_from_teacher,
        resolve_spec,
        summarize_mapping,
    )
    from distill.teachers import TeacherError, teacher_unet_config

    cfg = load_config(overrides)
    check_choices(cfg)
    s = cfg.student
    try:
        spec = resolve_spec(s.name, s.layers_per_block, s.transformer_layers_per_block, s.mid_block)
        t_cfg = teacher_unet_config(cfg.teacher)
        teacher = build_unet(t_cfg, "meta")
        student = build_unet(derive_student_config(t_cfg, spec), "meta")
        mapping = init_student_from_teacher(student, teacher, copy_values=False)
    except StudentSpecError as exc:
        raise ConfigError(f"student: {exc}") from exc
    except TeacherError as exc:
        raise ConfigError(str(exc)) from exc
    print(format_stage_tables(teacher, student))
    print("initialisation map (every student tensor has a same-shaped teacher source):")
    print("  " + "\n  ".join(summarize_mapping(mapping)))
    tp, sp = count_params(teacher), count_params(student)
    return {"teacher": cfg.teacher.name, "student": spec.name, "teacher_params": tp, "student_params": sp,
            "ratio": round(sp / tp, 4)}


def main() -> int:
    if "-h" in sys.argv[1:] or "--help" in sys.argv[1:]:
        print(config_help(__doc__ or ""))
        return 0
    try:
        result = inspect(sys.argv[1:])
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
