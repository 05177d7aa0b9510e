"""The per-tensor precision plan of a weight-only (int4 / int8) export: for every MatMul weight, its
bits, zero-point kind, rounding method and why; plus the fallback levels the parity gate walks.

Defaults, measured on SmolLM2-135M (Q4_1 projections, Q8_0 tied embedding), held-out en+general text
against PyTorch fp32 (ppl 25.99), ONNX Runtime 1.32 CPU (benchmarks/results/int4_plan_dense.json,
builder.json):
  - The lm_head (the tied embedding) at 8 bits, symmetric: Q8_0 stores exactly that way. At 4 bits
    (round-to-nearest) it alone measured KL 0.096, top-1 0.78 with every other weight exact; GPTQ-style on
    calibration documents, KL 0.023, top-1 0.90 (PyTorch, lm_head alone, held-apart tune documents). Keeping
    the first 16,384 token ids at 8 bits and the rest GPTQ 4-bit (ids are roughly by frequency in a BPE
    vocabulary) measured KL 0.0054, top-1 0.972 alone, but with the int8 activations of accuracy_level 4 the
    dense export's held-out top-1 fell from 0.962 to 0.944 for 3% more decode speed (195 vs 189 tokens/s,
    2 threads): not worth it, so the lm_head stays whole at 8 bits.
  - Weights whose blocks lie on a 4-bit affine grid (Q4_1; Q4_K sub-blocks; q/k/v/gate/up rows and
    whole-head o_proj columns survive pruning intact) are transcoded exactly: "offset" form, codes and
    scale in MatMulNBits, the grid's offset per block as a small fp32 MatMul over the input's block
    sums. Exact int4 measured ppl 26.03, KL 0.0035, top-1 0.96; plain symmetric round-to-nearest (every
    weight rounded a second time) ppl 32.84, KL 0.41, top-1 0.62, and integer zero points (least-squares
    fit) hardly better: ppl 32.13, KL 0.31, top-1 0.69; even GPTQ-style on en+general calibration documents
    (PyTorch, held-apart tune text) +9.2% ppl, top-1 0.82, and on o/down alone +1.2%, top-1 0.91. The price:
    0.72x the GenAI builder's decode speed (2 threads; the bytes read per token are 1.32x: an fp32 scale and
    offset per block of 32, the 8-bit lm_head). Scales and offsets that are fp16 numbers (GGUF's are) are
    stored in fp16 and cast back when ONNX Runtime loads the model: files 98.5 MB instead of 113.4 (the
    builder's 86.5), the same arithmetic. (Computing the block sums as extra output columns of the same
    MatMulNBits, 120 fewer nodes, did not measurably change 2-thread decode and added 1.9 MB. A speed-only copy
    with no offset path at all decoded 1.2x faster at 1 thread, one reading the offsets in fp16 1.05x: even a
    free offset would leave the 8-bit lm_head's bytes, about 0.89x plain int4.)
  - Weights with no grid (down_proj whose input columns were pruned, refitted weights, fp16 sources)
    are re-quantized to 4 bits first (OFF_GRID), at 8 bits when the gate refuses that (level 1: the
    quarter with the largest errors; level 2: all of them). On the 25% en+general expert (fp32 ppl
    43.37): 4-bit integer zero point ppl 47.32, KL 0.099, top-1 0.81, which the gate refuses; at 8 bits ppl 43.51, KL 0.0039, top-1 0.96 (files 100 MB; plain int4 69 MB,
    ppl 60.7). The 35% expert took the same path. (The offset form would fit them better, but needs
    whole blocks: pruned widths are rarely multiples of 32.)
  - With calibration documents (build passes the expert's), off-grid weights are quantized GPTQ-style
    instead (CALIBRATED; export/calibration.py, nbits.quantize_gptq). Same 25% expert, level 0, held-out
    text: top-1 0.902, KL 0.026 (weight-only fit: 0.806, 0.102): on the gate's edge under int8 activations
    (0.895-0.902 across builds with uniform budgets), so it shipped at 4 bits or, through level 1, with 8 of
    its 30 down_proj at 8 bits (top-1 0.915). With damage budgets (the default since 2026-12-01) the 25% and
    35% experts pass at 4 bits (top-1 0.908, 0.909) and the 45% through level 1 (0.914).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from . import nbits

BLOCK = 32
# A weight counts as "on a grid" when at least this share of its blocks is (a pruned down_proj
# keeps a handful of blocks by chance; a Q4_1 weight has all of them).
GRID_SHARE = 0.5
# Re-quantization of 4-bit weights without a grid: (zero-point kind, method). Least-squares fit with an
# integer zero point: relative weight error 0.081 vs 0.085 (symmetric) on a broken SmolLM2 down_proj.
OFF_GRID = ("uint8", "fit")
# ... and with calibration statistics of the weight's input (export/calibration.py): GPTQ-style rounding
CALIBRATED = ("uint8", "gptq")

# The int4 plans a build can choose (`--quant-plan`). "exact" keeps GGUF grids exactly (the offset form) and the
# lm_head at 8 bits: closest to fp32, slower than plain int4. "fast" stores every weight in the forms ONNX Runtime's
# CPU kernels run fastest (integer zero points, a symmetric 4-bit lm_head shared with the embedding), rounded
# GPTQ-style on the expert's calibration documents: the bytes of the GenAI builder's int4, better rounded. "rtn" stores
# what "fast" stores, rounded to nearest without calibration, as the GenAI builder rounds: the quickest to write (an
# 8B model's weights in minutes on 2 cores where fitting takes an hour and GPTQ-style rounding half a day), the
# least accurate.
PLANS = ("exact", "fast", "rtn")
DEFAULT_PLAN = "exact"
# Fallback levels of the fast plan (the same gate walks them)
FAST_LEVELS = (
    "int4 fast: every weight 4-bit (integer zero points), lm_head 4-bit symmetric",
    "int4 fast + the quarter of projections with the largest quantization error at 8 bits",
    "int4 fast + that quarter and the lm_head at 8 bits",
    "int4 fast + every projection at 8 bits",
)
RTN_LEVELS = (
    "int4 rtn: every weight 4-bit round-to-nearest (integer zero points), lm_head 4-bit symmetric",
    "int4 rtn + the quarter of projections with the largest quantization error at 8 bits",
    "int4 rtn + that quarter and the lm_head at 8 bits",
    "int4 rtn + every projection at 8 bits",
)
# Fallback levels of an int4 export, in order; the gate tries the next when one fails.
INT4_LEVELS = (
    "int4: lm_head 8-bit, grid weights exact, off-grid weights 4-bit",
    "int4 + the quarter of off-grid weights with the largest quantization error at 8 bits",
    "int4 + off-grid weights at 8 bits",
    "int4 + every projection at 8 bits",
)
# Level 1's share: a pruned expert's 4-bit down_proj on the gate's edge usually needs only its worst few at
# 8 bits, and keeps most of the speed of 4 bits (the 25% en+general expert: 1.24x dense decode fully 4-bit,
# 1.11x with every down_proj at 8 bits).
WORST_SHARE = 0.25


def worst_off_grid(record: dict) -> set[str]:
    """Module paths of the WORST_SHARE of the 4-bit re-quantized weights in a level-0 quantization record with
    the largest error: on calibration inputs where measured (GPTQ-style), else of the weight itself."""
    tensors = {path: t for path, t in record["plan"]["tensors"].items()
               if t["bits"] == 4 and t["kind"] != "offset" and "lm_head" not in t["why"]}
    ranked = sorted(tensors, key=lambda p: tensors[p].get("output_error", tensors[p]["rel_rms_error"]), reverse=True)
    return set(ranked[:int(np.ceil(WORST_SHARE * len(ranked)))])


@dataclass
class TensorPlan:
    """How one MatMul weight is stored (kind: none / uint8 / offset, see nbits)."""

    bits: int
    kind: str
    method: str  # "fit" or "rtn" for blocks not on a grid
    why: str
    block: int = BLOCK

    def to_dict(self) -> dict:
        return {"format": "MatMulNBits", **asdict(self), "zero_point": KIND_WORDS[self.kind]}


KIND_WORDS = {"none": "none (symmetric, code 2**(bits-1) is zero)",
              "uint8": "integer per block (uint8, packed like the weights)",
              "offset": "fp32 offset per block (a MatMul over the input's block sums)"}


def grid_share(weight: np.ndarray, bits: int = 4, block: int = BLOCK) -> float:
    """Share of the weight's blocks that are an affine `bits`-bit grid (exactly representable)."""
    blocks = nbits.blocks_of(weight, block)
    on, *_ = nbits.affine_grid(blocks, 1 << bits)
    return float(on.mean()) if on.size else 0.0


def exact_share(weight: np.ndarray) -> float:
    """Share of the weight's blocks the plan can store exactly at 4 bits (the offset form needs whole
    blocks, so an input size that is not a multiple of BLOCK counts as no grid)."""
    return grid_share(weight) if weight.shape[0] % BLOCK == 0 else 0.0


def off_grid(weight: np.ndarray) -> bool:
    """Whether the plan re-quantizes this weight at 4 bits instead of transcoding it."""
    return exact_share(weight) < GRID_SHARE


def levels_of(plan: str) -> tuple[str, ...]:
    """The fallback levels the gate walks for an int4 plan."""
    return {"fast": FAST_LEVELS, "rtn": RTN_LEVELS}.get(plan, INT4_LEVELS)


def gate_key(precision: str, plan: str) -> str:
    """The entry of parity.THRESHOLDS that gates `precision` under int4 plan `plan`."""
    return "int4-fast" if precision == "int4" and plan in ("fast", "rtn") else precision


def make_plan(weights: dict[str, tuple[str, np.ndarray, bool]], precision: str, level: int = 0,
              off_grid: tuple[str, str] | None = None, calibrated: set[str] | frozenset = frozenset(),
              worst: set[str] | frozenset = frozenset(), plan_name: str = DEFAULT_PLAN) -> dict[str, TensorPlan]:
    """`weights`: MatMul name -> (module path, W [K, N], whether it is the lm_head). Returns MatMul
    name -> TensorPlan. `off_grid` overrides OFF_GRID; MatMuls in `calibrated` have calibration
    statistics, and their off-grid weights are quantized by CALIBRATED (GPTQ-style) unless `off_grid` is given.
    `worst`: module paths that level 1 stores at 8 bits (worst_off_grid of the level-0 record).
    `plan_name`: one of PLANS (int4 only)."""
    if precision == "int4" and plan_name in ("fast", "rtn"):
        return _fast_plan(weights, level, calibrated if plan_name == "fast" else frozenset(), worst, plan_name)
    plan = {}
    for name, (path, weight, head) in weights.items():
        grid_off = off_grid or (CALIBRATED if name in calibrated else OFF_GRID)
        if precision == "int8":
            plan[name] = TensorPlan(8, "none", "rtn", "int8: every weight 8-bit symmetric (Q8_0 exactly)")
            continue
        if head:
            plan[name] = TensorPlan(8, "none", "rtn", "lm_head / tied embedding at 8 bits (Q8_0 stores exactly)")
            continue
        share = exact_share(weight)
        if level >= 3:
            plan[name] = TensorPlan(8, "none", "rtn", f"fallback: {INT4_LEVELS[3]}")
        elif share >= GRID_SHARE:
            plan[name] = TensorPlan(4, "offset", "fit", f"{share:.0%} of blocks on a 4-bit grid: stored exactly")
        elif level >= 2 or (level == 1 and path in worst):
            plan[name] = TensorPlan(8, "none", "rtn", f"no 4-bit grid ({share:.0%} of blocks); fallback: 8 bits"
                                    + (" (among the largest errors at 4 bits)" if level == 1 else ""))
        else:
            kind = grid_off[0] if grid_off[0] != "offset" or weight.shape[0] % BLOCK == 0 else "uint8"
            plan[name] = TensorPlan(4, kind, grid_off[1], f"no 4-bit grid ({share:.0%} of blocks): {grid_off[1]} "
                                    f"with zero point {kind}")
    return plan


def _fast_plan(weights, level, calibrated, worst, plan_name: str = "fast") -> dict[str, TensorPlan]:
    plan = {}
    for name, (path, weight, head) in weights.items():
        method = "gptq" if name in calibrated else ("rtn" if plan_name == "rtn" else "fit")
        if level >= 3 or (head and level >= 2) or (not head and level >= 1 and path in worst):
            plan[name] = TensorPlan(8, "none", "rtn", f"fallback: {levels_of(plan_name)[level]}")
        elif head:
            plan[name] = TensorPlan(4, "none", method, f"lm_head 4-bit symmetric ({method}), shared with the embedding")
        else:
            plan[name] = TensorPlan(4, "uint8", method, f"4-bit, integer zero points ({method})")
    return plan


def quantize_entry(weight: np.ndarray, entry: TensorPlan, gram: np.ndarray | None = None,
                   importance: np.ndarray | None = None) -> nbits.Quantized:
    """W [K, N] stored as its plan entry says: GPTQ-style with its input Gram `gram` (method "gptq"), else by
    nbits.quantize (`importance`: the mean square of each input). The export and its PyTorch simulation both
    call this, so they store the same weights."""
    if entry.method == "gptq":
        return nbits.quantize_gptq(weight, entry.bits, gram, block=entry.block, symmetric=entry.kind == "none")
    return nbits.quantize(weight, entry.bits, entry.kind, block=entry.block, method=entry.method,
                          importance=importance)


def summarize(plan: dict[str, TensorPlan], paths: dict[str, str], records: dict[str, dict]) -> dict:
    """Manifest record: per tensor (by module path) its plan and what quantizing it measured."""
    tensors = {}
    for name, entry in plan.items():
        record = records.get(name, {})
        tensors[paths.get(name, name)] = {
            **entry.to_dict(),
            "exact_blocks": f"{record.get('exact_blocks', 0)}/{record.get('blocks', 0)}",
            "rel_rms_error": round(record.get("rel_rms_error", 0.0), 6),
            **({"output_error": round(record["output_error"], 6)} if "output_error" in record else {}),
        }
    counts: dict[str, int] = {}
    for entry in plan.values():
        key = f"{entry.bits}-bit {entry.kind}"
        counts[key] = counts.get(key, 0) + 1
    exact = sum(r.get("exact_blocks", 0) for r in records.values())
    total = sum(r.get("blocks", 0) for r in records.values())
    return {"tensors": tensors, "counts": counts, "exact_blocks": exact, "blocks": total,
            "exact_share": round(exact / total, 4) if total else 0.0}
