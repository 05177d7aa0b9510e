"""Quality measures shared by validate and the benchmarks: perplexity, multiple-choice accuracy,
next-token agreement and KL divergence against a reference model. Every function takes a `logits_fn`
(token ids [B, T] + mask -> logits [B, T, V]) so PyTorch models and ONNX sessions are measured alike."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..model.sequential import padded_batches

LogitsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def torch_logits_fn(model, *, on_device: bool = False) -> LogitsFn:
    """`on_device`: leave the logits where the model is (perplexity and multiple choice then reduce them there,
    instead of copying [B, T, V] floats to the CPU); off for callers that compare them with ONNX logits."""
    device = next(model.parameters()).device

    @torch.no_grad()
    def fn(ids, mask):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        return logits if on_device else logits.cpu()

    return fn


def nll_sum(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL over real tokens, and how many tokens that was."""
    ids, mask = ids.to(logits.device), mask.to(logits.device)
    target, valid = ids[:, 1:].reshape(-1), mask[:, 1:].bool().reshape(-1)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    loss = F.cross_entropy(flat, target, reduction="none")
    return float(loss[valid].sum()), int(valid.sum())


def agreement_sums(ref: torch.Tensor, test: torch.Tensor, mask: torch.Tensor) -> tuple[int, float, int]:
    """Top-1 agreements, summed KL(ref || test), and the number of real positions."""
    valid = mask.bool()
    agree = int((ref.argmax(-1) == test.argmax(-1))[valid].sum())
    lp_ref, lp_test = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)
    kl = float((lp_ref.exp() * (lp_ref - lp_test)).sum(-1)[valid].sum())
    return agree, kl, int(valid.sum())


def nll_total(logits_fn: LogitsFn, tokenizer, texts: list[str], *, batch_size: int = 8,
              max_length: int = 512) -> tuple[float, int]:
    """Summed next-token NLL over all real tokens of `texts`, and how many tokens that was."""
    nll, count = 0.0, 0
    for ids, mask in padded_batches(tokenizer, texts, batch_size, max_length):
        s, n = nll_sum(logits_fn(ids, mask), ids, mask)
        nll, count = nll + s, count + n
    return nll, count


def perplexity(logits_fn: LogitsFn, tokenizer, texts: list[str], *, batch_size: int = 8,
               max_length: int = 512) -> float:
    """Corpus perplexity: exp of the mean next-token NLL over all real tokens."""
    nll, count = nll_total(logits_fn, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    return math.exp(nll / max(1, count))


# Perplexity across vocabularies. A trimmed vocabulary splits some words into more tokens, and a per-token
# perplexity over more, easier tokens looks better than it is. Every place that compares models whose
# tokenizers differ divides the total NLL of the same text by the tokens the dense tokenizer uses on it.


def per_dense_token(nll: float, dense_tokens: int, text_bytes: int | None = None) -> dict:
    """exp(total NLL / dense tokens of the same text), and bits per UTF-8 byte of it: the one definition."""
    return {"ppl_per_dense_token": math.exp(nll / max(1, dense_tokens)),
            "bits_per_byte": nll / math.log(2) / text_bytes if text_bytes else None}


def predicted_tokens(tokenizer, texts: list[str]) -> int:
    """Next-token predictions a model makes on `texts` with `tokenizer` (what `nll_sum` counts)."""
    return sum(max(0, len(ids) - 1) for ids in tokenizer(list(texts))["input_ids"]) if texts else 0


def clip_to_tokens(tokenizer, texts: list[str], max_tokens: int) -> list[str]:
    """Each text cut where its first `max_tokens` tokens (special ones included) end, so models with other
    tokenizers can be scored on exactly the same text."""
    extra = len(tokenizer("")["input_ids"])  # the bos a tokenizer adds
    out = []
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        limit = max(1, max_tokens - extra)
        out.append(text if len(enc["input_ids"]) <= limit else text[:enc["offset_mapping"][limit - 1][1]])
    return out


def text_quality(logits_fn: LogitsFn, tokenizer, texts: list[str], dense_tokenizer, *, batch_size: int = 8,
                 max_length: int = 2048) -> dict:
    """NLL of `texts` (clip them first: nothing may be truncated) with the model's own `tokenizer`, its own
    per-token perplexity, and perplexity per dense token and bits per byte (`per_dense_token`)."""
    nll, tokens = nll_total(logits_fn, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    dense = predicted_tokens(dense_tokenizer, texts)
    return {"nll": nll, "tokens": tokens, "dense_tokens": dense, "bytes": text_bytes,
            "ppl": math.exp(nll / max(1, tokens)), **per_dense_token(nll, dense, text_bytes)}


def _right_padded(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [tokenizer(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids, mask


def mc_accuracy(logits_fn: LogitsFn, tokenizer, items: list[dict], *, items_per_batch: int = 8) -> float:
    """Share of items whose correct option has the highest mean log-likelihood after the question."""
    return sum(mc_correct(logits_fn, tokenizer, items, items_per_batch=items_per_batch)) / max(1, len(items))


def mc_correct(logits_fn: LogitsFn, tokenizer, items: list[dict], *, items_per_batch: int = 8) -> list[bool]:
    """Per item, whether its correct option has the highest mean log-likelihood after the question (per-item
    outcomes let a benchmark pair dense and expert item by item for a standard error)."""
    correct: list[bool] = []
    for s in range(0, len(items), items_per_batch):
        chunk = items[s:s + items_per_batch]
        texts, prompt_lens, owners = [], [], []
        for k, item in enumerate(chunk):
            prompt = f"Question: {item['question']}\nAnswer:"
            n_prompt = len(tokenizer(prompt)["input_ids"])
            for opt in item["options"]:
                texts.append(f"{prompt} {opt}")
                prompt_lens.append(n_prompt)
                owners.append(k)
        ids, mask = _right_padded(tokenizer, texts)
        logits = logits_fn(ids, mask)
        ids, mask = ids.to(logits.device), mask.to(logits.device)
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok_lp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        option_mask = mask[:, 1:].clone().float()
        for row, n_prompt in enumerate(prompt_lens):
            option_mask[row, : n_prompt - 1] = 0  # score the option's tokens only
        scores = ((tok_lp * option_mask).sum(1) / option_mask.sum(1).clamp(min=1)).cpu()
        for k, item in enumerate(chunk):
            rows = [i for i, o in enumerate(owners) if o == k]
            correct.append(int(scores[rows].argmax()) == int(item["answer"]))
    return correct


def agreement(ref_fn: LogitsFn, test_fn: LogitsFn, tokenizer, texts: list[str], *, batch_size: int = 8,
              max_length: int = 512) -> dict:
    """Top-1 next-token agreement and mean KL(ref || test) over real tokens."""
    agree, kl, count = 0, 0.0, 0
    for ids, mask in padded_batches(tokenizer, texts, batch_size, max_length):
        a, k, n = agreement_sums(ref_fn(ids, mask), test_fn(ids, mask), mask)
        agree, kl, count = agree + a, kl + k, count + n
    return {"top1_agreement": agree / max(1, count), "kl": kl / max(1, count)}
