"""Vocabulary pruning: drop embedding and lm_head rows the expert never needs.

Embeddings are 21% of SmolLM2-135M and 63% of Gemma-3-270M, so on the edge they matter. The pruned model
still speaks the original token ids, so the tokenizer and ONNX Runtime GenAI need no change:
  - the input embedding maps original ids to kept rows through `id_map` (dropped ids -> the unk row),
  - the output head computes logits for kept tokens only and scatters them into a full-vocabulary tensor
    where dropped tokens get a very low logit, so they are never generated.
Kept tokens (`tokens_to_keep`): every special token, every token of the expert's calibration corpora,
and every token whose letters are all in writing systems (Unicode scripts) the calibration text uses;
tokens without letters (digits, punctuation, whitespace, byte pieces) are always kept. Calibration
corpora are far too small to list the tokens unseen text needs (on SmolLM2, keeping the tokens seen in
the calibration text plus the 8,192 lowest ids covered 91% of held-out tokens), but a script rule is safe
for any text in the expert's languages: it keeps 100% of the held-out tokens of every built-in category.
It drops 36% of Gemma-3-270M's 262k multilingual vocabulary for a Latin-script expert and only 0.6% of
SmolLM2's English-centred one. `keep_top` (opt-in) replaces the script rule by the N lowest ids, which
prunes much harder and covers much less; the expert's record carries the coverage either way.
"""

from __future__ import annotations

import copy
import unicodedata

import torch
import torch.nn as nn

from . import arch

DROPPED_LOGIT = -1.0e4  # low enough for softmax, representable in fp16


class RemappedEmbedding(nn.Module):
    """An embedding over kept rows that takes original token ids."""

    def __init__(self, inner: nn.Embedding, id_map: torch.Tensor):
        super().__init__()
        self.inner = inner
        self.register_buffer("id_map", id_map.long())

    @property
    def weight(self) -> nn.Parameter:
        return self.inner.weight

    def forward(self, input_ids):
        return self.inner(self.id_map[input_ids])


class ScatteredLMHead(nn.Module):
    """Logits for kept tokens, placed at their original ids in a full-vocabulary tensor."""

    def __init__(self, inner: nn.Linear, kept_ids: torch.Tensor, vocab_size: int):
        super().__init__()
        self.inner = inner
        self.vocab_size = vocab_size
        self.register_buffer("kept_ids", kept_ids.long())

    @property
    def weight(self) -> nn.Parameter:
        return self.inner.weight

    def forward(self, hidden):
        kept = self.inner(hidden)
        full = kept.new_full((*kept.shape[:-1], self.vocab_size), DROPPED_LOGIT)
        return full.index_copy(-1, self.kept_ids, kept)


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


def tokens_to_keep(tokenizer, texts: list[str], vocab_size: int, keep_top: int | None = None) -> torch.Tensor:
    """Ids to keep for an expert whose calibration text is `texts` (see the module docstring)."""
    keep = {i for i in tokenizer.all_special_ids if i is not None and i < vocab_size}
    for t in texts:
        keep.update(i for i in tokenizer(t)["input_ids"] if i < vocab_size)
    if keep_top is not None:
        keep.update(range(min(keep_top, vocab_size)))
    else:
        scripts = text_scripts(texts)
        for i in range(vocab_size):
            if {s for s in map(_script, set(tokenizer.decode([i]))) if s} <= scripts:
                keep.add(i)
    return torch.tensor(sorted(keep), dtype=torch.long)


def coverage(tokenizer, kept: torch.Tensor, texts: list[str]) -> float:
    """Share of the tokens of `texts` that the kept vocabulary contains (the rest can't be generated)."""
    kept_set = set(kept.tolist())
    ids = [i for t in texts for i in tokenizer(t)["input_ids"]]
    return sum(i in kept_set for i in ids) / max(1, len(ids))


def _unk_row(tokenizer, kept: torch.Tensor) -> int:
    for candidate in (tokenizer.unk_token_id, tokenizer.eos_token_id, int(kept[0])):
        if candidate is not None and bool((kept == candidate).any()):
            return int((kept == candidate).nonzero()[0, 0])
    return 0


def _replace(model, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    setattr(arch.get(model, owner) if owner else model, name, module)


def is_vocab_pruned(model) -> bool:
    return isinstance(arch.get(model, arch.spec_for(model).lm_head), ScatteredLMHead)


@torch.no_grad()
def prune_vocab(model, kept: torch.Tensor, unk_row: int = 0, tied: bool | None = None) -> dict:
    """Keep only the `kept` token ids (sorted) in the embedding and the output head, in place."""
    spec = arch.spec_for(model)
    embed = arch.get(model, spec.embed)
    head = arch.get(model, spec.lm_head)
    vocab = embed.weight.shape[0]
    if tied is None:
        tied = head.weight is embed.weight or bool(model.config.tie_word_embeddings)
    id_map = torch.full((vocab,), unk_row, dtype=torch.long)
    id_map[kept] = torch.arange(kept.numel())
    new_embed = copy.copy(embed)  # same class (Gemma's embedding scales its output), own parameter dict
    new_embed._parameters, new_embed._buffers = dict(embed._parameters), dict(embed._buffers)
    new_embed.weight = nn.Parameter(embed.weight.data[kept].clone())
    new_embed.num_embeddings = kept.numel()
    if getattr(new_embed, "padding_idx", None) is not None:
        pad = int(new_embed.padding_idx)
        new_embed.padding_idx = int(id_map[pad]) if bool((kept == pad).any()) else None
    new_head = nn.Linear(head.in_features, kept.numel(), bias=head.bias is not None,
                         device=head.weight.device, dtype=head.weight.dtype)
    if tied:
        new_head.weight = new_embed.weight
    else:
        new_head.weight.data.copy_(head.weight.data[kept])
    if head.bias is not None:
        new_head.bias.data.copy_(head.bias.data[kept])
    _replace(model, spec.embed, RemappedEmbedding(new_embed, id_map))
    _replace(model, spec.lm_head, ScatteredLMHead(new_head, kept, vocab))
    model.config.cusprun_vocab = {"kept": int(kept.numel()), "vocab_size": vocab, "tied": bool(tied),
                                  "unk_row": unk_row}
    return {"vocab_before": vocab, "vocab_after": int(kept.numel())}


def shape_vocab_like(model, info: dict) -> None:
    """Give a freshly built model the pruned-vocabulary modules recorded in `info` (weights unset)."""
    n = info["kept"]
    # placeholder ids: the real id_map and kept_ids buffers are loaded from the checkpoint afterwards
    prune_vocab(model, torch.arange(n), info.get("unk_row", 0), tied=info["tied"])


def vocab_held_out(corpora: dict) -> dict[str, list[str]]:
    """The held-out texts whose coverage an expert's record reports: each corpus's tune and eval splits."""
    return {f"{name}/{split}": getattr(c, split) for name, c in corpora.items() for split in ("tune", "eval")}


def prune_vocab_for_corpora(model, tokenizer, texts: list[str], keep_top: int | None = None,
                            held_out: dict[str, list[str]] | None = None) -> dict:
    """Prune the vocabulary to what `texts` (calibration) need; `held_out` ({name: texts}) are only
    measured: the record gives each one's token coverage."""
    vocab = arch.get(model, arch.spec_for(model).embed).weight.shape[0]
    kept = tokens_to_keep(tokenizer, texts, vocab, keep_top)
    record = prune_vocab(model, kept, _unk_row(tokenizer, kept))
    record["rule"] = f"lowest {keep_top} ids" if keep_top is not None else "scripts of the calibration text"
    record["scripts"] = sorted(text_scripts(texts))
    record["coverage"] = {name: round(coverage(tokenizer, kept, t), 6) for name, t in (held_out or {}).items() if t}
    return record
