"""`build --max-memory`: estimates from a model's shapes alone, before anything loads."""

from transformers import LlamaConfig

from cusprun_edge.model.lazy import model_shape
from cusprun_edge.pipeline.config import BuildConfig
from cusprun_edge.pipeline.memory_plan import estimate

# Llama-3.1-8B's published shapes (a config alone: no weights are needed to estimate)
EIGHT_B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)


def test_shapes_come_from_the_config_alone(tmp_path):
    LlamaConfig(**EIGHT_B).save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path))
    assert abs(shape["params"] - 8.03e9) < 0.01e9  # Llama-3.1-8B's published count
    assert shape["embedding"] == shape["head"] == 128256 * 4096 and shape["layers"] == 32 and shape["ffn"] == 14336


def test_one_layer_at_a_time_needs_less_than_the_float32_model(tmp_path):
    LlamaConfig(**EIGHT_B).save_pretrained(tmp_path)
    shape = model_shape(str(tmp_path))
    cfg = BuildConfig(model=str(tmp_path), ratio=0.25)
    layerwise, whole = estimate(cfg, shape, True), estimate(cfg, shape, False)
    fp32 = 4 * shape["params"]
    assert layerwise["score"] < layerwise["prune"] < fp32 < whole["prune"]
    assert whole["prune"] > fp32  # the whole float32 model, at least
    assert layerwise["validate"] == whole["validate"] > fp32  # validate still holds the whole model
    assert layerwise["export"] < fp32 < whole["prune"]  # an 8B model's export, one layer at a time
    assert estimate(cfg, shape, True, layerwise_export=False)["export"] > fp32
    # a larger ratio keeps fewer FFN channels: smaller refit statistics
    assert estimate(BuildConfig(model=str(tmp_path), ratio=0.5), shape, True)["prune"] < layerwise["prune"]
