"""Hostile but realistic inputs to every command: each is a clear error and nothing else.

For every case the CLI must exit non-zero through its own error handling (no traceback), with a
message of one paragraph that names the culprit (file, option, key, layer), leave every file in
the output folder as it was (nothing added, nothing changed), and run nothing named in a file.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper

import deployq
from deployq.cli import main
from deployq.examples import zoo

SHAPE = (1, 3, 16, 16)
UNET = "deployq.examples.zoo:unet"


class World(NamedTuple):
    root: Path
    out: Path  # a folder holding a good export: no case may change it

    def __truediv__(self, name: str) -> Path:
        return self.root / name


def _onnx(path: Path, nodes, inputs, outputs, inits=(), ir=10, opsets=(("", 21),)) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = ir
    path.write_bytes(model.SerializeToString())
    return path


def _tensor(name: str, shape=(1, 3, 16, 16)):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("hostile")
    qmodel = deployq.prepare(zoo.unet(), torch.zeros(SHAPE))
    deployq.calibrate(qmodel, [torch.rand(2, 3, 16, 16) for _ in range(2)], progress=False)
    deployq.save_checkpoint(root / "good.pt", qmodel, factory=UNET, inputs=[deployq.InputSpec("x", SHAPE)])
    assert CliRunner().invoke(main, ["export", "--ckpt", str(root / "good.pt"), "--out", str(root / "out")]).exit_code == 0
    (root / "out" / "notes.txt").write_text("the user's own file\n")
    torch.save(zoo.unet().state_dict(), root / "float.pth")
    torch.save(zoo.unet(width=4).state_dict(), root / "narrow.pth")
    np.save(root / "calib.npy", np.random.default_rng(0).uniform(0, 1, (4, 3, 16, 16)).astype(np.float32))
    bad = np.random.default_rng(0).uniform(0, 1, (4, 3, 16, 16)).astype(np.float32)
    bad[1, 2, 3, 4] = np.nan
    np.save(root / "nan.npy", bad)
    np.save(root / "inf.npy", np.full((1, 3, 16, 16), np.inf, np.float32))
    np.save(root / "wrong_shape.npy", np.zeros((2, 5, 7), np.float32))
    np.save(root / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (root / "empty").mkdir()
    (root / "text.pt").write_text("this is not a checkpoint\n")
    (root / "empty.pt").write_bytes(b"")
    good = (root / "good.pt").read_bytes()
    (root / "truncated.pt").write_bytes(good[: len(good) // 2])
    with open(root / "code.pt", "wb") as f:  # a pickle that names a callable: unpickling would run it
        pickle.dump({"format": "deployq-checkpoint", "payload": shutil.rmtree}, f)
    payload = torch.load(root / "good.pt", weights_only=True)

    def variant(name: str, **changes) -> None:
        torch.save({**payload, **changes}, root / name)

    variant("evil_factory.pt", factory="deployq.cli:main", factory_kwargs={
        "args": ["inspect", "--model", "os:system", "--model-kwargs", json.dumps({"command": f"touch {root / 'ran'}"}),
                 "--input-shape", "1"], "standalone_mode": False})
    variant("outside_factory.pt", factory="os:system", factory_kwargs={"command": f"touch {root / 'ran'}"})
    variant("tensor_kwargs.pt", factory_kwargs={"width": torch.ones(1)})
    variant("bad_kwargs.pt", factory_kwargs={"depth": 3})
    variant("other_width.pt", factory_kwargs={"width": 4})
    variant("no_inputs.pt", inputs=None)
    variant("version99.pt", version=99)
    variant("bad_config.pt", config={**payload["config"], "colour": "red"})
    variant("bad_qparams.pt", qparams={"format": "something else"})
    torch.save([1, 2, 3], root / "list.pt")
    (root / "not_onnx.onnx").write_text("not a model")
    _onnx(root / "unknown_op.onnx", [helper.make_node("FrobnicateXYZ", ["x"], ["y"])], [_tensor("x")], [_tensor("y")])
    _onnx(root / "custom_domain.onnx", [helper.make_node("Thing", ["x"], ["y"], domain="com.example")],
          [_tensor("x")], [_tensor("y")], opsets=(("", 21), ("com.example", 1)))
    _onnx(root / "ir_too_new.onnx", [helper.make_node("Relu", ["x"], ["y"])], [_tensor("x")], [_tensor("y")], ir=99)
    _onnx(root / "relu.onnx", [helper.make_node("Relu", ["x"], ["y"])], [_tensor("x")], [_tensor("y")])
    _onnx(root / "rgb.onnx", [helper.make_node("Relu", ["x"], ["y"])], [_tensor("x", ["n", 3, 8, 8])],
          [_tensor("y", ["n", 3, 8, 8])])
    zero = onnx.load(str(root / "out" / "model.int8.onnx"))
    scale = next(i for i in zero.graph.initializer if i.name.endswith("_scale") and not i.dims)
    scale.CopyFrom(onnx.numpy_helper.from_array(np.zeros((), np.float32), scale.name))
    (root / "zero_scale.onnx").write_bytes(zero.SerializeToString())
    (root / "notes.dng").write_text("not a raw file")
    (root / "raw_dir").mkdir()
    (root / "raw_dir" / "fake.dng").write_text("not a raw file")
    (root / "a_file").write_text("a file where a folder should be\n")
    configs = {
        "syntax.yaml": "weight: {bits: 8\n",
        "unknown_key.yaml": "weight: {bits: 8}\ncolour: red\n",
        "one_bit.yaml": "weight: {bits: 1}\n",
        "quantizer.yaml": "weight: {quantizer: magic}\n",
        "no_layer.yaml": "layers: {no_such_layer: {activation: 10}}\n",
        "misplaced.yaml": "extra_quantizer_dict:\n  input_layer: 10\n  special_layer:\n    out: {activation: 10}\n",
        "python_tag.yaml": "weight: !!python/object/apply:os.system ['touch ran']\n",
        "recipe_unknown.yaml": "model: {factory: deployq.examples.zoo:unet}\nepochs: 1\nlearning_rate: 0.1\n",
    }
    for name, text in configs.items():
        (root / name).write_text(text)
    return World(root, root / "out")


class Case(NamedTuple):
    args: Callable[[World], list]
    names: tuple[str, ...]  # what the message must name (substrings)


def ckpt_case(file: str, *names: str, command: str = "inspect") -> Case:
    return Case(lambda w: [command, "--ckpt", str(w / file)] + (["--out", str(w.out)] if command == "export" else []),
                (file, *names))


def model_case(*extra: str, names: tuple[str, ...]) -> Case:
    return Case(lambda w: ["export", "--ckpt", str(w / "float.pth"), "--model", UNET, "--input-shape", "1,3,16,16",
                           "--calib", str(w / "calib.npy"), "--out", str(w.out),
                           *[str(w / a[1:]) if a.startswith("@") else a for a in extra]], names)


def diff_case(first: str, second: str, *extra: str, names: tuple[str, ...]) -> Case:
    def where(w: World, name: str) -> str:
        return str(w.out / name) if name.startswith("model.") else str(w / name)
    return Case(lambda w: ["diff", where(w, first), where(w, second),
                           *[str(w / a[1:]) if a.startswith("@") else a for a in extra]], names)


CASES = {
    # checkpoints
    "text file as checkpoint": ckpt_case("text.pt", "checkpoint"),
    "empty checkpoint": ckpt_case("empty.pt"),
    "truncated checkpoint": ckpt_case("truncated.pt", "corrupt"),
    "pickled code": ckpt_case("code.pt", "never unpickles code"),
    "checkpoint runs the CLI": ckpt_case("evil_factory.pt", "deployq.cli:main"),
    "checkpoint runs the CLI (export)": ckpt_case("evil_factory.pt", "deployq.cli:main", command="export"),
    "factory outside deployq": ckpt_case("outside_factory.pt", "os:system", "--model"),
    "tensor kwargs": ckpt_case("tensor_kwargs.pt", "plain data"),
    "kwargs the factory rejects": ckpt_case("bad_kwargs.pt", "depth"),
    "checkpoint of another width": ckpt_case("other_width.pt", "shape"),
    "checkpoint without inputs": ckpt_case("no_inputs.pt", "inputs"),
    "checkpoint version": ckpt_case("version99.pt", "version 99"),
    "checkpoint config key": ckpt_case("bad_config.pt", "colour"),
    "checkpoint qparams": ckpt_case("bad_qparams.pt", "qparams"),
    "a list as checkpoint": ckpt_case("list.pt", "state_dict"),
    "checkpoint is a folder": ckpt_case("empty", "is a directory"),
    "no such checkpoint": ckpt_case("missing.pt", "does not exist"),
    "state_dict without --model": Case(lambda w: ["export", "--ckpt", str(w / "float.pth"), "--out", str(w.out)],
                                       ("float.pth", "--model")),
    "state_dict of another model": Case(lambda w: ["export", "--ckpt", str(w / "narrow.pth"), "--model", UNET,
                                                   "--input-shape", "1,3,16,16", "--calib", str(w / "calib.npy"),
                                                   "--out", str(w.out)], ("narrow.pth", "shape")),
    "factory not importable": Case(lambda w: ["inspect", "--model", "no_such_pkg_xyz:build", "--input-shape", "1,3,8,8"],
                                   ("no_such_pkg_xyz",)),
    "factory without colon": Case(lambda w: ["inspect", "--model", "deployq.examples.zoo.unet", "--input-shape", "1,3,8,8"],
                                  ("package.module:function",)),
    "kwargs not JSON": Case(lambda w: ["inspect", "--model", UNET, "--model-kwargs", "width=4", "--input-shape", "1,3,8,8"],
                            ("--model-kwargs", "JSON")),
    "kwargs a list": Case(lambda w: ["inspect", "--model", UNET, "--model-kwargs", "[4]", "--input-shape", "1,3,8,8"],
                          ("--model-kwargs", "object")),
    "zero in the input shape": Case(lambda w: ["inspect", "--model", UNET, "--input-shape", "0,3,8,8"], ("--input-shape",)),
    "letters in the input shape": Case(lambda w: ["inspect", "--model", UNET, "--input-shape", "a,b"], ("--input-shape",)),
    "wrong channels": Case(lambda w: ["inspect", "--model", UNET, "--input-shape", "1,5,16,16"], ("--input-shape",)),
    "two unnamed shapes": Case(lambda w: ["inspect", "--model", UNET, "--input-shape", "1,3,8,8", "--input-shape", "1,3,8,8"],
                               ("NAME:N,C,H,W",)),
    # configs
    "config YAML syntax": model_case("--config", "@syntax.yaml", names=("syntax.yaml", "YAML")),
    "config unknown key": model_case("--config", "@unknown_key.yaml", names=("unknown_key.yaml", "colour")),
    "one-bit weights": model_case("--config", "@one_bit.yaml", names=("one_bit.yaml", "bits")),
    "unknown quantizer": model_case("--config", "@quantizer.yaml", names=("quantizer.yaml", "magic")),
    "layer that is not there": model_case("--config", "@no_layer.yaml", names=("no_such_layer",)),
    "seeds key one level too high": model_case("--config", "@misplaced.yaml",
                                               names=("misplaced.yaml", "input_layer", "special_layer")),
    "python tag in YAML": model_case("--config", "@python_tag.yaml", names=("python_tag.yaml",)),
    "recipe unknown key": Case(lambda w: ["train", "--recipe", str(w / "recipe_unknown.yaml")], ("learning_rate",)),
    # export options and outputs
    "opset too new": model_case("--opset", "99", names=("--opset",)),
    "out is a file": Case(lambda w: ["export", "--ckpt", str(w / "good.pt"), "--out", str(w / "a_file")], ("a_file",)),
    "out under a file": Case(lambda w: ["export", "--ckpt", str(w / "good.pt"), "--out", str(w / "a_file" / "o")],
                             ("a_file",)),
    "NaN calibration data": model_case(names=("nan.npy", "(1, 2, 3, 4)")) ._replace(
        args=lambda w: ["export", "--ckpt", str(w / "float.pth"), "--model", UNET, "--input-shape", "1,3,16,16",
                        "--calib", str(w / "nan.npy"), "--out", str(w.out)]),
    "calibration folder empty": Case(lambda w: ["export", "--ckpt", str(w / "float.pth"), "--model", UNET,
                                                "--input-shape", "1,3,16,16", "--calib", str(w / "empty"),
                                                "--out", str(w.out)], ("empty",)),
    "calibration array of another shape": Case(lambda w: ["export", "--ckpt", str(w / "float.pth"), "--model", UNET,
                                                          "--input-shape", "1,3,16,16", "--calib", str(w / "wrong_shape.npy"),
                                                          "--out", str(w.out)], ("wrong_shape.npy",)),
    "pickled calibration array": Case(lambda w: ["export", "--ckpt", str(w / "float.pth"), "--model", UNET,
                                                 "--input-shape", "1,3,16,16", "--calib", str(w / "objects.npy"),
                                                 "--out", str(w.out)], ("objects.npy",)),
    "calibration of an unknown type": Case(lambda w: ["export", "--ckpt", str(w / "float.pth"), "--model", UNET,
                                                      "--input-shape", "1,3,16,16", "--calib", str(w / "a_file"),
                                                      "--out", str(w.out)], ("a_file",)),
    "zero calibration batches": model_case("--calib-batches", "0", names=("--calib-batches",)),
    "unknown target": model_case("--target", "int4", names=("--target",)),
    "one-bit weight option": model_case("--weight-bits", "1", names=("--weight-bits",)),
    # diff
    "diff a text file": diff_case("not_onnx.onnx", "model.int8.onnx", names=("not_onnx.onnx",)),
    "diff the models swapped": diff_case("model.int8.onnx", "model.float.onnx", names=("model.int8.onnx", "first")),
    "diff unrelated models": diff_case("relu.onnx", "model.int8.onnx", names=("share only their inputs",)),
    "diff NaN inputs": diff_case("model.float.onnx", "model.int8.onnx", "--input", "@nan.npy", names=("nan.npy",)),
    "diff Inf inputs": diff_case("model.float.onnx", "model.int8.onnx", "--input", "@inf.npy", names=("inf.npy",)),
    "diff zero scale": diff_case("model.float.onnx", "zero_scale.onnx", names=("scale",)),
    "diff unknown op": diff_case("unknown_op.onnx", "model.int8.onnx", names=("unknown_op.onnx",)),
    "diff IR version too new": diff_case("ir_too_new.onnx", "model.int8.onnx", names=("ir_too_new.onnx",)),
    "diff custom domain": diff_case("custom_domain.onnx", "model.int8.onnx", names=("custom_domain.onnx",)),
    "diff json under a file": diff_case("model.float.onnx", "model.int8.onnx", "--json", "@a_file/r.json",
                                        names=("a_file",)),
    "diff html is a folder": diff_case("model.float.onnx", "model.int8.onnx", "--html", "@empty", names=("empty",)),
    "diff unknown mode": diff_case("model.float.onnx", "model.int8.onnx", "--mode", "bogus", names=("--mode",)),
    "diff points that are not there": diff_case("model.float.onnx", "model.int8.onnx", "--points", "nothing*",
                                                names=("nothing*",)),
    # export --onnx
    "export --onnx a text file": Case(lambda w: ["export", "--onnx", str(w / "notes.dng"), "--calib", "zeroq",
                                                 "--out", str(w.out)], ("notes.dng", "not an ONNX model")),
    "export --onnx with --ckpt": Case(lambda w: ["export", "--onnx", str(w / "relu.onnx"), "--ckpt", str(w / "good.pt"),
                                                 "--out", str(w.out)], ("--onnx", "--ckpt")),
    "export --onnx a custom op": Case(lambda w: ["export", "--onnx", str(w / "custom_domain.onnx"), "--calib", "zeroq",
                                                 "--out", str(w.out)], ("custom_domain.onnx", "cannot import")),
    "export --onnx a missing file": Case(lambda w: ["export", "--onnx", str(w / "missing.onnx"), "--out", str(w.out)],
                                         ("missing.onnx",)),
    # check
    "check against the float model": Case(lambda w: ["check", "--ckpt", str(w / "good.pt"), "--onnx",
                                                     str(w.out / "model.float.onnx")], ("model.float.onnx", "QuantizeLinear")),
    "check against another model": Case(lambda w: ["check", "--ckpt", str(w / "good.pt"), "--onnx", str(w / "relu.onnx")],
                                        ("relu.onnx",)),
    "check a missing model": Case(lambda w: ["check", "--ckpt", str(w / "good.pt"), "--onnx", str(w / "missing.onnx")],
                                  ("missing.onnx",)),
    # run
    "run ratio infinite": Case(lambda w: ["run", str(w.out / "model.int8.onnx"), str(w / "raw_dir"), "--ratio", "inf",
                                          "--out", str(w.out)], ("--ratio",)),
    "run ratio NaN": Case(lambda w: ["run", str(w.out / "model.int8.onnx"), str(w / "raw_dir"), "--ratio", "nan",
                                     "--out", str(w.out)], ("--ratio",)),
    "run a text file as raw": Case(lambda w: ["run", str(w / "rgb.onnx"), str(w / "notes.dng"), "--out", str(w.out)],
                                   ("rgb.onnx",)),
    "run a model that is not packed raw": Case(lambda w: ["run", str(w.out / "model.int8.onnx"), str(w / "raw_dir"),
                                                          "--out", str(w.out)], ("model.int8.onnx", "packed raw")),
    "run without inputs": Case(lambda w: ["run", str(w.out / "model.int8.onnx"), "--out", str(w.out)], ("raw files",)),
    # hessian
    "hessian NaN data": Case(lambda w: ["hessian", "--ckpt", str(w / "good.pt"), "--data", str(w / "nan.npy"),
                                        "--out", str(w.out / "distill.yaml")], ("nan.npy",)),
    "hessian unknown layer": Case(lambda w: ["hessian", "--ckpt", str(w / "good.pt"), "--data", str(w / "calib.npy"),
                                             "--layers", "no_such_layer", "--out", str(w.out / "distill.yaml")],
                                  ("no_such_layer",)),
    "train recipe missing": Case(lambda w: ["train", "--recipe", str(w / "missing.yaml")], ("missing.yaml",)),
}


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 50


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_is_a_clear_error_and_nothing_else(world, case):
    before = _snapshot(world.out)
    args = [str(a) for a in CASES[case].args(world)]
    result = CliRunner().invoke(main, args)
    output = result.output
    assert result.exit_code != 0, f"{case}: exit 0\n{output}"
    assert isinstance(result.exception, SystemExit), f"{case}: unhandled {result.exception!r}\n{output}"
    assert "Traceback" not in output, output
    message = output[output.find("Error"):] if "Error" in output else output
    assert "\n\n" not in message.strip(), f"{case}: the message is more than one paragraph:\n{message}"
    assert len(message.strip().splitlines()) <= 8, f"{case}: the message is too long:\n{message}"
    for name in CASES[case].names:
        assert name in message, f"{case}: the message does not name {name!r}:\n{message}"
    assert _snapshot(world.out) == before, f"{case}: the output folder changed"
    assert not (world / "ran").exists() and not Path("ran").exists(), f"{case}: code named in a file ran"
