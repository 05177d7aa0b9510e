"""Vocabulary trimming: the expert keeps only the tokens its languages use, with its own tokenizer.

Embeddings are 21% of SmolLM2-135M and 63% of Gemma-3-270M, and every generated token reads the whole
lm_head. `--prune-vocab` removes rows for real: the expert's embedding and lm_head hold only the kept
tokens (tied stays tied), its config's vocab_size and special ids are the new ones, and it ships a
trimmed tokenizer.json with new contiguous ids (tokenizer_trim.py) that still encodes any text, so ONNX
Runtime GenAI runs the export unchanged with logits as wide as the kept vocabulary. config.json's
`cusprun_trimmed_vocab.original_ids` maps each new id to the original one.

Which tokens (`KeepRule`): every special and byte token, every token without letters (digits,
punctuation, whitespace runs, emoji), every token of the calibration corpora, then the most frequent
tokens of the expert's languages up to a size. Frequencies are real: the word-frequency lists of the
`wordfreq` package, each word tokenized as running text; tokens no listed word uses follow in id order
(merge order for SmolLM2's BPE; no prior on Gemma's). The size is chosen on the corpora's held-apart
`tune` documents (`choose_size`): the smallest whose perplexity per dense token stays within `floor`
times the untrimmed expert's. A trimmed tokenizer splits dropped words into kept pieces, so quality is
always judged per dense token (evaluate.per_dense_token), never per own token.

Experts saved by the previous rule (ids kept, dropped rows mapped to the unknown row,
`RemappedEmbedding` / `ScatteredLMHead`) still load.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata

import torch
import torch.nn as nn

from ..errors import UserError
from ..model import arch
from ..model.vocab_layers import kept_head, replace_module

# --------------------------------------------------------------------------- the previous rule, for loading
# experts it saved: ids kept, dropped rows mapped to the unknown row, logits scattered to full width



def _script(ch: str) -> str | None:
    """The Unicode script of a letter (first word of its name: LATIN, CYRILLIC, CJK, ...); None otherwise."""
    if not ch.isalpha():
        return None
    try:
        return unicodedata.name(ch).split()[0]
    except ValueError:
        return "UNNAMED"


def text_scripts(texts: list[str]) -> set[str]:
    return {s for t in texts for s in map(_script, set(t)) if s}



# --------------------------------------------------------------------------- trimming: rows removed for real

DEFAULT_FLOOR = 1.02  # the chosen size keeps tune perplexity per dense token within 2% of the untrimmed expert
WORDFREQ_WORDS = 100_000  # most frequent words per language whose tokens are ranked
DEFAULT_LANGUAGE = "en"  # built-in domain and task corpora are English
SIZE_GRID = (4096, 6144, 8192, 12288, 16384, 24576, 32768, 49152, 65536, 98304, 131072, 196608)
POOR_SHARE = 0.25  # more of a corpus's tokens than this are byte pieces: the tokenizer does not know its script
# how a listed word appears in running text: after a space mostly, sometimes capitalized or at a line start
WORD_FORMS = ((" {}", 0.75), (" {}", 0.15, "title"), ("{}", 0.05), ("{}", 0.05, "title"))
TRIMMED_KEY = "cusprun_trimmed_vocab"


def expert_languages(corpus_names) -> list[str]:
    """wordfreq languages of the expert's `language/xx` corpora (English when it names none)."""
    import wordfreq

    known = set(wordfreq.available_languages())
    langs = [n.split("/", 1)[1] for n in corpus_names if n.startswith("language/")]
    return [lang for lang in langs if lang in known] or [DEFAULT_LANGUAGE]


def token_strings(tokenizer) -> list[str]:
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def word_token_frequencies(tokenizer, languages: list[str], words: int = WORDFREQ_WORDS) -> dict[int, float]:
    """Estimated frequency of each token in the languages' running text: each of the `words` most frequent
    words (wordfreq) tokenized in its usual forms, its frequency added to every token it uses."""
    import heapq

    import wordfreq

    freq: dict[int, float] = {}
    for lang in languages:
        table = wordfreq.get_frequency_dict(lang)
        top = heapq.nlargest(words, table.items(), key=lambda kv: kv[1])
        for pattern, weight, *case in WORD_FORMS:
            forms = [pattern.format(w.title() if case else w) for w, _ in top]
            encoded = tokenizer.backend_tokenizer.encode_batch(forms, add_special_tokens=False)
            for (_, f), enc in zip(top, encoded):
                for i in enc.ids:
                    freq[i] = freq.get(i, 0.0) + f * weight
    return freq


def byte_piece_share(strings: list[str], tokenizer, texts: list[str]) -> float:
    """Share of the tokens of `texts` that are a partial character (byte pieces, which decode to U+FFFD)."""
    ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    return sum("\ufffd" in strings[i] for i in ids) / max(1, len(ids))


class KeepRule:
    """The tokens a trimmed vocabulary keeps for a size (see the module docstring); `keep(size)`."""

    def __init__(self, tokenizer, calib_texts: list[str], languages: list[str], words: int = WORDFREQ_WORDS):
        from ..model.tokenizer_trim import bpe_pieces, close_under_merges, required_ids

        tj = json.loads(tokenizer.backend_tokenizer.to_str())
        chat = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
        self.vocab_size = len(tokenizer)
        self.languages = languages
        strings = token_strings(tokenizer)
        share = byte_piece_share(strings, tokenizer, calib_texts)
        if share > POOR_SHARE:
            scripts = ", ".join(sorted(text_scripts(calib_texts))) or "unknown"
            raise UserError(f"the tokenizer represents the calibration text poorly ({share:.0%} of its tokens are "
                            f"byte pieces; scripts: {scripts}): trimming its vocabulary cannot keep that text "
                            "readable; drop --prune-vocab")
        self.required = required_ids(tj, chat) | {i for i in tokenizer.all_special_ids if i is not None}
        self.pieces = bpe_pieces(tj)
        letter_free = {i for i, s in enumerate(strings) if not any(c.isalpha() for c in s)}
        calib = {i for t in calib_texts for i in tokenizer(t)["input_ids"]}
        self.base = close_under_merges(self.pieces, self.required | letter_free | calib)
        freq = word_token_frequencies(tokenizer, languages, words)
        ranked = sorted((i for i in range(self.vocab_size) if i not in self.base), key=lambda i: (-freq.get(i, 0.0), i))
        # each candidate after the pieces its BPE derivation needs, so any prefix of the order is a closed set
        self.order: list[int] = []
        seen = set(self.base)
        for i in ranked:
            self._add_with_ancestors(i, seen)

    def _add_with_ancestors(self, i: int, seen: set[int]) -> None:
        stack = [(i, False)]  # post-order: pieces first
        while stack:
            j, expanded = stack.pop()
            if j in seen:
                continue
            if expanded:
                seen.add(j)
                self.order.append(j)
                continue
            stack.append((j, True))
            stack += [(p, False) for p in self.pieces.get(j, ()) if p not in seen]

    def check_size(self, size: int) -> None:
        if size < len(self.required):
            raise UserError(f"--vocab-size {size} is below the {len(self.required)} special and byte tokens every "
                            "trimmed vocabulary keeps; pass a larger size")
        if size < len(self.base):
            raise UserError(f"--vocab-size {size} is below the {len(self.base)} tokens this expert always keeps "
                            "(special, byte, letter-free and calibration tokens); pass at least that")
        if size >= self.vocab_size:
            raise UserError(f"--vocab-size {size} does not trim the model's {self.vocab_size} tokens; "
                            "pass a smaller size or drop --prune-vocab")

    def keep(self, size: int) -> list[int]:
        return sorted(self.base | set(self.order[:max(0, size - len(self.base))]))


def trimmed_logits_fn(model, new_to_old):
    """Logits of `model` as if trimmed to `new_to_old` (new ids in, kept rows of the lm_head out): what the
    physically trimmed model computes, without copying it (and without the dropped rows' matmul)."""
    import torch.nn.functional as F

    index = torch.as_tensor(new_to_old, dtype=torch.long)
    head = arch.get(model, arch.spec_for(model).lm_head)
    weight = head.weight.detach()[index]
    bias = head.bias.detach()[index] if head.bias is not None else None
    cap = getattr(model.config, "final_logit_softcapping", None)

    @torch.no_grad()
    def fn(ids, mask):
        hidden = model.base_model(input_ids=index[ids], attention_mask=mask, use_cache=False).last_hidden_state
        logits = F.linear(hidden, weight, bias)
        return (torch.tanh(logits / cap) * cap if cap else logits).float()

    return fn


def logits_batch(vocab: int) -> int:
    """Documents per batch when scoring a model with `vocab` output columns: [batch, tokens, vocab] fp32 logits
    about as large as 4 documents over SmolLM2's 49,152 columns."""
    return max(1, int(4 * 49152 / vocab))


def untrimmed_quality(model, tokenizer, texts: list[str]) -> dict:
    """`texts`' perplexity per dense token and bits per byte with the model's own full vocabulary."""
    from ..measure.evaluate import text_quality, torch_logits_fn

    return text_quality(torch_logits_fn(model), tokenizer, texts, tokenizer, batch_size=logits_batch(len(tokenizer)))


def trimmed_quality(model, tokenizer, rule: KeepRule, texts: list[str], size: int, max_tokens: int = 512) -> dict:
    """What the size search measures at one size: `texts` (clipped to `max_tokens` dense tokens) scored with the
    vocabulary trimmed to `rule.keep(size)`, per dense token; the model is not copied."""
    from ..measure.evaluate import text_quality
    from ..model.tokenizer_trim import trim_tokenizer

    new_tok, new_to_old = trim_tokenizer(tokenizer, rule.keep(size), rule.pieces)
    q = text_quality(trimmed_logits_fn(model, new_to_old), new_tok, texts, tokenizer,
                     batch_size=logits_batch(len(new_to_old)), max_length=4 * max_tokens)
    return {"size": len(new_to_old), "ppl_per_dense_token": q["ppl_per_dense_token"], "bits_per_byte": q["bits_per_byte"]}


def choose_size(model, tokenizer, rule: KeepRule, tune: list[str], floor: float = DEFAULT_FLOOR,
                max_tokens: int = 512, on_point=None) -> dict:
    """The smallest grid size whose tune perplexity per dense token stays within `floor` x the untrimmed
    model's (bisection; perplexity falls as the vocabulary grows). Returns the search record; its `size` is
    None when no grid size below the full vocabulary passes."""
    from ..measure.evaluate import clip_to_tokens
    from .registry import check_vocab_options

    check_vocab_options(True, None, floor)
    texts = clip_to_tokens(tokenizer, tune, max_tokens)
    dense = untrimmed_quality(model, tokenizer, texts)
    limit = floor * dense["ppl_per_dense_token"]
    grid = [s for s in SIZE_GRID if len(rule.base) <= s < rule.vocab_size]
    points = []

    def passes(size: int) -> bool:
        q = trimmed_quality(model, tokenizer, rule, texts, size, max_tokens)
        point = {"size": q["size"], "ppl_per_dense_token": q["ppl_per_dense_token"],
                 "ratio": q["ppl_per_dense_token"] / dense["ppl_per_dense_token"], "bits_per_byte": q["bits_per_byte"],
                 "passed": q["ppl_per_dense_token"] <= limit}
        points.append(point)
        if on_point:
            on_point(point)
        return point["passed"]

    lo, hi = -1, len(grid)  # grid[lo] fails (or none), grid[hi] passes (or the full vocabulary)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if passes(grid[mid]):
            hi = mid
        else:
            lo = mid
    return {"size": grid[hi] if hi < len(grid) else None, "floor": floor, "split": "tune", "documents": len(texts),
            "untrimmed": {"ppl_per_dense_token": dense["ppl_per_dense_token"], "bits_per_byte": dense["bits_per_byte"]},
            "points": sorted(points, key=lambda p: p["size"])}


@torch.no_grad()
def trim_model_vocab(model, new_to_old: list[int]) -> None:
    """Keep only the rows `new_to_old` (new id -> original id) of the embedding and the lm_head, in place;
    vocab_size and the special ids of the config and generation config become the new ones."""
    spec = arch.spec_for(model)
    embed = arch.get(model, spec.embed)
    head = arch.get(model, spec.lm_head)
    vocab = embed.weight.shape[0]
    index = torch.as_tensor(new_to_old, dtype=torch.long)
    old_to_new = {int(o): n for n, o in enumerate(new_to_old)}
    tied = head.weight is embed.weight or bool(getattr(model.config, "tie_word_embeddings", False))
    embed.weight = nn.Parameter(embed.weight.data[index].clone())
    embed.num_embeddings = len(new_to_old)
    if getattr(embed, "padding_idx", None) is not None:
        embed.padding_idx = old_to_new.get(int(embed.padding_idx))
    replace_module(model, spec.lm_head, kept_head(head, index, embed.weight if tied else None))
    for module in model.modules():  # transformers keeps a copy of vocab_size on some modules
        if getattr(module, "vocab_size", None) == vocab:
            module.vocab_size = len(new_to_old)
    model.config.vocab_size = len(new_to_old)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None:
            _remap_ids(cfg, old_to_new)
    original = getattr(model.config, TRIMMED_KEY, None)  # trimming a trimmed expert again composes the maps
    if original:
        new_to_old = [original["original_ids"][i] for i in new_to_old]
        vocab = original["original_vocab_size"]
    setattr(model.config, TRIMMED_KEY, {"original_vocab_size": vocab, "original_ids": [int(i) for i in new_to_old]})


def _remap_ids(cfg, old_to_new: dict[int, int]) -> None:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "decoder_start_token_id",
                 "sep_token_id"):
        value = getattr(cfg, name, None)
        if isinstance(value, int):
            setattr(cfg, name, old_to_new.get(value))
        elif isinstance(value, (list, tuple)):
            setattr(cfg, name, [old_to_new[v] for v in value if v in old_to_new])


def original_ids(model) -> list[int] | None:
    """Original token id of each row of a trimmed model (None when its vocabulary is not trimmed)."""
    info = getattr(model.config, TRIMMED_KEY, None)
    return list(info["original_ids"]) if info else None


def coverage(tokenizer, kept, texts: list[str]) -> float:
    """Share of the dense tokens of `texts` that the kept vocabulary holds as single tokens."""
    kept_set = {int(i) for i in kept}
    ids = [i for t in texts for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
    return sum(i in kept_set for i in ids) / max(1, len(ids))


def tokens_per_word(tokenizer, texts: list[str]) -> float:
    words = sum(len(t.split()) for t in texts)
    return sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) / max(1, words)


def vocab_held_out(corpora: dict) -> dict[str, list[str]]:
    """The held-out texts whose coverage an expert's record reports: each corpus's tune and eval splits."""
    return {f"{name}/{split}": getattr(c, split) for name, c in corpora.items() for split in ("tune", "eval")}


HOSTILE = ["emoji 😀👩‍👩‍👧🏳️‍🌈", "中文字符，日本語のテキスト", "مرحبا بالعالم", "Привет, мир", "\x00\x01\x07\x1b[0m\x7f",
           "1234567890" * 8, "  \t\t\n\n\n    \u00a0\u200b\ufeff x", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷺ ꙮ ᚠᛇᚻ"]


def vocab_rule(tokenizer, calib_texts: list[str], corpora: dict | None, size: int | None) -> KeepRule:
    """The keep rule for an expert, with its bad input refused (before any pruning runs)."""
    if size is not None and size < 1:
        raise UserError(f"--vocab-size {size} must be a positive number of tokens")
    rule = KeepRule(tokenizer, calib_texts, expert_languages(corpora or {}))
    if size is not None:
        rule.check_size(size)
    elif not any(c.tune for c in (corpora or {}).values()):
        raise UserError("--prune-vocab chooses its size on held-apart calibration documents and the expert's "
                        "corpora have none; pass --vocab-size N")
    return rule


def trim_vocab_for_corpora(model, tokenizer, calib_texts: list[str], *, corpora: dict | None = None,
                           size: int | None = None, floor: float = DEFAULT_FLOOR,
                           held_out: dict[str, list[str]] | None = None, on_point=None,
                           rule: KeepRule | None = None):
    """Trim `model`'s vocabulary (in place) to what the expert's calibration text and languages need; the size
    is `size`, or the smallest within `floor` on the corpora's tune documents. Returns (trimmed tokenizer,
    record); `held_out` ({name: texts}) are only measured: coverage and tokens per word, dense and trimmed."""
    from ..model.tokenizer_trim import round_trip_failures, trim_tokenizer

    rule = rule or vocab_rule(tokenizer, calib_texts, corpora, size)
    search = None
    if size is None:
        tune = [t for c in (corpora or {}).values() for t in c.tune]
        search = choose_size(model, tokenizer, rule, tune, floor, on_point=on_point)
        size = search["size"]
        if size is None:
            record = {"vocab_before": rule.vocab_size, "vocab_after": rule.vocab_size, "languages": rule.languages,
                      "always_kept": len(rule.base), "size_search": search, "coverage": {},
                      "note": f"no grid size below {rule.vocab_size} tokens stays within {floor}x on the tune split"}
            return tokenizer, record
    new_tok, new_to_old = trim_tokenizer(tokenizer, rule.keep(size), rule.pieces)
    broken = round_trip_failures(tokenizer, new_tok, HOSTILE + calib_texts[:8])
    if broken:  # a bug of ours, not the user's input
        raise RuntimeError(f"the trimmed tokenizer does not reproduce {len(broken)} texts, e.g. {broken[0][:40]!r}")
    trim_model_vocab(model, new_to_old)
    ids = original_ids(model)
    record = {"vocab_before": rule.vocab_size, "vocab_after": len(new_to_old),
              "rule": "special, byte, letter-free and calibration tokens, then the most frequent tokens of "
                      f"{'+'.join(rule.languages)} (wordfreq) up to the size",
              "languages": rule.languages, "always_kept": len(rule.base), "size_search": search,
              "original_ids": f"config.json {TRIMMED_KEY}.original_ids",
              "original_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
              "coverage": {}, "tokens_per_word": {}}
    for name, texts in (held_out or {}).items():
        if texts:
            record["coverage"][name] = round(coverage(tokenizer, new_to_old, texts), 6)
            record["tokens_per_word"][name] = {"dense": round(tokens_per_word(tokenizer, texts), 4),
                                               "trimmed": round(tokens_per_word(new_tok, texts), 4)}
    return new_tok, record
