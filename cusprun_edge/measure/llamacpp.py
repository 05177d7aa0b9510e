"""Run a GGUF in llama.cpp itself (llama-cpp-python): logits, held-out perplexity, prefill and decode speed,
and logit parity against the same model in PyTorch.

llama-cpp-python comes as source only; `make install` builds it once and caches the wheel. Everything here
raises UserError with the install hint when it is missing.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

INSTALL_HINT = "llama-cpp-python is not installed; run `make install` (it builds and caches its wheel)"
GGML_TYPE_F32 = 0


def missing() -> str | None:
    """None when llama_cpp imports, else why not (for skips and errors)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # a wheel built for another CPU fails with OSError, not ImportError
        return f"{INSTALL_HINT} ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return None


class LlamaCpp:
    """One GGUF loaded in llama.cpp on the CPU.

    `exact`: flash attention off and an fp32 KV cache, for parity checks (llama.cpp's defaults, an f16 cache,
    moved a tiny model's logits by 3e-2 against 3e-5 this way). `all_logits`: keep every position's logits
    (perplexity, parity); off for speed runs, where a user computes only the last position's."""

    def __init__(self, path, *, n_ctx: int = 512, threads: int = 2, exact: bool = False, all_logits: bool = True):
        from ..errors import UserError

        reason = missing()
        if reason:
            raise UserError(reason)
        from llama_cpp import Llama

        kwargs = dict(n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads, n_threads_batch=threads,
                      logits_all=all_logits, verbose=False)
        if exact:
            kwargs.update(flash_attn=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
        try:
            self.llm = Llama(str(Path(path)), **kwargs)
        except ValueError as exc:  # llama-cpp-python's message for a file llama.cpp refuses
            raise UserError(f"llama.cpp cannot load {path}: {exc}") from None
        self.n_ctx = n_ctx
        self.n_vocab = self.llm.n_vocab()

    def tokenize(self, text: str, add_bos: bool | None = None) -> list[int]:
        """The GGUF's own tokenizer, as a llama.cpp user gets it (BOS by the file's add_bos_token)."""
        import llama_cpp

        if add_bos is None:
            add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(self.llm.model))
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits [T, n_vocab] after each token (one prefill pass from an empty cache)."""
        tokens = list(tokens)[: self.n_ctx]
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def decode_logits(self, tokens: list[int], n_prefill: int) -> np.ndarray:
        """Logits [T, n_vocab]: the first `n_prefill` tokens in one pass, the rest one at a time through the
        KV cache (the path generation takes)."""
        self.llm.reset()
        self.llm.eval(list(tokens[:n_prefill]))
        for t in tokens[n_prefill:]:
            self.llm.eval([t])
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def nll(self, docs: list[list[int]]) -> tuple[float, int]:
        """Summed negative log-likelihood of each next token and the number of tokens scored."""
        total, count = 0.0, 0
        for tokens in docs:
            tokens = tokens[: self.n_ctx]
            if len(tokens) < 2:
                continue
            logits = self.logits(tokens).astype(np.float64)[:-1]
            top = logits.max(-1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
            total += float((logz - logits[np.arange(len(tokens) - 1), tokens[1:]]).sum())
            count += len(tokens) - 1
        return total, count

    def speed(self, prompt: list[int], continuation: list[int]) -> dict:
        """Prefill `prompt` in one pass, then decode `continuation` one token at a time (teacher-forced: the
        same work as greedy generation, the same tokens for every model). Wall-clock seconds."""
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(list(prompt))
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for t in continuation:
            self.llm.eval([t])
        decode = time.perf_counter() - start
        return {"prefill_s": prefill, "prefill_tok_s": len(prompt) / prefill, "decode_s": decode,
                "decode_tok_s": len(continuation) / decode}

    def greedy(self, prompt: list[int], n_new: int) -> list[int]:
        """Greedy continuation (argmax of each last position)."""
        self.llm.reset()
        self.llm.eval(list(prompt))
        out = []
        for _ in range(n_new):
            nxt = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(nxt)
            self.llm.eval([nxt])
        return out

    def close(self) -> None:
        self.llm.close()


def gguf_ids(manifest: dict | None, model) -> tuple[np.ndarray | None, np.ndarray | None]:
    """For a trimmed-vocabulary expert: (original id -> GGUF id, -1 if dropped; GGUF id -> original id).
    (None, None) when the vocabulary was not trimmed: the ids are the same."""
    from ..model import arch

    head = arch.get(model, arch.spec_for(model).lm_head)
    kept = getattr(head, "kept_ids", None)
    if kept is None:
        return None, None
    kept = kept.cpu().numpy()
    to_gguf = np.full(int(head.vocab_size), -1, dtype=np.int64)
    to_gguf[kept] = np.arange(len(kept))
    return to_gguf, kept


def parity(model, gguf_path, token_docs: list[list[int]], *, threads: int = 2, exact: bool = True,
           n_ctx: int = 512) -> dict:
    """Logits of the GGUF in llama.cpp against the same model in PyTorch fp32, on documents given as the
    Hugging Face tokenizer's ids (mapped to the GGUF's ids when the vocabulary was trimmed; documents with a
    dropped token are cut before it). Returns the largest absolute logit difference, the logits' scale and
    top-1 agreement."""
    import torch

    to_gguf, kept = gguf_ids(None, model)
    run = LlamaCpp(gguf_path, n_ctx=n_ctx, threads=threads, exact=exact)
    max_diff, scale, agree, count = 0.0, 0.0, 0, 0
    try:
        for doc in token_docs:
            doc = list(doc)[:n_ctx]
            if to_gguf is not None:
                mapped = to_gguf[np.asarray(doc)]
                cut = int(np.argmax(mapped < 0)) if (mapped < 0).any() else len(doc)
                doc, ids = doc[:cut], mapped[:cut].tolist()
            else:
                ids = doc
            if not doc:
                continue
            with torch.no_grad():
                ref = model(torch.tensor([doc])).logits[0].float().numpy()
            if kept is not None:
                ref = ref[:, kept]
            got = run.logits(ids)
            max_diff = max(max_diff, float(np.abs(got - ref).max()))
            scale = max(scale, float(np.abs(ref).max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            count += len(doc)
    finally:
        run.close()
    return {"max_abs_diff": max_diff, "max_abs_logit": scale, "top1_agreement": agree / max(count, 1),
            "positions": count}


def greedy_agreement(model, tokenizer, gguf_path, prompts: list[str], *, max_new_tokens: int = 32,
                     threads: int = 2, n_ctx: int = 512) -> dict:
    """Greedy continuations of `prompts` by PyTorch fp32 and by the GGUF in llama.cpp (its defaults, as a user
    runs it), from the same prompt ids: how many are identical and how long they agree."""
    import torch

    run = LlamaCpp(gguf_path, n_ctx=n_ctx, threads=threads)
    rows = []
    try:
        for prompt in prompts:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][: n_ctx - max_new_tokens]
            ref, seq = [], list(ids)
            with torch.no_grad():  # the whole sequence each step: no cache, nothing shared with llama.cpp's path
                for _ in range(max_new_tokens):
                    nxt = int(model(torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
                    ref.append(nxt)
                    seq.append(nxt)
                    if nxt == tokenizer.eos_token_id:
                        break
            got = run.greedy(ids, len(ref))
            same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
            rows.append({"prompt": prompt, "identical": ref == got, "agree_tokens": same, "tokens": len(ref),
                         "pytorch": tokenizer.decode(ref), "llama_cpp": tokenizer.decode(got)})
    finally:
        run.close()
    return {"identical": sum(r["identical"] for r in rows), "prompts": len(rows),
            "max_new_tokens": max_new_tokens, "rows": rows}


def held_out_nll(gguf_path, texts: list[str], *, threads: int = 2, n_ctx: int = 512) -> dict:
    """Held-out perplexity in llama.cpp, each document tokenized by the GGUF's own tokenizer (first n_ctx
    tokens). Also the summed NLL, so a trimmed vocabulary can be judged per dense token."""
    run = LlamaCpp(gguf_path, n_ctx=n_ctx, threads=threads)
    try:
        docs = [run.tokenize(t) for t in texts]
        total, count = run.nll(docs)
    finally:
        run.close()
    return {"ppl": float(np.exp(total / max(count, 1))), "nll": total, "tokens": count, "documents": len(docs)}


def alternating_speed(paths: dict[str, Path], prompt_text: str, *, rounds: int = 3, prompt_tokens: int = 128,
                      decode_tokens: int = 64, threads: int = 2) -> dict:
    """Prefill and decode speed of each GGUF, measured in alternating rounds (dense, expert, dense, ...) so
    that load on a shared machine falls on all of them alike; median over rounds."""
    runs = {name: LlamaCpp(p, n_ctx=prompt_tokens + decode_tokens + 8, threads=threads, all_logits=False)
            for name, p in paths.items()}
    samples: dict[str, list[dict]] = {name: [] for name in paths}
    try:
        for name, run in runs.items():  # one warm-up each
            toks = run.tokenize(prompt_text)
            run.speed(toks[:16], toks[16:20])
        for _ in range(rounds):
            for name, run in runs.items():
                toks = run.tokenize(prompt_text)
                if len(toks) < prompt_tokens + decode_tokens:
                    raise ValueError(f"speed text has {len(toks)} tokens, needs {prompt_tokens + decode_tokens}")
                samples[name].append(run.speed(toks[:prompt_tokens], toks[prompt_tokens:prompt_tokens + decode_tokens]))
    finally:
        for run in runs.values():
            run.close()
    out = {}
    for name, s in samples.items():
        out[name] = {"decode_tok_s": float(np.median([x["decode_tok_s"] for x in s])),
                     "prefill_tok_s": float(np.median([x["prefill_tok_s"] for x in s])),
                     "decode_tok_s_rounds": [round(x["decode_tok_s"], 2) for x in s],
                     "prefill_tok_s_rounds": [round(x["prefill_tok_s"], 2) for x in s]}
    return {"threads": threads, "rounds": rounds, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
            "models": out}
