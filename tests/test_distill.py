"""Feature distillation: graph-output exposure, settings (native and seeds' form), losses."""

import pytest
import torch
import yaml
from torch import nn

import deployq
from deployq.train import distill as dst
from deployq.train import losses
from deployq.examples import zoo

SHAPE = (1, 3, 16, 16)


def calibrated_unet(config=None, width=4):
    qmodel = deployq.prepare(zoo.unet(width=width), torch.randn(*SHAPE), config)
    deployq.calibrate(qmodel, [torch.rand(4, 3, 16, 16) for _ in range(2)], progress=False)
    return qmodel.eval()


def test_expose_returns_the_output_and_the_quant_point_activations():
    qmodel = calibrated_unet()
    captured = {}
    for name in ("enc1.2", "cat"):  # the reference: what the act_quant modules return
        qmodel.get_submodule(f"act_quant.{name}").register_forward_hook(
            lambda m, i, o, name=name: captured.__setitem__(name, o))
    exposed = dst.expose(qmodel, ["enc1.2", "cat"])
    x = torch.rand(2, 3, 16, 16)
    output, features = exposed(x)
    assert torch.equal(output, qmodel(x))
    assert list(features) == ["enc1.2", "cat"]
    assert all(torch.equal(features[n], captured[n]) for n in features)
    assert not exposed._forward_hooks and not qmodel._forward_hooks  # the graph output, not hooks


def test_exposed_model_shares_weights_and_quantizers_with_the_original():
    qmodel = calibrated_unet()
    exposed = dst.expose(qmodel, ["dec.1"])
    ours, theirs = exposed.state_dict(), qmodel.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].data_ptr() == theirs[k].data_ptr() for k in ours)
    assert deployq.quant_points(exposed) is deployq.quant_points(qmodel)
    assert exposed.get_submodule("act_quant.dec.1") is qmodel.get_submodule("act_quant.dec.1")


def test_fused_member_names_resolve_to_the_group_output():
    qmodel = calibrated_unet()
    _, features = dst.expose(qmodel, ["enc1.0", "enc1.2"])(torch.rand(1, 3, 16, 16))
    assert torch.equal(features["enc1.0"], features["enc1.2"])  # Conv+BN+ReLU fused: one quant point


def test_float_traced_models_use_module_paths_and_node_names():
    traced = torch.fx.symbolic_trace(zoo.reused())
    x = torch.rand(1, 3, 16, 16)
    output, features = dst.expose(traced, ["Conv2", "lrelu_1"])(x)
    assert torch.equal(output, traced(x))
    assert torch.equal(features["lrelu_1"], torch.nn.functional.leaky_relu(features["Conv2"], 0.2))
    with pytest.raises(dst.LayerNotFoundError, match=r"'lrelu' is called at 4 places.*lrelu_1"):
        dst.expose(traced, ["lrelu"])


def test_unknown_layer_is_an_error_listing_the_nearest_names():
    qmodel = calibrated_unet()
    with pytest.raises(dst.LayerNotFoundError, match=r"'enc1\.3' is not in the model.*Nearest names: enc1\.2"):
        dst.expose(qmodel, ["enc1.2", "enc1.3"])
    with pytest.raises(dst.LayerNotFoundError, match=r"weight quant point.*output of that layer is 'enc1\.2'"):
        dst.expose(qmodel, ["enc1.0.weight"])


SEEDS = {
    "output_layer_list": ["enc1.2", "dec.1"],
    "distill_config": ["enc1.2", "dec.1"],
    "distill_coeff": [0.7, 0.3],
    "quant_teacher": True,
    "load_teacher_model": "float.pth",
}


def test_seeds_keys_and_native_form_give_the_same_settings():
    native = {"distill": {"layers": {"enc1.2": 0.7, "dec.1": 0.3}, "quant_teacher": True,
                          "teacher_weights": "float.pth"}}
    assert dst.from_dict(SEEDS) == dst.from_dict(native)
    config = dst.from_dict(SEEDS)
    assert config.weights == {"enc1.2": 0.7, "dec.1": 0.3} and config.quant_teacher
    assert dst.from_dict({"epochs": 3}) is None  # no distillation asked for


def test_seeds_coefficients_must_match_the_layers():
    with pytest.raises(dst.DistillError, match="distill_coeff has 1 values but distill_config names 2 layers"):
        dst.from_dict({**SEEDS, "distill_coeff": [0.7]})
    with pytest.raises(dst.DistillError, match="output_layer_list and distill_config name different layers"):
        dst.from_dict({**SEEDS, "output_layer_list": ["enc1.2"]})
    with pytest.raises(dst.DistillError, match="weight of 'dec.1' must be a number > 0"):
        dst.from_dict({**SEEDS, "distill_coeff": [0.7, -1]})
    with pytest.raises(dst.DistillError, match="use one form"):
        dst.from_dict({**SEEDS, "distill": {"layers": {"x": 1}}})
    assert dst.from_dict({"distill_config": ["a", "b"], "distill_coeff": 0.5}).weights == {"a": 0.5, "b": 0.5}


def test_native_settings_are_checked_and_round_trip_through_yaml(tmp_path):
    with pytest.raises(dst.DistillError, match=r"unknown keys \['coeff'\]"):
        dst.from_dict({"distill": {"layers": {"a": 1}, "coeff": 2}})
    with pytest.raises(dst.DistillError, match="quant_teacher must be true or false"):
        dst.from_dict({"distill": {"layers": {"a": 1}, "quant_teacher": "yes"}})
    config = dst.DistillConfig((("enc1.2", 0.25), ("cat", 0.75)), quant_teacher=True)
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    assert dst.load(path) == config


def test_distillation_loss_is_exactly_zero_when_student_equals_teacher():
    student = calibrated_unet()
    teacher = dst.Teacher(deployq.prepare(zoo.unet(width=4), torch.randn(*SHAPE)), ["enc1.2", "cat", "out"])
    loss = dst.DistillationLoss({"enc1.2": 0.5, "cat": 0.3, "out": 0.2})
    x = torch.rand(2, 3, 16, 16)
    deployq.set_mode(student, "float")  # the student now computes the float model exactly
    _, features = dst.expose(student, ["enc1.2", "cat", "out"])(x)
    _, reference = teacher(x)
    assert loss(features, reference).item() == 0.0
    deployq.set_mode(student, "quantize")
    _, features = dst.expose(student, ["enc1.2", "cat", "out"])(x)
    terms = loss.terms(features, reference)
    assert all(t > 0 for t in terms.values())
    expected = 0.5 * terms["enc1.2"] + 0.3 * terms["cat"] + 0.2 * terms["out"]
    torch.testing.assert_close(loss(features, reference), expected)


def test_distillation_loss_decreases_in_a_short_training_run():
    config = {"weight": {"bits": 4, "quantizer": "lsq"}, "activation": {"bits": 4, "quantizer": "lsq+"}}
    student = calibrated_unet(config)
    deployq.freeze_bn_stats(student)
    layers = {"enc2.2": 0.5, "dec.1": 0.5}
    teacher = dst.Teacher(deployq.prepare(zoo.unet(width=4), torch.randn(*SHAPE)), list(layers))
    net = dst.expose(student, list(layers)).train()
    loss = dst.DistillationLoss(layers)
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    data = [torch.rand(4, 3, 16, 16) for _ in range(4)]
    values = []
    for step in range(24):
        x = data[step % len(data)]
        value = loss(net(x)[1], teacher(x)[1])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(value.item())
    assert sum(values[-4:]) < 0.7 * sum(values[:4])


def test_teacher_is_frozen_and_stays_in_eval_mode():
    teacher_model = deployq.prepare(zoo.plain_cnn(), torch.randn(*SHAPE))
    teacher = dst.Teacher(teacher_model, ["block1.2"])
    teacher_model.train()  # someone switches it back: the teacher still runs in eval mode
    bn = teacher_model.get_submodule("block1.0").bn
    before = bn.running_mean.clone()
    output, features = teacher(torch.rand(4, 3, 16, 16) + 3)
    assert torch.equal(bn.running_mean, before)
    assert not output.requires_grad and not features["block1.2"].requires_grad
    assert not any(p.requires_grad for p in teacher_model.parameters())


class TwoHeads(nn.Module):
    def forward(self, x):
        return x[:, :3], x[:, 3:]


def test_task_losses_check_shapes_and_the_lowlight_loss_uses_both_outputs():
    x = torch.rand(2, 4, 8, 8)
    batch = {"input": x, "target": torch.rand(2, 3, 8, 8), "mono": torch.rand(2, 1, 8, 8)}
    rgb, mono = TwoHeads()(x)
    expected = (rgb - batch["target"]).abs().mean() + (mono - batch["mono"]).abs().mean()
    torch.testing.assert_close(losses.task_loss("deployq.examples.lowlight.loss:lowlight_loss")((rgb, mono), batch), expected)
    torch.testing.assert_close(losses.task_loss("l1")(rgb, batch), (rgb - batch["target"]).abs().mean())
    with pytest.raises(dst.DistillError, match=r"output has shape \(2, 1, 8, 8\) but the target has shape \(2, 3, 8, 8\)"):
        losses.task_loss("mse")(mono, batch)
    with pytest.raises(dst.DistillError, match="integer class targets"):
        losses.task_loss("cross_entropy")(torch.rand(2, 10), {"input": x, "target": torch.rand(2)})
    with pytest.raises(dst.DistillError, match="unknown task loss 'l3'; known: cross_entropy, l1"):
        losses.task_loss("l3")
