"""The modules of a pruned vocabulary, so that the loader can rebuild an expert saved by the previous rule
(prune/vocab.py chooses the tokens): token ids kept, dropped rows mapped to the unknown row, logits
scattered back to the full vocabulary width.
"""

from __future__ import annotations

import copy

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


def replace_module(model, path: str, module: nn.Module) -> None:
    owner, _, name = path.rpartition(".")
    setattr(arch.get(model, owner) if owner else model, name, module)


@torch.no_grad()
def prune_vocab(model, kept: torch.Tensor, unk_row: int = 0, tied: bool | None = None) -> dict:
    """(The previous rule's layout.) Keep only the `kept` token ids (sorted) in the embedding and the output head, in place."""
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
    new_head = kept_head(head, kept, new_embed.weight if tied else None)
    replace_module(model, spec.embed, RemappedEmbedding(new_embed, id_map))
    replace_module(model, spec.lm_head, ScatteredLMHead(new_head, kept, vocab))
    model.config.cusprun_vocab = {"kept": int(kept.numel()), "vocab_size": vocab, "tied": bool(tied),
                                  "unk_row": unk_row}
    return {"vocab_before": vocab, "vocab_after": int(kept.numel())}


def shape_vocab_like(model, info: dict) -> None:
    """Give a freshly built model the pruned-vocabulary modules recorded in `info` (weights unset)."""
    n = info["kept"]
    # placeholder ids: the real id_map and kept_ids buffers are loaded from the checkpoint afterwards
    prune_vocab(model, torch.arange(n), info.get("unk_row", 0), tied=info["tied"])


def kept_head(head: nn.Linear, kept: torch.Tensor, tied_to: nn.Parameter | None = None) -> nn.Linear:
    """An output head over the `kept` rows of `head`; its weight is `tied_to` (the trimmed embedding's) when tied."""
    new = nn.Linear(head.in_features, kept.numel(), bias=head.bias is not None,
                    device=head.weight.device, dtype=head.weight.dtype)
    if tied_to is not None:
        new.weight = tied_to
    else:
        new.weight.data.copy_(head.weight.data[kept])
    if head.bias is not None:
        new.bias.data.copy_(head.bias.data[kept])
    return new
