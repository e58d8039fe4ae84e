"""Config: native form, the seeds' form as is, globs, and errors that name what is wrong."""

import pytest
import torch
import yaml

import deployq
from deployq.qat.config import ConfigError, from_dict, load_config
from deployq.examples import zoo
from deployq.qat.prepare import quant_points

# The seeds' config as the lab notes use it (shared/seeds/001_*.txt), trimmed to the quant part.
SEEDS_YAML = """
quant : True
quant_teacher : True
batch_size : 6
load_model : ./onnx/SID_weights_690000.pth
extra_quantizer_dict:
   special_layer:
      input_layer : 10
      Conv1:
         weight : 10 per_channel_affine
         activation : 10 per_tensor_affine
      lrelu:
         weight : 10 per_channel_affine
         activation : 10 per_tensor_affine
      lrelu_dup3:
         activation : 10 per_tensor_affine
output_layer_list : ['lrelu_dup3']
distill_config : ['lrelu_dup3']
distill_coeff : [0.7]
"""


def prepared(factory=zoo.reused, config=None, shape=(1, 3, 16, 16)):
    return deployq.prepare(factory(), torch.randn(*shape), config)


def test_seeds_format_is_read_as_is():
    config = from_dict(yaml.safe_load(SEEDS_YAML))
    points = quant_points(prepared(config=config))
    assert points["x"].spec.bits == 10  # input_layer
    assert points["Conv1.weight"].spec.bits == 10 and points["Conv1.weight"].spec.scheme == "per_channel_affine"
    assert points["Conv1"].spec.bits == 10 and points["Conv1"].spec.scheme == "per_tensor_affine"
    assert points["lrelu"].spec.bits == 10 and points["lrelu_dup3"].spec.bits == 10
    assert points["lrelu_dup1"].spec.bits == 8 and points["Conv2.weight"].spec.bits == 8
    assert not points["Conv1"].spec.signed and points["Conv1"].spec.qmax == 1023


def test_native_form_globs_later_rules_win(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump({
        "weight": {"quantizer": "lsq"},
        "activation": {"observer": "percentile", "observer_args": {"lower": 1, "upper": 99}},
        "layers": {"lrelu*": {"activation": "10"}, "lrelu_dup2": {"activation": {"bits": 12}},
                   "out": {"quantize": False}},
    }))
    points = quant_points(prepared(config=load_config(path)))
    assert points["lrelu"].spec.bits == 10 and points["lrelu_dup2"].spec.bits == 12
    assert points["Conv1.weight"].spec.quantizer == "lsq"
    assert points["Conv1"].spec.observer == "percentile"
    assert "out" not in points and "out.weight" not in points


def test_activation_override_by_a_fused_member_reaches_the_group_output():
    # resnet's stem is Conv+BN+ReLU fused: naming the conv sets the group's output
    points = quant_points(prepared(zoo.resnet, {"layers": {"stem.0": {"activation": 12}}}))
    assert points["stem.2"].spec.bits == 12 and points["stem.0.weight"].spec.bits == 8


def test_unknown_layer_lists_nearest_names():
    with pytest.raises(ConfigError, match=r"'lrelu_dup7'.*Nearest names: .*lrelu_dup"):
        prepared(config={"layers": {"lrelu_dup7": {"activation": 10}}})


@pytest.mark.parametrize("bits", [1, 17, 32])
def test_bits_outside_2_to_16_are_rejected(bits):
    with pytest.raises(ConfigError, match="from 2 to 16"):
        from_dict({"layers": {"Conv1": {"weight": {"bits": bits}}}})


@pytest.mark.parametrize("bits", [2, 9, 16])
def test_bits_2_to_16_are_accepted(bits):
    assert quant_points(prepared(config={"layers": {"Conv1": {"weight": bits}}}))["Conv1.weight"].spec.bits == bits


@pytest.mark.parametrize("bad,match", [
    ({"weight": {"quantizer": "lsqq"}}, "unknown quantizer 'lsqq'.*Did you mean 'lsq'"),
    ({"activation": {"scheme": "per_row"}}, "unknown scheme"),
    ({"layers": {"Conv1": {"weigth": 8}}}, "unknown keys.*weigth"),
    ({"fuse_activations": ["gelu"]}, "fuse_activations"),
    ({"activation": "ten bits"}, "expected '<bits> \\[scheme\\]'"),
    ({"wieght": {}}, "unknown keys"),
    ({"quantize_float_ops": "yes"}, "quantize_float_ops must be true or false"),
])
def test_bad_configs_say_what_is_wrong(bad, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(bad)


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("weight: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_round_trips_through_dict():
    config = from_dict({"weight": {"bits": 7, "quantizer": "lsq+"}, "input": 10,
                        "layers": {"a*": {"activation": "10 per_tensor_affine"}, "b": {"quantize": False}},
                        "quantize_float_ops": True})
    assert from_dict(config.to_dict()) == config and config.quantize_float_ops


def test_the_default_weight_observer_follows_the_width_and_a_named_one_stays():
    """``observer: auto`` is min/max at 8 bits and the MSE search at 4, globally or in a layer rule;
    a config naming min/max keeps it at 4 bits; arguments need a named observer."""
    names = ["Conv1"]
    assert from_dict(None).spec_for("weight", names).observer_name == "minmax"
    assert from_dict({"weight": {"bits": 4}}).spec_for("weight", names).observer_name == "mse"
    assert from_dict({"layers": {"Conv*": {"weight": 4}}}).spec_for("weight", names).observer_name == "mse"
    named = from_dict({"weight": {"bits": 4, "observer": "minmax"}, "layers": {"Conv*": {"weight": 3}}})
    assert named.spec_for("weight", names).observer_name == "minmax"
    assert from_dict(named.to_dict()) == named
    with pytest.raises(ConfigError, match="weight: observer_args need a named observer"):
        from_dict({"weight": {"bits": 4, "observer_args": {"steps": 10}}})
