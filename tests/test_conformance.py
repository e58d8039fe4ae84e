"""Conformance: every command on the architectures users bring (torchvision), not only on ours
(a representative subset; ``benchmarks/bench_conformance.py`` runs all 16 architectures).

Each model has random weights with BatchNorm statistics taken from photographs
(:mod:`deployq.examples.torchvision_models`), 64x64 inputs, and goes through what a user does:
``inspect``; post-training ``export`` at int8 and int16; ``check`` (on the checkpoints the exports
write) at <= 1 LSB; ``diff`` in all four modes, every quant point paired; ``hessian``
on two layers; and a short QAT run followed by export and check. The tests of one model share
its exports, across pytest-xdist workers too.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from click.testing import CliRunner

import deployq
from deployq.cli import main
from deployq.verify.diff import diff
from deployq.examples import torchvision_models as tvm
from deployq.deploy.export import export
from deployq.qat.loading import forward_arguments, resolve_model
from deployq.verify.check import check_parity
from deployq.core.runtime import inputs_of, load_onnx

SIZE = 64
FACTORY = "deployq.examples.torchvision_models:build"
TWO_INPUTS = "two_inputs"
# a representative subset (residual adds, ReLU6, SiLU with squeeze-excitation, channel shuffle and
# split, a segmentation model with a dict output, two inputs); all 16 torchvision architectures run
# in benchmarks/bench_conformance.py, and transformers in tests/test_timm.py
MODELS = ["resnet18", "mobilenet_v2", "efficientnet_b0", "shufflenet_v2_x0_5", "lraspp_mobilenet_v3_large",
          TWO_INPUTS]


class Model:
    """One conformance model on disk: float weights, data, and its int8 / int16 PTQ exports.

    The files are made once per test run, by whichever worker needs them first (the others wait
    on a lock, then read them)."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, root
        if name == TWO_INPUTS:
            self.factory, self.kwargs = "deployq.examples.torchvision_models:two_inputs", {}
            self.shapes = [f"x:1,3,{SIZE},{SIZE}", f"y:1,1,{SIZE},{SIZE}"]
            self.calib, self.eval = root / "calib.npz", root / "eval.npz"
        else:
            self.factory, self.kwargs = FACTORY, {"name": name, **({"image_size": SIZE} if name.startswith("vit") else {})}
            self.shapes = [f"1,3,{SIZE},{SIZE}"]
            self.calib, self.eval = root / "calib.npy", root / "eval.npy"
        root.mkdir(parents=True, exist_ok=True)
        with open(root.parent / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / "done").exists():
                self._make()
                (root / "done").touch()
        self.float_model = tvm.two_inputs() if name == TWO_INPUTS else tvm.build(**self.kwargs)
        self.float_model.load_state_dict(torch.load(root / "state.pt", weights_only=True))

    def _make(self) -> None:
        root = self.root
        if self.name == TWO_INPUTS:
            model = tvm.two_inputs()
            tvm.warm_batchnorm(model, [self._pair(8, seed=i) for i in range(2)])
            self._save_pairs(self.calib, self._pair(16, seed=10))
            self._save_pairs(self.eval, self._pair(2, seed=20, held_out=True))
        else:
            model = tvm.with_photo_statistics(tvm.build(**self.kwargs), SIZE)
            np.save(self.calib, tvm.photo_crops(16, SIZE, seed=10).numpy())
            np.save(self.eval, tvm.photo_crops(2, SIZE, held_out=True, seed=20).numpy())
        torch.save(model.state_dict(), root / "state.pt")
        for target in ("int8", "int16"):
            self.cli("export", "--ckpt", str(root / "state.pt"), *self.model_args(), *self.shape_args(),
                     "--calib", str(self.calib), "--calib-batches", "16", "--target", target, "--no-ort",
                     "--out", str(root / target))  # no test here reads the ORT-format files

    @staticmethod
    def _pair(count: int, seed: int, held_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x = tvm.photo_crops(count, SIZE, seed=seed, held_out=held_out)
        return x, x.mean(1, keepdim=True)

    @staticmethod
    def _save_pairs(path: Path, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        np.savez(path, x=pair[0].numpy(), y=pair[1].numpy())

    def model_args(self, kwargs: bool = True) -> list[str]:
        args = ["--model", self.factory]
        return args + (["--model-kwargs", json.dumps(self.kwargs)] if kwargs and self.kwargs else [])

    def shape_args(self) -> list[str]:
        return [a for shape in self.shapes for a in ("--input-shape", shape)]

    def cli(self, *args: str, exit_code: int = 0) -> str:
        result = CliRunner().invoke(main, list(args))
        assert result.exit_code == exit_code, f"deployq {' '.join(args[:1])} on {self.name}:\n{result.output}"
        return result.output

    def onnx(self, target: str, kind: str | None = None) -> Path:
        return self.root / target / f"model.{kind or target}.onnx"

    def feeds(self, path: Path) -> list[dict[str, np.ndarray]]:
        from deployq.calib.data import load_feeds

        inputs = inputs_of(load_onnx(self.onnx("int8")))
        return load_feeds(path, [(i.name, i.shape) for i in inputs])

    def qparams(self, target: str) -> dict:
        return {r["name"]: r for r in json.loads((self.root / target / "qparams.json").read_text())["quant_points"]}


_MODELS: dict[str, Model] = {}


def _model(name: str, tmp_path_factory) -> Model:
    if name not in _MODELS:
        shared = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            shared = shared.parent  # the folder every worker's base folder is in
        _MODELS[name] = Model(name, shared / "conformance" / name)
    return _MODELS[name]


@pytest.mark.slow
class Conformance:
    """Every command on one model (a class per model: ``pytest -n 2 --dist loadscope`` runs a
    class in one worker)."""

    name = ""

    @pytest.fixture
    def model(self, tmp_path_factory) -> Model:
        return _model(self.name, tmp_path_factory)

    def test_inspect_lists_the_quant_points_export_uses(self, model):
        points = json.loads(model.cli("inspect", *model.model_args(), *model.shape_args(), "--json", "-"))
        assert [p["name"] for p in points] == list(model.qparams("int8"))


    @pytest.mark.parametrize("target", ["int8", "int16"])
    def test_check_within_one_lsb_at_every_quant_point(self, model, target):
        report = model.root / f"check.{target}.json"
        model.cli("check", "--ckpt", str(model.root / target / f"model.{target}.pt"), *model.model_args(kwargs=False),
                  "--onnx", str(model.onnx(target)), "--input", str(model.eval), "--json", str(report))
        parity = json.loads(report.read_text())
        assert parity["max_lsb"] <= 1
        assert {p["name"] for p in parity["points"]} == set(model.qparams(target))


    def test_int16_local_view_pairs_every_row_with_itself(self, model):
        """At 16 bits every quant point's own error is tiny; a row that compares two different
        tensors (a value before an activation with one after it) is far below 50 dB. Run on
        calibration inputs, so that no value falls outside a calibrated range (clipping error)."""
        report = diff(load_onnx(model.onnx("int16", "float")), load_onnx(model.onnx("int16")), model.feeds(model.calib)[:2],
                      mode="local", progress=False)
        assert not report.unmatched
        names = {r.point.name for r in report.rows if r.point.kind == "activation"}
        assert names == {n for n, r in model.qparams("int16").items() if r["kind"] != "weight"}
        low = [(r.point.name, round(r.stats.sqnr_db, 1)) for r in report.rows if not r.stats.sqnr_db >= 50]
        assert not low, f"rows below 50 dB at 16 bits: {low[:10]}"


    @pytest.mark.parametrize("mode", ["accumulated", "local", "sensitivity", "kernel"])
    def test_diff_runs_in_every_mode_and_pairs_every_point(self, model, mode):
        out = model.root / f"diff.{mode}.json"
        activations = [n for n, r in model.qparams("int8").items() if r["kind"] != "weight"]
        # sensitivity runs the whole model once per quant point: every 8th point (the first, the last) here
        chosen = activations[::8] + activations[-1:] if mode == "sensitivity" else activations
        points = [a for name in chosen for a in ("--points", name)] if mode == "sensitivity" else []
        model.cli("diff", str(model.onnx("int8", "float")), str(model.onnx("int8")), "--input", str(model.eval),
                  "--mode", mode, "--json", str(out), *points)
        report = json.loads(out.read_text())
        assert report["unmatched"] == []
        rows = {r["name"] for r in report["rows"] if r["kind"] == "activation"}
        inputs = {i.name for i in load_onnx(model.onnx("int8")).graph.input}
        # kernel: every point computed by a kernel (the inputs are quantized, not computed)
        assert rows == (set(activations) - inputs if mode == "kernel" else set(chosen))
        # every row a real measurement above a floor (null: exact, an infinite SQNR); an accumulated
        # row carries the error of every layer above it, the other views one point's own
        floor = 0.0 if mode == "accumulated" else 10.0
        low = [(r["name"], r["sqnr_db"]) for r in report["rows"] if r["sqnr_db"] is not None and r["sqnr_db"] < floor]
        assert not low, low


    def test_hessian_on_two_layers_writes_a_distillation_config(self, model):
        layers = [n for n, r in model.qparams("int8").items() if r["kind"] == "activation"][-3:-1]
        out = model.root / "distill.yaml"
        model.cli("hessian", "--ckpt", str(model.root / "state.pt"), *model.model_args(), *model.shape_args(),
                  "--data", str(model.calib), "--batches", "2", "--max-iter", "3", "--top", "2", "--out", str(out),
                  *[a for layer in layers for a in ("--layers", layer)])
        assert set(yaml.safe_load(out.read_text())["distill"]["layers"]) == set(layers)


    def test_short_qat_run_then_export_and_check(self, model):
        """Learned (LSQ) scales, two optimizer steps distilling the float output, then the export of
        the trained checkpoint matches torch at every quant point."""
        from deployq.calib.data import load_feeds

        names = forward_arguments(model.float_model)
        shapes = [tuple(int(d) for d in s.rpartition(":")[2].split(",")) for s in model.shapes]
        inputs = [deployq.InputSpec(name, shape) for name, shape in zip(names, shapes)]
        feeds = load_feeds(model.calib, [(i.name, i.shape) for i in inputs], limit=4)
        batches = [tuple(torch.from_numpy(f[n]) for n in names) for f in feeds]
        config = {"weight": {"quantizer": "lsq"}, "activation": {"quantizer": "lsq"}}
        teacher = model.float_model.eval()
        qmodel = deployq.prepare(teacher, batches[0], config)
        deployq.calibrate(qmodel, batches, progress=False)
        optimizer = torch.optim.Adam(qmodel.parameters(), lr=1e-5)
        qmodel.train()
        for batch in batches[:2]:
            with torch.no_grad():
                target = _first_tensor(teacher(*batch))
            loss = (_first_tensor(qmodel(*batch)) - target).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        qmodel.eval()
        ckpt = deployq.save_checkpoint(model.root / "qat.pt", qmodel, factory=model.factory, factory_kwargs=model.kwargs,
                                       inputs=inputs)
        source = resolve_model(ckpt=str(ckpt), factory=model.factory)
        result = export(source, model.root / "qat", progress=False)
        report = check_parity(source.qmodel, result.quant_model, batches[2:])
        assert report.max_lsb <= 1, [(p.name, p.max_lsb) for p in report.failures()]
        assert onnx.checker.check_model(result.quant_model) is None


def _first_tensor(output):
    if isinstance(output, dict):
        output = next(iter(output.values()))
    return output[0] if isinstance(output, (tuple, list)) else output


class Test_mobilenet_v2(Conformance):
    name = "mobilenet_v2"

    def test_a_fault_in_a_conv_bn_relu6_group_is_ranked_first_under_its_name(self, model):
        """×4 on the scale of one Conv+BN+ReLU6 group's quantizer (its step, and so its rounding error,
        four times larger): the local view ranks that group's output first, under its own name."""
        group = "features.2.conv.0.2"
        assert model.qparams("int8")[group]["op"] == "Conv2d+BatchNorm2d+ReLU6"
        quant = load_onnx(model.onnx("int8"))
        scale = next(i for i in quant.graph.initializer if i.name == f"{group}_scale")
        scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * 4, scale.name))
        report = diff(load_onnx(model.onnx("int8", "float")), quant, model.feeds(model.calib)[:2], mode="local",
                      progress=False)
        assert report.ranking()[0].point.name == group


for _name in MODELS:  # one test class per model (mobilenet_v2's, above, has the fault-injection test too)
    if _name != "mobilenet_v2":
        globals()[f"Test_{_name}"] = type(f"Test_{_name}", (Conformance,), {"name": _name})
