"""deployq train: the recipe, the QAT + distillation loop, checkpoints, resume, and early errors."""

import json
import sys
import types

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn

import deployq
from deployq.qat import checkpoint as ck
from deployq.qat import loading
from deployq.cli.train import train as train_command
from deployq.examples import zoo
from deployq.train.loop import RecipeError, load_recipe, train


@pytest.fixture
def workdir(tmp_path, rng):
    """float.pth (seed 1, so it differs from what the factory builds) and train / val .npz data."""
    float_model = zoo.unet(width=4, seed=1)
    torch.save(float_model.state_dict(), tmp_path / "float.pth")
    x = rng.random((16, 3, 16, 16), dtype=np.float32)
    with torch.no_grad():
        y = float_model(torch.from_numpy(x)).numpy()  # the float model is exact: QAT recovers it
    np.savez(tmp_path / "train.npz", input=x, target=y)
    np.savez(tmp_path / "val.npz", input=x[:4], target=y[:4])
    return tmp_path


def recipe(**changes):
    doc = {
        "model": {"factory": "deployq.examples.zoo:unet", "kwargs": {"width": 4}, "weights": "float.pth"},
        "data": {"kind": "npz", "train": "train.npz", "val": "val.npz"},
        "loss": "l1",
        "distill": {"layers": {"enc2.2": 0.5, "dec.1": 0.5}},
        "epochs": 2,
        "batch_size": 4,
        "calibration_batches": 2,
        "lr": "1e-3",  # YAML 1.1 reads 1e-3 as a string: accepted
        "freeze_bn_epoch": 1,
        "output_dir": "run",
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def write(workdir, doc, name="recipe.yaml"):
    path = workdir / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_training_writes_loadable_checkpoints_and_per_epoch_metrics(workdir):
    lines = []
    result = train(write(workdir, recipe()), progress=False, log=lines.append)
    run = workdir / "run"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "metrics.csv", "metrics.json", "state.pt"]
    x = torch.rand(2, 3, 16, 16)
    last = loading.build(ck.load(run / "last.pt"))
    assert torch.equal(last(x), result.model.eval()(x))
    best = ck.load(run / "best.pt")
    assert best.meta["epoch"] == result.best_epoch and best.factory == "deployq.examples.zoo:unet"
    assert loading.build(best).training is False
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,loss,task_loss,distill_loss,distill/enc2.2,distill/dec.1,val_loss,psnr,best")
    assert len(rows) == 3
    summary = json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in summary["epochs"]] == [1, 2] and summary["metric"] == "psnr"
    assert summary["best"]["value"] == max(e["psnr"] for e in summary["epochs"])
    assert result.history[-1]["distill_loss"] < result.history[0]["distill_loss"]
    assert any(line.startswith("calibrated on 2 batches") for line in lines)
    assert sum(line.startswith("epoch ") for line in lines) == 2


def test_checkpoints_record_the_deployment_input_shape(workdir):
    assert_fails_before_training(workdir, recipe(input_shape=[1, -3]), "input_shape must be a list of positive integers")
    train(write(workdir, recipe(epochs=1, input_shape=[1, 3, 32, 32])), progress=False)
    assert ck.load(workdir / "run" / "last.pt").inputs[0].shape == (1, 3, 32, 32)


def test_qat_starts_from_the_float_weights_not_the_factory_init(workdir):
    result = train(write(workdir, recipe(epochs=1, optimizer="sgd", lr=1e-12, distill=None)), progress=False)
    float_weights = torch.load(workdir / "float.pth", weights_only=True)
    trained = result.model.get_submodule("enc1.0").layer.weight
    torch.testing.assert_close(trained, float_weights["enc1.0.weight"])
    assert not torch.allclose(trained, zoo.unet(width=4).enc1[0].weight)


def test_resume_restores_optimizer_epoch_and_best(workdir):
    path = write(workdir, recipe(epochs=1))
    first = train(path, progress=False)
    state = torch.load(workdir / "run" / "state.pt", weights_only=True)
    steps = int(next(iter(state["optimizer"]["state"].values()))["step"])
    assert state["epoch"] == 1 and steps == 4  # 16 samples / batch 4
    with pytest.raises(RecipeError, match="already holds a run.*--resume"):
        train(path, progress=False)
    with pytest.raises(RecipeError, match="already has 1 epochs.*--epochs N with N > 1"):
        train(path, resume=True, progress=False)
    lines = []
    second = train(path, resume=True, epochs=2, progress=False, log=lines.append)
    assert [r["epoch"] for r in second.history] == [1, 2]
    assert second.history[0] == first.history[0]
    state = torch.load(workdir / "run" / "state.pt", weights_only=True)
    assert int(next(iter(state["optimizer"]["state"].values()))["step"]) == 8
    assert lines[0].startswith("resuming") and not any(line.startswith("calibrated") for line in lines)
    with pytest.raises(RecipeError, match="nothing to resume"):
        train(write(workdir, recipe(output_dir="other")), resume=True, progress=False)


def assert_fails_before_training(workdir, doc, match):
    with pytest.raises(RecipeError, match=match):
        train(write(workdir, doc), progress=False)
    assert not (workdir / "run").exists()


def test_missing_required_keys_are_named(workdir):
    assert_fails_before_training(workdir, recipe(loss=None), "missing required key 'loss'")
    no_weights = recipe(model={"factory": "deployq.examples.zoo:unet"})
    assert_fails_before_training(workdir, no_weights, r"missing required key 'model.weights'.*load_model")
    assert_fails_before_training(workdir, recipe(data={"kind": "npz", "train": "train.npz"}),
                                 "missing required key 'data.val'")
    assert_fails_before_training(workdir, recipe(epoch=3), r"unknown keys 'epoch' \(did you mean 'epochs'\?\)")
    assert_fails_before_training(workdir, recipe(lr="fast"), "lr must be a number > 0, got 'fast'")


def test_unknown_distillation_layer_fails_before_training(workdir):
    doc = recipe(distill={"layers": {"enc2.2": 0.5, "dec.2": 0.5}})
    assert_fails_before_training(workdir, doc, r"recipe.yaml: distillation layer 'dec.2' is not in the model.*Nearest names: dec.1")


def test_data_that_does_not_fit_the_model_fails_before_training(workdir, rng):
    np.savez(workdir / "wrong.npz", input=rng.random((4, 5, 16, 16), dtype=np.float32),
             target=rng.random((4, 3, 16, 16), dtype=np.float32))
    doc = recipe(data={"kind": "npz", "train": "wrong.npz", "val": "val.npz"})
    assert_fails_before_training(workdir, doc, r"data.train: the model deployq.examples.zoo:unet cannot take the "
                                               r"data's input \(item 0: torch.float32 \(5, 16, 16\)")
    np.savez(workdir / "small.npz", input=rng.random((4, 3, 16, 16), dtype=np.float32),
             target=rng.random((4, 3, 8, 8), dtype=np.float32))
    doc = recipe(data={"kind": "npz", "train": "train.npz", "val": "small.npz"})
    assert_fails_before_training(workdir, doc, r"data.val: the data does not fit the model's output.*\(1, 3, 8, 8\)")
    np.savez(workdir / "no_target.npz", input=rng.random((4, 3, 16, 16), dtype=np.float32))
    doc = recipe(data={"kind": "npz", "train": "no_target.npz", "val": "val.npz"})
    assert_fails_before_training(workdir, doc, r"no_target.npz has no array \['target'\]")


def test_seeds_keys_with_mismatched_lengths_fail_before_training(workdir):
    doc = recipe(distill=None, distill_config=["enc2.2", "dec.1"], distill_coeff=[0.7])
    assert_fails_before_training(workdir, doc, "distill_coeff has 1 values but distill_config names 2 layers")


def test_a_quantized_checkpoint_is_refused_as_float_weights(workdir):
    qmodel = deployq.prepare(zoo.unet(width=4), torch.randn(1, 3, 16, 16))
    deployq.calibrate(qmodel, [torch.rand(2, 3, 16, 16)], progress=False)
    ck.save(workdir / "qat.pt", qmodel, factory="deployq.examples.zoo:unet", inputs=[ck.InputSpec("x", (1, 3, 16, 16))])
    doc = recipe(model={"factory": "deployq.examples.zoo:unet", "kwargs": {"width": 4}, "weights": "qat.pt"})
    assert_fails_before_training(workdir, doc, "is a deployq checkpoint.*--resume")


SEEDS_QUANT = """
extra_quantizer_dict:
  special_layer:
    input_layer: 10
    enc1.0: {weight: 10 per_channel_affine, activation: 10 per_tensor_affine}
    out: {activation: 10 per_tensor_affine}
"""


def test_the_seeds_keys_run_with_a_quantized_teacher(workdir):
    (workdir / "aba_config.yaml").write_text(SEEDS_QUANT)
    doc = recipe(model={"factory": "deployq.examples.zoo:unet", "kwargs": {"width": 4}}, distill=None, epochs=1,
                 load_model="float.pth", load_teacher_model="float.pth", config_file_path="aba_config.yaml",
                 quant=True, gpu_id=3, output_layer_list=["enc2.2"], distill_config=["enc2.2"],
                 distill_coeff=[0.7], quant_teacher=True)
    parsed = load_recipe(write(workdir, doc))
    assert parsed.distill.weights == {"enc2.2": 0.7} and parsed.distill.quant_teacher
    assert "seeds key 'gpu_id' ignored" in " ".join(parsed.notes)
    result = train(parsed, progress=False)
    qparams = deployq.qparams_of(result.model)
    assert qparams["x"].bits == 10 and qparams["out"].bits == 10 and qparams["enc2.2"].bits == 8
    state = torch.load(workdir / "run" / "state.pt", weights_only=True)
    assert state["teacher_qparams"]["format"] == "deployq-qparams"


class RgbMono(nn.Module):
    """A low-light-shaped model: packed 4-channel input, (rgb, mono) outputs at twice the size."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(4, 16, 3, padding=1)
        self.act = nn.LeakyReLU(0.2)
        self.rgb = nn.Conv2d(4, 3, 3, padding=1)
        self.mono = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        y = nn.functional.pixel_shuffle(self.act(self.body(x)), 2)
        return self.rgb(y), self.mono(y)


def rgb_mono():
    return RgbMono().eval()


class FakeSyntheticLowLight(torch.utils.data.Dataset):
    made = []

    def __init__(self, size, length, split, ratios=(100,), seed=0):
        self.made.append({"size": size, "length": length, "split": split, "ratios": ratios, "seed": seed})
        self.size, self.length = size, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        s = self.size
        return {"input": torch.rand(4, s // 2, s // 2, generator=g), "mono": torch.rand(1, s, s, generator=g),
                "target": torch.rand(3, s, s, generator=g), "ratio": torch.tensor(100.0)}


def test_data_and_loss_named_by_the_recipe_as_package_module_function(tmp_path, monkeypatch):
    """The example's recipes name their dataset and loss as pkg.mod:function; the split's options
    and the shared ones reach the function, with the split's name."""
    fake = types.ModuleType("fake_lowlight_data")
    fake.SyntheticLowLight = FakeSyntheticLowLight
    monkeypatch.setitem(sys.modules, "fake_lowlight_data", fake)
    monkeypatch.setitem(sys.modules, "lowlight_factories", types.SimpleNamespace(rgb_mono=rgb_mono))
    torch.save(rgb_mono().state_dict(), tmp_path / "float.pth")
    doc = {"model": {"factory": "lowlight_factories:rgb_mono", "weights": "float.pth"},
           "data": {"kind": "fake_lowlight_data:SyntheticLowLight", "size": 16, "ratios": [100, 300], "seed": 7,
                    "train": {"length": 8}, "val": 4},
           "loss": "deployq.examples.lowlight.loss:lowlight_loss", "epochs": 1, "batch_size": 4, "calibration_batches": 2, "output_dir": "run",
           "distill": {"layers": {"act": 1.0}}}
    result = train(write(tmp_path, doc), progress=False)
    assert FakeSyntheticLowLight.made[-2:] == [
        {"size": 16, "length": 8, "split": "train", "ratios": [100, 300], "seed": 7},
        {"size": 16, "length": 4, "split": "val", "ratios": [100, 300], "seed": 7}]
    assert 5 < result.history[0]["psnr"] < 60 and result.history[0]["task_loss"] > 0


def test_metrics_match_hand_computations():
    """PSNR = 10·log10(1 / MSE) per image (prediction clamped to [0, 1]), summed with the count;
    accuracy counts arg-max hits."""
    from deployq.train.metrics import METRICS

    pred = torch.tensor([[0.5, 0.5], [1.5, 0.0]])  # image 2: 1.5 clamps to 1
    target = torch.tensor([[0.6, 0.4], [0.9, 0.0]])
    total, n = METRICS.get("psnr").fn(pred, {"target": target})
    assert n == 2 and total == pytest.approx(10 * np.log10(1 / 0.01) + 10 * np.log10(1 / 0.005), rel=1e-5)
    logits = torch.tensor([[0.1, 2.0, 0.3], [3.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    hits, n = METRICS.get("accuracy").fn(logits, {"target": torch.tensor([1, 2, 2])})
    assert (hits, n) == (2.0, 3)


def test_tensors_data_and_a_callable_loss_from_python(tmp_path):
    torch.save(zoo.plain_cnn().state_dict(), tmp_path / "cnn.pth")
    x, labels = torch.rand(8, 3, 16, 16), torch.randint(0, 10, (8,))
    doc = {"model": {"factory": "deployq.examples.zoo:plain_cnn", "weights": str(tmp_path / "cnn.pth")},
           "data": {"kind": "tensors", "train": (x, labels), "val": {"input": x, "target": labels}},
           "loss": "cross_entropy", "epochs": 1, "batch_size": 4, "calibration_batches": 1,
           "output_dir": str(tmp_path / "run")}
    result = train(doc, progress=False)
    assert load_recipe(doc).metric == "accuracy" and result.history[0]["accuracy"] in {i / 8 for i in range(9)}
    # a callable loss is the one trained with: a constant 7 (kept in the graph) is what the log shows
    custom = dict(doc, metric="accuracy", loss=lambda output, batch: output.sum() * 0 + 7.0,
                  output_dir=str(tmp_path / "seven"))
    assert train(custom, progress=False).history[0]["task_loss"] == pytest.approx(7.0)


def test_cli_train_and_resume(workdir):
    path = write(workdir, recipe(epochs=1))
    result = CliRunner().invoke(train_command, ["--recipe", str(path)])
    assert result.exit_code == 0, result.output
    assert "epoch 1/1" in result.output and "best:" in result.output
    result = CliRunner().invoke(train_command, ["--recipe", str(path), "--resume", "--epochs", "2"])
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.output
    result = CliRunner().invoke(train_command, ["--recipe", str(path)])
    assert result.exit_code == 1 and "already holds a run" in result.output


def test_cli_seed_and_out_run_one_recipe_twice_side_by_side(workdir):
    """--seed changes the data order (so the weights), --out keeps each run in its own folder and
    leaves the recipe's output_dir alone."""
    path = write(workdir, recipe(epochs=1))
    for seed in (1, 2):
        result = CliRunner().invoke(train_command, ["--recipe", str(path), "--seed", str(seed),
                                                    "--out", str(workdir / f"seed{seed}")])
        assert result.exit_code == 0, result.output
    one, two = (loading.build(ck.load(workdir / f"seed{s}" / "last.pt")) for s in (1, 2))
    assert any(not torch.equal(a, b) for a, b in zip(one.state_dict().values(), two.state_dict().values()))
    assert not (workdir / "run").exists()
