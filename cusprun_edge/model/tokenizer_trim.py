"""A trimmed tokenizer: the same Hugging Face fast tokenizer (tokenizer.json) over a subset of its
vocabulary, with new contiguous ids, that still encodes any text the original could.

BPE only (SmolLM2's byte-level BPE, Gemma's byte-fallback BPE). A token is dropped together with every
merge that produces it or uses it, so encoding stops at the kept pieces that merge would have joined.
Every string stays representable because the base alphabet is always kept:
  - byte-level BPE: the 256 byte symbols (every text is a sequence of them);
  - byte-fallback BPE: the 256 <0xNN> pieces (a character with no kept token falls back to its bytes);
  - other BPE: every single-character token (what the original had, no more).
Special tokens (the tokenizer's named ones, added special tokens except Gemma's <unusedN> placeholders,
those a chat template names) and the unknown token are kept too. The kept set is closed under each kept
token's BPE derivation (`bpe_pieces`: its characters and the pieces BPE joins on its own string), so every
kept token still forms, and text whose dense tokens are all kept tokenizes exactly as before.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Iterable

from ..errors import UserError

TOKENIZER_FILE = "tokenizer.json"
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
UNUSED = re.compile(r"<unused\d+>")


def byte_level_alphabet() -> list[str]:
    """The 256 characters byte-level BPE (GPT-2 style) writes for bytes 0..255: printable Latin-1 bytes
    stand for themselves, the others are shifted past 255 so none is whitespace or a control character."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, shifted = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + shifted))
            shifted += 1
    return out


def _components(node) -> list[dict]:
    if not isinstance(node, dict):
        return []
    inner = node.get("pretokenizers") or node.get("decoders") or node.get("processors") or []
    return [node, *[c for n in inner for c in _components(n)]]


def tokenizer_kind(tj: dict) -> str:
    """'byte-level', 'byte-fallback' or 'chars' for a BPE tokenizer.json; UserError for other models."""
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"vocabulary trimming supports BPE tokenizers only; this one is {model.get('type')!r} "
                        "(drop --prune-vocab)")
    if any(c.get("type") == "ByteLevel" for c in _components(tj.get("pre_tokenizer"))):
        return "byte-level"
    if model.get("byte_fallback"):
        return "byte-fallback"
    return "chars"


def _merge_pair(merge) -> tuple[str, str]:
    if isinstance(merge, str):
        a, _, b = merge.partition(" ")
        return a, b
    return merge[0], merge[1]


def required_ids(tj: dict, chat_template: str | None = None) -> set[int]:
    """Ids a trimmed vocabulary always keeps: the base alphabet, the unknown token and the special tokens."""
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    kind = tokenizer_kind(tj)
    if kind == "byte-level":
        # every byte symbol the original has (SmolLM2 lacks a few control bytes and bytes UTF-8 never uses:
        # it could not encode those either)
        keep = {vocab[c] for c in byte_level_alphabet() if c in vocab}
    elif kind == "byte-fallback":
        keep = {i for t, i in vocab.items() if BYTE_PIECE.fullmatch(t)}
        if len(keep) < 256:
            raise UserError(f"this byte-fallback tokenizer has {len(keep)} of the 256 <0xNN> byte pieces; "
                            "it cannot be trimmed safely (drop --prune-vocab)")
    else:
        prefix = model.get("continuing_subword_prefix") or ""
        keep = {i for t, i in vocab.items() if len(t) == 1 or (prefix and t.startswith(prefix)
                                                                and len(t) == len(prefix) + 1)}
    if model.get("unk_token") in vocab:
        keep.add(vocab[model["unk_token"]])
    for added in tj.get("added_tokens") or ():
        if (added.get("special") and not UNUSED.fullmatch(added["content"])) or (
                chat_template and added["content"] in chat_template):
            keep.add(added["id"])
    return keep


def close_under_merges(pieces: dict[int, tuple[int, ...]], keep: set[int]) -> set[int]:
    """`keep` plus every token its BPE derivation passes through (`pieces`: `bpe_pieces` of the tokenizer),
    and theirs: without them the token could never be formed by the merges a trimmed tokenizer keeps."""
    out, todo = set(keep), list(keep)
    while todo:
        for p in pieces.get(todo.pop(), ()):
            if p not in out:
                out.add(p)
                todo.append(p)
    return out


def bpe_pieces(tj: dict) -> dict[int, tuple[int, ...]]:
    """Token id -> ids of the characters and intermediate tokens BPE passes through when it encodes the
    token's string.

    A token has many merges that spell it (Gemma-3's 262,144 tokens have 514,906 merges), and BPE reaches
    it through the lowest-ranked ones its characters allow, not through the first merge listed for it.
    Inside running text the merges within a final token's span fire in the same order as on its string
    alone (each one is the lowest-ranked pair available at its step in both), so keeping these pieces keeps
    every kept token reachable and leaves the dense tokenization of kept words unchanged."""
    vocab: dict[str, int] = tj["model"]["vocab"]
    ranks: dict[tuple[str, str], int] = {}
    for rank, merge in enumerate(tj["model"]["merges"]):
        ranks.setdefault(_merge_pair(merge), rank)
    out: dict[int, tuple[int, ...]] = {}
    for token, i in vocab.items():
        symbols, made = list(token), []
        while len(symbols) > 1:
            best, at = None, 0
            for k in range(len(symbols) - 1):
                rank = ranks.get((symbols[k], symbols[k + 1]))
                if rank is not None and (best is None or rank < best):
                    best, at = rank, k
            if best is None:
                break
            symbols[at:at + 2] = [symbols[at] + symbols[at + 1]]
            made.append(symbols[at])
        if len(symbols) == 1 and made:  # its characters, then what they were joined into
            out[i] = tuple(vocab[t] for t in dict.fromkeys([*token, *made[:-1]]) if t in vocab)
    return out


def _remap_post_processor(node, old_to_new: dict[int, int]):
    if isinstance(node, dict):
        kind = node.get("type")
        if kind == "TemplateProcessing":
            for name, special in (node.get("special_tokens") or {}).items():
                try:
                    special["ids"] = [old_to_new[i] for i in special["ids"]]
                except KeyError:
                    raise UserError(f"the tokenizer's template uses {name!r}, which the trimmed vocabulary "
                                    "does not keep") from None
        elif kind in ("RobertaProcessing", "BertProcessing"):
            for key in ("sep", "cls"):
                if key in node:
                    node[key] = [node[key][0], old_to_new[node[key][1]]]
        for child in node.get("processors") or ():
            _remap_post_processor(child, old_to_new)
    return node


def trim_tokenizer_json(tj: dict, keep: Iterable[int], chat_template: str | None = None,
                        pieces: dict[int, tuple[int, ...]] | None = None) -> tuple[dict, list[int]]:
    """A copy of tokenizer.json `tj` over the kept ids (plus the required ones and their BPE pieces), with
    new contiguous ids in the original order. Returns (new tokenizer.json, original id of each new id).
    `pieces`: `bpe_pieces(tj)` when the caller has it (seconds on a 262k vocabulary)."""
    # the caller's dict stays as it was: the parts rewritten below are copied (a deep copy of 500k merges is slow)
    tj = {**tj, "model": dict(tj["model"]), "post_processor": json.loads(json.dumps(tj.get("post_processor")))}
    model = tj["model"]
    vocab: dict[str, int] = model["vocab"]
    size = max([*vocab.values(), *(a["id"] for a in tj.get("added_tokens") or ())]) + 1
    kept = {int(i) for i in keep if 0 <= int(i) < size}
    kept = close_under_merges(bpe_pieces(tj) if pieces is None else pieces, kept | required_ids(tj, chat_template))
    new_to_old = sorted(kept)
    old_to_new = {old: new for new, old in enumerate(new_to_old)}
    model["vocab"] = {t: old_to_new[i] for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i in old_to_new}
    kept_tokens = model["vocab"]
    merges = []
    for merge in model["merges"]:
        a, b = _merge_pair(merge)
        if a in kept_tokens and b in kept_tokens and a + b in kept_tokens:
            merges.append(merge)
    model["merges"] = merges
    tj["added_tokens"] = [{**a, "id": old_to_new[a["id"]]} for a in tj.get("added_tokens") or ()
                          if a["id"] in old_to_new]
    tj["post_processor"] = _remap_post_processor(tj.get("post_processor"), old_to_new)
    return tj, new_to_old


def trim_tokenizer(tokenizer, keep: Iterable[int], pieces: dict[int, tuple[int, ...]] | None = None):
    """(trimmed transformers tokenizer, original id of each new id) for a fast `tokenizer`; `pieces` as for
    trim_tokenizer_json."""
    from transformers import AutoTokenizer

    if not getattr(tokenizer, "is_fast", False):
        raise UserError("vocabulary trimming needs a fast tokenizer (tokenizer.json); drop --prune-vocab")
    keep = set(int(i) for i in keep) | {i for i in tokenizer.all_special_ids if i is not None}
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        path = Path(scratch) / TOKENIZER_FILE
        original = json.loads(path.read_text(encoding="utf-8"))
        chat = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
        trimmed, new_to_old = trim_tokenizer_json(original, keep, chat, pieces)
        path.write_text(json.dumps(trimmed, ensure_ascii=False), encoding="utf-8")
        _remap_tokenizer_config(Path(scratch) / "tokenizer_config.json", {o: n for n, o in enumerate(new_to_old)})
        new = AutoTokenizer.from_pretrained(scratch)
    if len(new) != len(new_to_old):
        raise UserError(f"the trimmed tokenizer has {len(new)} tokens where {len(new_to_old)} were written; "
                        "this tokenizer's class rebuilds its vocabulary (drop --prune-vocab)")
    if new.pad_token_id is None and new.eos_token is not None:
        new.pad_token = new.eos_token
    return new, new_to_old


def _remap_tokenizer_config(path: Path, old_to_new: dict[int, int]) -> None:
    """transformers 4 lists added tokens by id in tokenizer_config.json; keep those ids consistent."""
    if not path.exists():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        config["added_tokens_decoder"] = {str(old_to_new[int(k)]): v for k, v in decoder.items()
                                          if int(k) in old_to_new}
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def round_trip_failures(original, trimmed, texts: Iterable[str]) -> list[str]:
    """Texts the trimmed tokenizer does not reproduce as the original does (decode of encode), or encodes
    with an unknown token; empty when it reads all of them."""
    unk = trimmed.unk_token_id
    bad = []
    for text in texts:
        ids = trimmed(text, add_special_tokens=False)["input_ids"]
        want = original.decode(original(text, add_special_tokens=False)["input_ids"])
        if trimmed.decode(ids) != want or (unk is not None and unk in ids and unk not in
                                            original(text, add_special_tokens=False)["input_ids"]):
            bad.append(text)
    return bad
