"""Where the int4 fast plan loses quality: `python -m benchmarks int4-parts [--model gemma3-270m]`.

The dense model with its Linear weights as the plan stores them (export/simulate.quantized_copy, the export's own
quantizer and GPTQ statistics from the en+general calibration documents), one part at a time back at 8 bits or in
fp32, scored on the held-apart tune documents (PyTorch; the int8 activations of accuracy_level 4 are not simulated;
the eval split is not read). Tied embeddings read the lm_head's 4-bit rows in the fast plan (GatherBlockQuantized),
so the embedding is separated from the logits side. Writes results/int4_parts.json (one entry per model).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from .common import RESULTS, machine, write_json

SPEC = "language=en,domain=general"


def run(model_name: str) -> dict:
    from cusprun_edge.config.corpora import ExpertSpec, calibration_documents
    from cusprun_edge.export import nbits
    from cusprun_edge.export.calibration import calibrated_linears, gram_for, input_grams
    from cusprun_edge.export.simulate import linear_weights, quantized_copy
    from cusprun_edge.measure.evaluate import perplexity, torch_logits_fn
    from cusprun_edge.model.load import load_model

    started = time.time()
    model, tok = load_model(model_name)
    corpora = ExpertSpec.parse(SPEC).corpora()
    tune = [t for c in corpora.values() for t in c.tune]
    grams = input_grams(model, tok, calibration_documents(corpora), calibrated_linears(model, "fast"))
    weights = linear_weights(model)
    head = next(name for name, (_, _, is_head) in weights.items() if is_head)
    projections = frozenset(name for name in weights if name != head)
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    ppl = {"pytorch fp32": perplexity(torch_logits_fn(model), tok, tune)}

    def score(label: str, twin) -> None:
        ppl[label] = perplexity(torch_logits_fn(twin), tok, tune)
        print(f"{label}: {ppl[label]:.3f} ({ppl[label] / ppl['pytorch fp32']:.4f}x)", flush=True)

    def with_embedding(twin, rows: torch.Tensor):
        # a new Parameter on the same module unties it (and keeps what the module does to rows: Gemma scales them)
        twin.get_input_embeddings().weight = torch.nn.Parameter(rows.clone(), requires_grad=False)
        return twin

    score("fast", quantized_copy(model, "fast", grams))
    score("fast, lm_head 8-bit", quantized_copy(model, "fast", grams, level=2))  # level 2, no projection listed
    score("fast, projections 8-bit", quantized_copy(model, "fast", grams, level=1, worst=projections))
    if tied:
        embedding = model.get_input_embeddings().weight.detach().clone()
        twin = with_embedding(quantized_copy(model, "fast", grams), embedding)
        score("fast, embedding fp32", twin)
        w = weights[head][1]
        asymmetric = nbits.quantize_gptq(w, 4, gram_for(grams, head), block=32, symmetric=False).dequantize()
        with torch.no_grad():
            twin.get_output_embeddings().weight = torch.nn.Parameter(torch.from_numpy(asymmetric.T.copy()))
        score("fast, embedding fp32, lm_head with integer zero points", twin)
        rows8 = nbits.quantize(w, 8, "none", block=32, method="rtn").dequantize().T.copy()
        score("fast, embedding 8-bit, lm_head with integer zero points",
              with_embedding(twin, torch.from_numpy(np.ascontiguousarray(rows8))))
    reference = ppl["pytorch fp32"]
    entry = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
             "split": f"{SPEC} tune ({len(tune)} documents held apart from scoring)", "tied_embedding": tied,
             "ppl": {k: round(v, 4) for k, v in ppl.items()},
             "vs_fp32": {k: round(v / reference, 4) for k, v in ppl.items()},
             "seconds": round(time.time() - started, 1)}
    path = RESULTS / "int4_parts.json"
    data = json.loads(path.read_text()) if path.exists() else {"about": __doc__.strip()}
    data[model_name] = entry
    write_json("int4_parts.json", data)
    return entry


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks int4-parts")
    p.add_argument("--model", default="gemma3-270m")
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    print(json.dumps(run(a.model)["vs_fp32"], indent=1))
