"""Generate stage: the dense and the expert artifacts continue the same prompts, greedily, through
onnxruntime_genai (the runtime a device app uses), with tokens/s of each.

The prompts are a fixed list per built-in category (`data/calib/prompts.json`, written for this project)
for the expert's own language, domain and task, plus the user's own (`build --prompt`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config.corpora import calib_root
from ..errors import UserError

GENERATIONS_FILE = "generations.json"
MAX_NEW_TOKENS = 48
BUILTIN_PER_EXPERT = 4  # built-in prompts shown per build, shared round-robin among its dimensions
CHECK_NEW_TOKENS = 16  # a checked answer must appear this early
# An answer loops when at least this share of its word 4-grams repeat an earlier one (a fluent 48-token answer
# repeats none or one; the default 25% expert's looping answers measured 0.5-0.8)
LOOP_SHARE = 0.3


def prompts_file() -> Path:
    return calib_root() / "prompts.json"


def builtin_prompts() -> dict[str, list[str]]:
    """category name ("domain/medical") -> its prompts."""
    data = json.loads(prompts_file().read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def checks_file() -> Path:
    return calib_root() / "checks.json"


def repeated_share(text: str, n: int = 4) -> float:
    """Share of the word n-grams of `text` that repeat an earlier one: 0 for fluent text, near 1 for a loop.
    Words, not tokens, so artifacts with different vocabularies are judged alike."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def loops(text: str) -> bool:
    return repeated_share(text) >= LOOP_SHARE


def checked_prompts() -> list[dict]:
    """[{category, prompt, answer}]: prompts whose continuation can be checked (answer: a regular expression)."""
    return json.loads(checks_file().read_text(encoding="utf-8"))["checks"]


def answer_is_right(check: dict, text: str) -> bool:
    import re

    return re.search(check["answer"], text, re.IGNORECASE) is not None


def prompts_for(expert: str, extra=()) -> list[dict]:
    """[{prompt, source}] for an expert spec: built-in prompts of its categories taken in turn (so every
    dimension is heard), then the user's own. A dimension given as a path has no built-in prompts."""
    from ..config.corpora import ExpertSpec

    table = builtin_prompts()
    lists = [[(p, f"{dim}/{cat}") for p in table.get(f"{dim}/{cat}", [])]
             for dim, cat in ExpertSpec.parse(expert).dims.items()]
    chosen: list[dict] = []
    for i in range(max((len(x) for x in lists), default=0)):
        for lst in lists:
            if i < len(lst) and len(chosen) < BUILTIN_PER_EXPERT:
                chosen.append({"prompt": lst[i][0], "source": lst[i][1]})
    for p in extra:
        if not p.strip():
            raise UserError("--prompt is empty")
        chosen.append({"prompt": p, "source": "user"})
    return chosen


def generate_texts(artifact, prompts: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS,
                   threads: int | None = None, on_prompt=None) -> list[dict]:
    """Greedy continuations of `prompts` by one exported artifact through onnxruntime_genai:
    [{text, tokens, seconds, tok_s}], tok_s over the decode steps after the first token."""
    from .runtime import GenaiCausalLM

    runner = GenaiCausalLM(artifact, "CPUExecutionProvider", threads=threads)
    tokenizer = runner.og.Tokenizer(runner.model)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt)
        length = min(len(ids) + max_new_tokens, runner.context_length)

        def run(ids=ids, length=length):
            generator = runner.generator(length, stop_at_end=True)
            t0 = time.perf_counter()
            generator.append_tokens(ids)
            first = None
            for _ in range(length - len(ids)):
                if generator.is_done():  # end of sequence
                    break
                generator.generate_next_token()
                if first is None:
                    first = time.perf_counter()
            return t0, first, time.perf_counter(), [int(t) for t in generator.get_sequence(0)[len(ids):]]

        t0, first, end, new = runner.retry_with_window(run)
        decode_s = end - first if first is not None else 0.0
        out.append({"text": tokenizer.decode(new), "tokens": len(new), "seconds": round(end - t0, 4),
                    "tok_s": (len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else None})
        if on_prompt:
            on_prompt()
    return out


def generate(artifacts: dict[str, Path], prompts: list[dict], *, max_new_tokens: int = MAX_NEW_TOKENS,
             threads: int | None = None, out=None, on_prompt=None) -> dict:
    """Every artifact (label -> export directory) answers every prompt; writes `out` (JSON) when given."""
    from ..fsutil import write_json
    from .runtime import genai_support

    reasons = {label: r for label, path in artifacts.items() if (r := genai_support(path))}
    record = {"engine": "onnxruntime-genai", "provider": "CPUExecutionProvider", "decoding": "greedy",
              "max_new_tokens": max_new_tokens, "threads": threads, "prompts": [dict(p) for p in prompts]}
    if reasons:
        record["skipped"] = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    else:
        for label, path in artifacts.items():
            for entry, result in zip(record["prompts"], generate_texts(
                    path, [p["prompt"] for p in prompts], max_new_tokens=max_new_tokens, threads=threads,
                    on_prompt=on_prompt)):
                entry[label] = result
        for label in artifacts:
            rates = [p[label]["tok_s"] for p in record["prompts"] if p[label].get("tok_s")]
            record.setdefault("tok_s", {})[label] = sum(rates) / len(rates) if rates else None
            for entry in record["prompts"]:
                entry[label]["repeated_4grams"] = round(repeated_share(entry[label]["text"]), 3)
                entry[label]["loops"] = loops(entry[label]["text"])
            record.setdefault("looping", {})[label] = sum(p[label]["loops"] for p in record["prompts"])
        record["checks"] = run_checks(artifacts, threads=threads, on_prompt=on_prompt)
    if out is not None:
        write_json(out, record)
    return record


def run_checks(artifacts: dict[str, Path], *, threads: int | None = None, on_prompt=None) -> dict:
    """Every artifact completes the checked prompts (data/calib/checks.json): {items: [...], right: {label: n}, of: n}."""
    checks = checked_prompts()
    items = [dict(c) for c in checks]
    for label, path in artifacts.items():
        answers = generate_texts(path, [c["prompt"] for c in checks], max_new_tokens=CHECK_NEW_TOKENS,
                                 threads=threads, on_prompt=on_prompt)
        for item, answer in zip(items, answers):
            item[label] = {"text": answer["text"], "right": answer_is_right(item, answer["text"])}
    return {"items": items, "of": len(items), "new_tokens": CHECK_NEW_TOKENS,
            "right": {label: sum(i[label]["right"] for i in items) for label in artifacts}}


