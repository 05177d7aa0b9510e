"""Quality measures shared by validate and the benchmarks: perplexity, multiple-choice accuracy,
next-token agreement and KL divergence against a reference model. Every function takes a `logits_fn`
(token ids [B, T] + mask -> logits [B, T, V]) so PyTorch models and ONNX sessions are measured alike."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

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


def _batches(tokenizer, texts, batch_size, max_length):
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s:s + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        yield enc["input_ids"], enc["attention_mask"]


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


def perplexity(logits_fn: LogitsFn, tokenizer, texts: list[str], *, batch_size: int = 8,
               max_length: int = 512) -> float:
    """Corpus perplexity: exp of the mean next-token NLL over all real tokens."""
    nll, count = 0.0, 0
    for ids, mask in _batches(tokenizer, texts, batch_size, max_length):
        s, n = nll_sum(logits_fn(ids, mask), ids, mask)
        nll, count = nll + s, count + n
    return math.exp(nll / max(1, count))


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
    for ids, mask in _batches(tokenizer, texts, batch_size, max_length):
        a, k, n = agreement_sums(ref_fn(ids, mask), test_fn(ids, mask), mask)
        agree, kl, count = agree + a, kl + k, count + n
    return {"top1_agreement": agree / max(1, count), "kl": kl / max(1, count)}
