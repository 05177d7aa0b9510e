"""Score stage: one forward pass per corpus that collects every statistic the pruning methods need.

All methods share this pass (llm-compressor style: a method is data over shared statistics). Per decoder
layer and corpus we keep:
  ffn_impact_doc [docs, C]  Cus-Prun impact of each FFN channel k per document: mean_t |a_k| * ||W_down[:, k]||,
                            which is exactly the norm of the change in the layer output when k is removed.
  head_impact_doc [docs, H] the same for attention heads: mean_t ||W_o[:, h] x_h||.
  *_impact_rms_doc          the same impacts aggregated over tokens as a root mean square, which weighs
                            the rare large activations that matter most for the output.
  ffn_{sum,abs,sq}  [C]     sums of a, |a|, a^2 over tokens of the down_proj input (Wanda-SP, FLAP, SEAP).
  o_{sum,abs,sq}    [H*hd]  the same for the o_proj input.
  mlp_in_sq, attn_in_sq [D] squared norms of the MLP / attention inputs per hidden feature (Wanda-SP).
  block_influence   []      sum over tokens of 1 - cos(h_in, h_out) of the whole layer (ShortGPT).
Scores are saved as safetensors with JSON metadata (model and corpus hashes), so pruning at another
ratio or with another method needs no new pass.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config.corpora import Corpus
from ..errors import UserError
from ..model import arch
from ..model.sequential import capture_stream, run_layer
from ..model.shards import materialized, reader_of, tensor_of

SCORE_VERSION = 1


def model_fingerprint(model) -> str:
    """Hash of the model's structure and weights (a few float samples per tensor keeps it fast). A lazy model's
    layers are read one tensor at a time, once: its reader keeps the hash until a layer is rewritten (a build's
    load, score and prune stages all ask; for an 8B model each read is 14 GB from disk)."""
    reader = reader_of(model)
    if reader is not None and reader.fingerprint is not None:
        return reader.fingerprint
    h = hashlib.sha256()
    h.update(model.config.model_type.encode())
    for name, p in sorted(model.state_dict().items()):
        flat = tensor_of(model, name, p).detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step].to(torch.float32).cpu().numpy().tobytes())
    if reader is not None:
        reader.fingerprint = h.hexdigest()
    return h.hexdigest()


@dataclass
class CorpusScores:
    """Statistics of one corpus, per layer (lists indexed by layer)."""

    name: str
    sha256: str
    n_docs: int
    n_tokens: int
    tensors: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def layer(self, key: str, i: int) -> torch.Tensor:
        return self.tensors[key][i]


@dataclass
class ScoreSet:
    """Scores of one model over several corpora."""

    model_hash: str
    model_type: str
    n_layers: int
    corpora: dict[str, CorpusScores]  # keyed by dimension ("language", ...) or corpus name
    meta: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        flat = {}
        info = {}
        for key, cs in self.corpora.items():
            info[key] = {"name": cs.name, "sha256": cs.sha256, "n_docs": cs.n_docs, "n_tokens": cs.n_tokens}
            for stat, per_layer in cs.tensors.items():
                for i, t in enumerate(per_layer):
                    flat[f"{key}|{stat}|{i}"] = t.contiguous()
        meta = {
            "version": SCORE_VERSION, "model_hash": self.model_hash, "model_type": self.model_type,
            "n_layers": self.n_layers, "corpora": info, **self.meta,
        }
        tmp = path.with_name(path.name + ".partial")
        save_file(flat, str(tmp), metadata={"cusprun": json.dumps(meta)})
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "ScoreSet":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise UserError(f"no score file at {path}; run `cusprun-edge score` first")
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads(f.metadata()["cusprun"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise UserError(f"{path} is not a cusprun-edge score file ({type(exc).__name__})") from None
        corpora = {}
        for key, info in meta.pop("corpora").items():
            cs = CorpusScores(info["name"], info["sha256"], info["n_docs"], info["n_tokens"])
            for name, t in tensors.items():
                k, stat, i = name.split("|")
                if k == key:
                    cs.tensors.setdefault(stat, [None] * meta["n_layers"])[int(i)] = t
            corpora[key] = cs
        return cls(meta.pop("model_hash"), meta.pop("model_type"), meta.pop("n_layers"), corpora, meta)

    def check_model(self, model) -> None:
        if model_fingerprint(model) != self.model_hash:
            raise UserError("these scores were computed for another model; re-run `cusprun-edge score` for this one")


class _Collector:
    """Pre- and post-forward hooks on one decoder layer at a time that accumulate its statistics over the
    batches of a sweep (model/sequential.py)."""

    def __init__(self, model, n_docs: int):
        self.spec = arch.spec_for(model)
        self.hd = arch.head_dim(model)
        self.mask: torch.Tensor | None = None  # [B, T] bool of real tokens, set per batch
        self.doc_offset = 0
        self.stats: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for i, p in enumerate(arch.all_layer_parts(model)):  # shapes only: a lazy model's layers hold no data
            self._zeros(i, p, n_docs)

    @torch.no_grad()
    def attach(self, i: int, layer) -> None:
        """Hook layer i (materialized) until `detach`."""
        p = arch.layer_parts(layer, self.spec)
        self.down_norm = p.down.weight.float().norm(dim=0)
        self.o_heads = p.o.weight.float().view(p.o.out_features, -1, self.hd)  # per head: [hidden, H, hd]
        self.handles = [
            p.down.register_forward_pre_hook(self._ffn_hook(i)),
            p.o.register_forward_pre_hook(self._attn_hook(i)),
            p.gate.register_forward_pre_hook(self._in_hook(i, "mlp_in_sq")),
            p.q.register_forward_pre_hook(self._in_hook(i, "attn_in_sq")),
            layer.register_forward_hook(self._block_hook(i), with_kwargs=True),
        ]

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.down_norm, self.o_heads = [], None, None

    def _zeros(self, i, p, n_docs):
        C, HD, D = p.down.in_features, p.o.in_features, p.q.in_features
        H = HD // self.hd
        shapes = {
            "ffn_impact_doc": (n_docs, C), "head_impact_doc": (n_docs, H),
            "ffn_impact_rms_doc": (n_docs, C), "head_impact_rms_doc": (n_docs, H),
            "ffn_sum": (C,), "ffn_abs": (C,), "ffn_sq": (C,),
            "o_sum": (HD,), "o_abs": (HD,), "o_sq": (HD,),
            "mlp_in_sq": (D,), "attn_in_sq": (D,), "block_influence": (1,),
        }
        for k, shape in shapes.items():
            self.stats.setdefault(k, []).append(torch.zeros(shape, dtype=torch.float64))

    def _valid(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of x ([B, T, F]) at real tokens, float32: [N, F]."""
        return x[self.mask].float()

    def _per_doc_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over each document's real tokens of x ([B, T, F]) -> [B, F]."""
        m = self.mask.to(x.dtype).unsqueeze(-1)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)

    def _add(self, key, i, value):
        self.stats[key][i] += value.double().cpu()

    def _ffn_hook(self, i):
        def hook(module, args):
            a = args[0].float()
            docs = slice(self.doc_offset, self.doc_offset + a.shape[0])
            impact = a.abs() * self.down_norm.to(a.device)
            self.stats["ffn_impact_doc"][i][docs] = self._per_doc_mean(impact).double().cpu()
            self.stats["ffn_impact_rms_doc"][i][docs] = self._per_doc_mean(impact * impact).sqrt().double().cpu()
            v = self._valid(a)
            self._add("ffn_sum", i, v.sum(0))
            self._add("ffn_abs", i, v.abs().sum(0))
            self._add("ffn_sq", i, (v * v).sum(0))

        return hook

    def _attn_hook(self, i):
        def hook(module, args):
            x = args[0].float()
            B, T, HD = x.shape
            docs = slice(self.doc_offset, self.doc_offset + B)
            xh = x.view(B, T, -1, self.hd)
            # per-head contribution to the layer output: W_o[:, h] x_h, its norm per token
            contrib = torch.einsum("bthd,ohd->btho", xh, self.o_heads.to(x.device)).norm(dim=-1)
            self.stats["head_impact_doc"][i][docs] = self._per_doc_mean(contrib).double().cpu()
            self.stats["head_impact_rms_doc"][i][docs] = self._per_doc_mean(contrib * contrib).sqrt().double().cpu()
            v = self._valid(x)
            self._add("o_sum", i, v.sum(0))
            self._add("o_abs", i, v.abs().sum(0))
            self._add("o_sq", i, (v * v).sum(0))

        return hook

    def _in_hook(self, i, key):
        def hook(module, args):
            v = self._valid(args[0])
            self._add(key, i, (v * v).sum(0))

        return hook

    def _block_hook(self, i):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(self._valid(h_in), self._valid(h_out), dim=-1)
            self._add("block_influence", i, (1 - cos).sum().reshape(1))

        return hook


@torch.no_grad()
def score_corpus(model, tokenizer, corpus: Corpus, *, batch_size: int = 8, max_length: int = 512,
                 progress=None) -> CorpusScores:
    """One sweep of the corpus's calibration documents through the layers (model/sequential.py), one layer
    in memory at a time for a lazy model. `progress(n)` hears each layer done."""
    docs = corpus.calib
    if not docs:
        raise UserError(f"corpus {corpus.name} is empty")
    stream = capture_stream(model, tokenizer, docs, batch_size=batch_size, max_length=max_length)
    col = _Collector(model, len(docs))
    xs, stream.hidden = stream.hidden, []  # the stream moves on layer by layer; its start is not kept
    offsets = [sum(len(m) for m in stream.masks[:b]) for b in range(len(stream.masks))]
    device = arch.get(model, arch.spec_for(model).embed).weight.device
    for i in range(len(arch.decoder_layers(model))):
        with materialized(model, i) as layer:
            col.attach(i, layer)
            try:
                out = []
                for b, (x, kwargs) in enumerate(zip(xs, stream.layer_kwargs[i])):
                    col.mask, col.doc_offset = stream.masks[b].to(device), offsets[b]
                    out.append(run_layer(layer, x, kwargs, device))
                xs = out
            finally:
                col.detach()
        if progress:
            progress(1)
    tensors = {k: [t.float() for t in v] for k, v in col.stats.items()}
    return CorpusScores(corpus.name, corpus.sha256(), len(docs), stream.n_tokens, tensors)


def score_model(model, tokenizer, corpora: dict[str, Corpus], *, batch_size: int = 8, max_length: int = 512,
                show_progress: bool = True) -> ScoreSet:
    """Score `model` on every corpus (keyed by dimension). Returns a ScoreSet ready to save."""
    from rich.progress import Progress

    t0 = time.time()
    out = {}
    total = len(corpora) * len(arch.decoder_layers(model))
    with Progress(disable=not show_progress, transient=True) as bar:
        task = bar.add_task("scoring", total=total)  # layers done, over every corpus
        for key, corpus in corpora.items():
            bar.update(task, description=f"scoring {corpus.name}")
            out[key] = score_corpus(model, tokenizer, corpus, batch_size=batch_size, max_length=max_length,
                                    progress=lambda n: bar.advance(task, n))
    return ScoreSet(
        model_fingerprint(model), model.config.model_type, len(arch.decoder_layers(model)), out,
        {"seconds": round(time.time() - t0, 2), "max_length": max_length},
    )
