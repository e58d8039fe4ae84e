"""The Python API (deployq.deploy.export / diff / check) and the conventions every command shares:
`--json -` prints only JSON, a failed gate exits 3 (errors 1), the package is typed."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import deployq
from deployq.cli import main
from deployq.examples import zoo


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The zoo UNet, post-training quantized from memory through the API."""
    out = tmp_path_factory.mktemp("api")
    model = zoo.unet()
    batches = [torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    result = deployq.export(model, batches[0][:1], out, calib=batches)
    return model, batches, result


def test_the_api_names_are_the_functions_and_the_stage_modules_import_beside_them():
    for name in ("export", "diff", "check"):
        assert name in deployq.__all__ and callable(getattr(deployq, name))
        assert getattr(deployq, name).__module__ == "deployq.api"
    module = importlib.import_module("deployq.deploy.export")  # the stage module
    assert hasattr(module, "ExportResult") and deployq.export.__module__ == "deployq.api"
    assert (Path(deployq.__file__).parent / "py.typed").is_file()


def test_export_from_memory_writes_the_files_and_leaves_the_float_model_alone(exported):
    model, batches, result = exported
    assert {"float", "int8", "qparams", "ort"} <= set(result.files)
    assert all(p.is_file() for p in result.files.values())
    assert not any(type(m).__name__ == "FakeQuantizer" for m in model.modules())  # prepared a copy
    with pytest.raises(ValueError, match="example_inputs"):
        deployq.export(model, None, result.out_dir)


def test_diff_report_has_its_worst_rows_json_and_html(exported):
    _, batches, result = exported
    report = deployq.diff(result.files["float"], result.files["int8"], inputs=batches[:2])
    worst = report.worst(3)
    assert len(worst) == 3 and worst[0].stats.sqnr_db <= worst[-1].stats.sqnr_db
    assert worst[0] is report.ranking()[0]
    assert json.loads(json.dumps(report.to_json()))["mode"] == "accumulated"
    page = report.to_html()
    assert page.startswith("<!DOCTYPE html>") and worst[0].point.name in page
    with pytest.raises(ValueError, match="swapped"):
        deployq.diff(result.files["int8"], result.files["float"])


def test_check_in_memory_and_from_a_saved_checkpoint(exported, tmp_path):
    _, batches, result = exported
    assert "checkpoint" not in result.files  # a model given in Python, without a factory: none written
    saved = deployq.save_checkpoint(tmp_path / "unet.pt", result.qmodel, factory="deployq.examples.zoo:unet",
                                    inputs=[deployq.InputSpec("x", (1, 3, 32, 32))])
    for model in (result.qmodel, saved):  # the checkpoint is rebuilt from its factory and qparams
        report = deployq.check(model, result.files["int8"], inputs=batches[:2])
        assert report.passed() and report.verdict().startswith("PASS: "), model
    report = deployq.check(result.qmodel, result.files["ort"], inputs=batches[:1])
    assert report.ort_format is not None and report.ort_format.ok and report.passed()
    with pytest.raises(ValueError, match="no QuantizeLinear"):
        deployq.check(result.qmodel, result.files["float"])


def _corrupted(path: Path, out: Path) -> Path:
    """`path` with the zero point of its second activation QuantizeLinear moved by 3 codes."""
    model = onnx.load(path)
    zps = [n.input[2] for n in model.graph.node if n.op_type == "QuantizeLinear" and not n.input[0].endswith("weight")]
    init = next(i for i in model.graph.initializer if i.name == zps[1])
    value = onnx.numpy_helper.to_array(init).astype(np.int64) + 3
    init.CopyFrom(onnx.numpy_helper.from_array(value.astype(onnx.numpy_helper.to_array(init).dtype), init.name))
    onnx.save(model, out)
    return out


def test_check_fails_codes_two_apart():
    """The gate is at most 1 LSB at every quant point: one point 2 apart fails the whole check."""
    from deployq.verify.check import ParityReport, PointParity

    points = [PointParity("a", "activation", 8, elements=100, exact=99, one=1, max_lsb=1),
              PointParity("b", "activation", 8, elements=100, exact=99, one=0, max_lsb=2)]
    assert ParityReport(points[:1], onnx="m.onnx").passed()
    report = ParityReport(points, onnx="m.onnx")
    assert not report.passed() and [p.name for p in report.failures()] == ["b"]
    assert report.verdict().startswith("FAIL: ")


def test_json_dash_prints_only_json_and_gates_exit_3(exported, tmp_path):
    _, batches, result = exported
    runner = CliRunner()
    diff_args = ["diff", str(result.files["float"]), str(result.files["int8"]), "--random", "1"]
    out = runner.invoke(main, diff_args + ["--json", "-"])
    assert out.exit_code == 0 and json.loads(out.stdout)["mode"] == "accumulated"
    out = runner.invoke(main, diff_args + ["--json", "-", "--fail-below", "500"])
    assert out.exit_code == 3 and json.loads(out.stdout)["gate_sqnr_db"] < 500
    np.save(tmp_path / "x.npy", batches[0].numpy())
    bad = _corrupted(result.files["int8"], tmp_path / "bad.onnx")
    ckpt = tmp_path / "qat.pt"
    deployq.save_checkpoint(ckpt, result.qmodel, factory="deployq.examples.zoo:unet",
                            inputs=[deployq.InputSpec("x", (1, 3, 32, 32))])
    out = runner.invoke(main, ["check", "--ckpt", str(ckpt), "--onnx", str(result.files["int8"]), "--json", "-"])
    assert out.exit_code == 0 and json.loads(out.stdout)["passed"] is True
    out = runner.invoke(main, ["check", "--ckpt", str(ckpt), "--onnx", str(bad), "--random", "1"])
    assert out.exit_code == 3 and out.output.splitlines()[-1].startswith("FAIL: "), out.output
    out = runner.invoke(main, ["check", "--ckpt", str(ckpt), "--onnx", str(tmp_path / "missing.onnx")])
    assert out.exit_code == 1  # an error, not a failed gate


def test_the_first_layer_is_not_flagged_as_an_error_jump(exported):
    _, batches, result = exported
    report = deployq.diff(result.files["float"], result.files["int8"], inputs=batches[:1])
    after_input = [r for r in report.rows if r.point.inputs and all(
        next(p for p in report.rows if p.point.name == n).point.op == "input" for n in r.point.inputs)]
    assert after_input and not any(r.jump for r in after_input)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A float state_dict and data for every command: a UNet with 4 input channels (packed raw, so
    `run` takes it), its PTQ export, a training recipe and one synthetic DNG."""
    import yaml

    from deployq.examples.lowlight.data import write_sid_folder

    w = tmp_path_factory.mktemp("conventions")
    model = zoo.unet(in_ch=4, width=4)
    torch.save(model.state_dict(), w / "float.pth")
    x = np.random.default_rng(0).uniform(0, 0.3, (8, 4, 16, 16)).astype(np.float32)
    np.save(w / "x.npy", x[:, None])
    with torch.no_grad():
        y = model(torch.from_numpy(x)).numpy()
    np.savez(w / "train.npz", input=x, target=y)
    (w / "recipe.yaml").write_text(yaml.safe_dump({
        "model": {"factory": "deployq.examples.zoo:unet", "kwargs": {"in_ch": 4, "width": 4}, "weights": "float.pth"},
        "data": {"kind": "npz", "train": "train.npz", "val": "train.npz"}, "loss": "l1", "epochs": 1,
        "batch_size": 4, "calibration_batches": 1, "output_dir": "run"}))
    result = CliRunner().invoke(main, ["export", "--ckpt", str(w / "float.pth"), "--model", "deployq.examples.zoo:unet",
                                       "--model-kwargs", '{"in_ch": 4, "width": 4}', "--input-shape", "1,4,16,16",
                                       "--input", str(w / "x.npy"), "--out", str(w / "build")])
    assert result.exit_code == 0, result.output
    write_sid_folder(w / "raw", 1, 64, seed=1, split="val")
    return w


def _commands(w: Path) -> dict[str, list[str]]:
    model = ["--model", "deployq.examples.zoo:unet"]
    ckpt = ["--ckpt", str(w / "build" / "model.int8.pt"), *model]
    onnx_files = [str(w / "build" / "model.float.onnx"), str(w / "build" / "model.int8.onnx")]
    return {
        "inspect": ["inspect", *ckpt],
        "export": ["export", *ckpt, "--no-ort", "--out", str(w / "again")],
        "diff": ["diff", *onnx_files, "--random", "1"],
        "check": ["check", *ckpt, "--onnx", onnx_files[1], "--random", "1"],
        "run": ["run", onnx_files[1], str(w / "raw" / "short"), "--out", str(w / "png"), "--bench", "2"],
        "hessian": ["hessian", *ckpt, "--input", str(w / "x.npy"), "--layers", "enc1*", "--max-iter", "2",
                    "--batches", "1", "--yaml", str(w / "distill.yaml"), "--top", "1"],
        "train": ["train", "--recipe", str(w / "recipe.yaml")],
    }


@pytest.mark.parametrize("command", ["inspect", "export", "diff", "check", "run", "hessian", "train"])
def test_every_command_prints_only_json_with_json_dash_and_nothing_with_q(workdir, command, monkeypatch):
    monkeypatch.chdir(workdir)
    args = _commands(workdir)[command]
    out = CliRunner().invoke(main, [*args, "--json", "-"])
    assert out.exit_code == 0, out.output
    json.loads(out.stdout)  # stdout is one JSON document and nothing else
    if command == "train":
        import shutil

        shutil.rmtree(workdir / "run")  # a second run into the same folder needs --resume
    out = CliRunner().invoke(main, [*args, "-q"])
    assert out.exit_code == 0, out.output
    assert out.stdout == "" and out.stderr == "", (out.stdout, out.stderr)


def test_output_names_are_set_on_both_models_and_diff_still_pairs_them(workdir, tmp_path):
    args = _commands(workdir)["export"][:-2]
    out = CliRunner().invoke(main, [*args, "--out", str(tmp_path), "--output-names", "image"])
    assert out.exit_code == 0, out.output
    float_model, quant = (onnx.load(tmp_path / f"model.{k}.onnx") for k in ("float", "int8"))
    assert [o.name for o in float_model.graph.output] == [o.name for o in quant.graph.output] == ["image"]
    report = deployq.diff(tmp_path / "model.float.onnx", tmp_path / "model.int8.onnx", random=1)
    assert list(report.outputs) == ["image"] and "out" in {r.point.name for r in report.rows}
    out = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "bad"), "--output-names", "a,b"])
    assert out.exit_code == 1 and "--output-names gives 2 names; the model has 1 outputs" in out.output


def test_a_prepared_model_keeps_its_qparams_and_says_what_to_do(exported, tmp_path):
    _, batches, result = exported
    before = {k: v.scale for k, v in deployq.qparams_of(result.qmodel).items()}
    for calib in (batches, tmp_path):
        with pytest.raises(ValueError, match="already prepared"):
            deployq.export(result.qmodel, batches[0][:1], tmp_path / "x", calib=calib)
    with pytest.raises(ValueError, match="int16"):
        deployq.export(result.qmodel, batches[0][:1], tmp_path / "x", target="int16")
    assert {k: v.scale for k, v in deployq.qparams_of(result.qmodel).items()} == before
    assert not (tmp_path / "x").exists()


def test_api_inputs_one_tensor_is_one_batch_and_missing_inputs_are_named(exported):
    _, batches, result = exported
    report = deployq.diff(result.files["float"], result.files["int8"], inputs=batches[0])
    assert report.batches == 1
    with pytest.raises(ValueError, match="lacks x"):
        deployq.diff(result.files["float"], result.files["int8"], inputs=[{"y": batches[0]}])


def test_verbosity_does_not_leak_into_the_next_command(exported):
    from deployq.core import progress
    from deployq.cli.common import console

    _, _, result = exported
    args = ["diff", str(result.files["float"]), str(result.files["int8"]), "--random", "1"]
    assert CliRunner().invoke(main, [*args, "-q", "--help"]).exit_code == 0
    out = CliRunner().invoke(main, [*args, "-v"])
    assert out.exit_code == 0, out.output
    assert CliRunner().invoke(main, [*args, "-q"]).exit_code == 0
    assert console.quiet is False and progress.QUIET is False and progress.VERBOSE is False


def test_export_verbose_times_every_stage(tmp_path):
    """-v: the time each stage of an export took, the start-up (imports, preparing) included, in
    order; without -v, the stage lines alone."""
    torch.save(zoo.resnet().state_dict(), tmp_path / "state.pt")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).uniform(0, 1, (2, 1, 3, 16, 16)).astype(np.float32))
    args = ["export", "--ckpt", str(tmp_path / "state.pt"), "--model", "deployq.examples.zoo:resnet", "--input-shape",
            "1,3,16,16", "--calib", str(tmp_path / "calib.npy"), "--no-ort"]
    out = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "v"), "-v"])
    assert out.exit_code == 0, out.output
    timed = re.findall(r"^  (\d+\.\d) s  (.+)$", out.output, re.M)
    assert [t for _, t in timed][:3] == ["start-up (imports, loading and preparing the model)",
                                          "export: preparing the model for its target and calibrating",
                                          "export: tracing the model (torch.export -> ONNX)"]
    assert timed[-1][1] == "export: measuring NNAPI / CoreML coverage (onnxruntime's usability checker)"
    plain = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "p")])
    assert plain.exit_code == 0 and "export: tracing" in plain.output and not re.search(r"^  \d+\.\d s  ", plain.output, re.M)


def test_json_refuses_to_overwrite_a_file_that_is_not_json(exported, tmp_path):
    _, _, result = exported
    victim = tmp_path / "frame.npy"
    np.save(victim, np.zeros(3))
    out = CliRunner().invoke(main, ["diff", "--json", str(victim), str(result.files["float"]), str(result.files["int8"])])
    assert out.exit_code == 2 and "not a .json file" in out.output
    assert np.load(victim).shape == (3,)


def test_report_survives_non_finite_values(exported):
    from deployq.verify.report import _value_histogram

    _, batches, result = exported
    report = deployq.diff(result.files["float"], result.files["int8"], inputs=batches[:1])
    row = next(r for r in report.rows if r.point.kind == "activation")
    row.stats.sample = np.array([np.inf, np.nan, 0.5, 1.0], np.float32)
    assert "<svg" in _value_histogram(row)
    for stats in report.outputs.values():
        stats.example = (np.full_like(stats.example[0], np.nan), stats.example[1])
    assert "data:image/png" in report.to_html()
