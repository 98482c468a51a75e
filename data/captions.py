"""Caption choice (a preference order of fields, or KOALA's synCap) and metadata score filters.

Samples are LAION-POP-shaped: a json dict with caption fields (`cogvlm_caption`, `llava_caption`, the alt text
as `alt_txt` or img2dataset's `caption`) and metadata, plus an optional .txt file. "txt" in a field list names
that file.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

TXT_FIELD = "txt"


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is the counter name it is logged under."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_text(data: bytes | None) -> str | None:
    """UTF-8 bytes to str (None stays None), without a leading byte-order mark (Windows editors write one; it
    reached the tokenizer as junk, and json.loads refuses it); invalid UTF-8 raises SkipSample('bad_text')."""
    if data is None:
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SkipSample("bad_text", str(exc)) from exc


def decode_json(data: bytes | None) -> dict[str, Any] | None:
    """The sample's json metadata as a dict (None when absent); bad bytes raise SkipSample."""
    text = decode_text(data)
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise SkipSample("bad_json", str(exc)) from exc
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"top level is {type(meta).__name__}, not an object")
    if _SURROGATE_ESCAPE.search(text):  # JSON admits "\ud83d" alone, which no UTF-8 text (nor CLIP's tokenizer) can
        try:
            json.dumps(meta, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SkipSample("bad_text", f"json holds a lone surrogate: {exc}") from exc
    return meta


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _field(meta: dict[str, Any] | None, txt: str | None, name: str) -> str | None:
    """The stripped, non-empty string in `name` (json field or the txt file), else None."""
    value = txt if name == TXT_FIELD else (meta or {}).get(name)
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def first_field(meta: dict[str, Any] | None, txt: str | None, names: list[str]) -> str | None:
    """The first non-empty caption among `names`, in order."""
    for name in names:
        value = _field(meta, txt, name)
        if value is not None:
            return value
    return None


def choose_caption(
    meta: dict[str, Any] | None,
    txt: str | None,
    caption_fields: list[str],
    *,
    syncap: bool = False,
    alt_text_fields: list[str] | None = None,
) -> str:
    """The training caption of one sample; raises SkipSample('no_caption') when there is none.

    Without synCap: the first non-empty field of `caption_fields`. With synCap (KOALA): the alt text (first of
    `alt_text_fields`) followed by the generated caption (first of `caption_fields` that is not an alt-text
    field), joined by one space; either alone when the other is missing or when both hold the same text.
    """
    if not syncap:
        caption = first_field(meta, txt, caption_fields)
    else:
        alt_fields = list(alt_text_fields or [])
        alt = first_field(meta, txt, alt_fields)
        generated = first_field(meta, txt, [f for f in caption_fields if f not in alt_fields])
        if alt and generated and alt.strip() == generated.strip():  # img2dataset writes one caption to both
            generated = None  # the json "caption" and the .txt file: not a generated caption to append
        caption = " ".join(part for part in (alt, generated) if part) or None
    if caption is None:
        raise SkipSample("no_caption", f"none of {caption_fields} is a non-empty string")
    return caption


_OPS = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    "<": lambda a, b: a < b,
}


def check_scores(meta: dict[str, Any] | None, filters: list[tuple[str, str, float]]) -> None:
    """Raise SkipSample('missing_score' | 'low_score') unless every (field, op, value) filter passes."""
    for name, op, threshold in filters:
        value = (meta or {}).get(name)
        if isinstance(value, str):  # some manifests store numbers as strings
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            raise SkipSample("missing_score", f"{name} is {value!r}")
        if not _OPS[op](value, threshold):
            raise SkipSample("low_score", f"{name}={value} fails {op}{threshold}")
