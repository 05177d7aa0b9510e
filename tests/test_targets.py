"""Target profiles load from data files; a broken or unknown profile is a one-line UserError."""

import re
from pathlib import Path

import pytest

from cusprun_edge.config.targets import PRECISIONS, TargetProfile, builtin_dirs, list_targets, resolve_target
from cusprun_edge.errors import UserError

BUILTIN = ["arm64-cpu", "cuda-gpu", "jetson-agx-orin", "jetson-orin-nano", "x86-cpu"]


def test_every_builtin_profile_loads():
    profiles = list_targets()
    assert [p.name for p in profiles] == BUILTIN
    for profile in profiles:
        assert profile.description and profile.providers
        assert profile.precision in profile.precisions and set(profile.precisions) <= set(PRECISIONS)
        assert profile.memory_budget_mb > 0 and profile.max_sequence_length > 0
        assert resolve_target(profile.name) == profile
        assert profile.to_dict()["providers"][0]["name"] == profile.providers[0].name


def test_builtin_profiles_are_found_beside_the_package():
    assert any((d / "x86-cpu.toml").is_file() for d in builtin_dirs())


def test_device_specifics():
    nano = resolve_target("jetson-orin-nano")
    assert [p.name for p in nano.providers] == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert nano.providers[0].options["trt_fp16_enable"] is True
    assert (nano.precision, nano.opset, nano.memory_budget_mb) == ("fp16", 17, 5000)
    cpu = resolve_target("x86-cpu")
    assert cpu.precision == "int4" and {"int8", "fp32"} <= set(cpu.precisions)
    assert [p.name for p in cpu.providers] == ["CPUExecutionProvider"]
    assert resolve_target("arm64-cpu").precision == "int4"
    assert resolve_target("cuda-gpu").precision == "fp16"


def test_alias_jetson():
    assert resolve_target("jetson").name == "jetson-orin-nano"


def test_profile_object_passes_through():
    profile = resolve_target("x86-cpu")
    assert resolve_target(profile) is profile


def _write(tmp_path, text, name="mine.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _builtin_text(name="x86-cpu") -> str:
    return Path(resolve_target(name).path).read_text()


def test_user_profile_path(tmp_path):
    text = _builtin_text().replace('name = "x86-cpu"', 'name = "my-box"').replace("memory_budget_mb = 8000",
                                                                                 "memory_budget_mb = 1234")
    path = _write(tmp_path, text)
    profile = resolve_target(str(path))
    assert isinstance(profile, TargetProfile)
    assert (profile.name, profile.memory_budget_mb, profile.path) == ("my-box", 1234, str(path))


@pytest.mark.parametrize("field", ["opset", "providers", "precision", "memory_budget_mb", "description"])
def test_missing_field_is_named(tmp_path, field):
    lines = _builtin_text().splitlines()
    if field == "providers":
        lines = lines[: next(i for i, line in enumerate(lines) if line.startswith("[[providers]]"))]
    else:
        lines = [line for line in lines if not line.startswith(f"{field} =")]
    path = _write(tmp_path, "\n".join(lines))
    with pytest.raises(UserError, match=f"field '{field}' is missing") as info:
        resolve_target(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("opset = 18", 'opset = "18"', "opset"),
        ("batch_size = 1", "batch_size = true", "batch_size"),
        ('precisions = ["int4", "int8", "fp32"]', 'precisions = "int4"', "precisions"),
        ('description = "', "description = 3 # ", "description"),
        ('name = "CPUExecutionProvider"', "name = 1", "providers[0].name"),
    ],
)
def test_wrong_type_is_named(tmp_path, old, new, field):
    text = _builtin_text()
    assert old in text
    path = _write(tmp_path, text.replace(old, new, 1))
    pattern = rf"{re.escape(str(path))}: field '{re.escape(field)}'.*must be"
    with pytest.raises(UserError, match=pattern) as info:
        resolve_target(str(path))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('precision = "int4"', 'precision = "int3"', "field 'precision' is 'int3'"),
        ("opset = 18", "opset = 18\nopsett = 17", "field 'opsett' is not a profile field"),
        ('name = "CPUExecutionProvider"', 'name = "GPU"', "field 'providers[0].name' is 'GPU'"),
        ('graph_optimization_level = "all"', 'graph_optimization_level = "max"', "graph_optimization_level"),
        ("accuracy_level = 4", "accuracy_level = 5", "field 'accuracy_level' is 5"),
    ],
)
def test_bad_values_are_named(tmp_path, old, new, message):
    path = _write(tmp_path, _builtin_text().replace(old, new, 1))
    with pytest.raises(UserError, match=re.escape(message)):
        resolve_target(path)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(UserError, match="not valid TOML"):
        resolve_target(_write(tmp_path, "name = \n"))
    with pytest.raises(UserError, match="does not exist"):
        resolve_target(tmp_path / "nope.toml")


def test_unknown_target_lists_the_names():
    with pytest.raises(UserError) as info:
        resolve_target("raspberry-pi-zero")
    message = str(info.value)
    assert "unknown target 'raspberry-pi-zero'" in message
    for name in BUILTIN:
        assert name in message


def test_accuracy_level_is_recorded_per_target():
    """int4/int8 MatMulNBits accuracy_level, chosen by measurement (see the comments in cusprun_edge/data/targets/*.toml)."""
    for profile in list_targets():
        assert profile.accuracy_level == 4, profile.name
        assert profile.to_dict()["accuracy_level"] == 4


def test_a_profile_can_ship_gguf_too(tmp_path):
    """`formats` in a profile adds artifacts to every build for that target; ONNX stays, unknown ones are named."""
    from cusprun_edge.pipeline.build import stages_for
    from cusprun_edge.pipeline.check import build_formats
    from cusprun_edge.pipeline.config import BuildConfig

    assert resolve_target("x86-cpu").formats == ("onnx",)
    path = _write(tmp_path, _builtin_text().replace('name = "x86-cpu"', 'name = "llama-box"\nformats = ["onnx", "gguf"]'))
    cfg = BuildConfig(target=str(path))
    assert build_formats(cfg) == ("onnx", "gguf") and build_formats(BuildConfig()) == ("onnx",)
    assert [s.name for s in stages_for(cfg)][-2:] == ["gguf", "report"]
    for bad, words in (('["gguf"]', "must include onnx"), ('["onnx", "tflite"]', "is 'tflite'; choose one of")):
        path = _write(tmp_path, _builtin_text().replace('name = "x86-cpu"', f'name = "x"\nformats = {bad}'))
        with pytest.raises(UserError, match=words):
            resolve_target(str(path))
