"""Checkpoints: round trip, weights_only safety, factory import policy, clear errors."""

import json

import pytest
import torch
from click.testing import CliRunner

import deployq
from deployq.qat import checkpoint as ck
from deployq.qat import loading
from deployq.cli import main
from deployq.examples import zoo

SHAPE = (1, 3, 16, 16)


@pytest.fixture
def saved(tmp_path):
    config = {"weight": {"quantizer": "lsq"}, "activation": {"quantizer": "lsq+"}, "layers": {"out": {"activation": 10}}}
    qmodel = deployq.prepare(zoo.unet(width=4), torch.randn(*SHAPE), config)
    deployq.calibrate(qmodel, [torch.randn(2, 3, 16, 16) for _ in range(3)], progress=False)
    with torch.no_grad():  # move the learned qparams away from their calibrated values
        qmodel.get_submodule("act_quant.cat").log_scale.add_(0.1)
    path = ck.save(tmp_path / "qat.pt", qmodel, factory="deployq.examples.zoo:unet",
                   factory_kwargs={"width": 4}, inputs=[ck.InputSpec("x", SHAPE)], meta={"epoch": 3})
    return qmodel.eval(), path


def test_round_trip_gives_the_same_model_and_qparams(saved):
    qmodel, path = saved
    loaded = loading.build(ck.load(path))
    x = torch.randn(*SHAPE)
    assert torch.equal(loaded(x), qmodel(x))
    ours, theirs = deployq.qparams_of(qmodel), deployq.qparams_of(loaded)
    assert ours == theirs and theirs["out"].bits == 10
    assert ck.load(path).meta == {"epoch": 3}


def test_checkpoint_is_plain_data(saved):
    _, path = saved
    payload = torch.load(path, weights_only=True)  # would raise on pickled code
    assert payload["format"] == "deployq-checkpoint"
    assert {q["name"] for q in payload["qparams"]["quant_points"]} >= {"x", "cat", "out.weight"}


def test_corrupt_and_truncated_files_are_clear_errors(saved, tmp_path):
    _, path = saved
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ck.CheckpointError, match="cut.pt"):
        ck.load(cut)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ck.CheckpointError, match="junk.pt"):
        ck.load(junk)
    with pytest.raises(ck.CheckpointError, match="does not exist"):
        ck.load(tmp_path / "missing.pt")


def test_pickled_code_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "deployq-checkpoint", "payload": zoo.UNet}, evil)  # a class: needs unpickling code
    with pytest.raises(ck.CheckpointError, match="never unpickles code"):
        ck.load(evil)


def test_factories_outside_deployq_need_the_users_word(saved):
    _, path = saved
    c = ck.load(path)
    c.factory = "os.path:join"
    with pytest.raises(ck.CheckpointError, match="not one of deployq's examples.*--model os.path:join"):
        loading.build(c)
    with pytest.raises(ck.CheckpointError, match="cannot import"):
        loading.import_factory("no_such_pkg_xyz.mod:f", allowed=True)


@pytest.mark.parametrize("reference", ["deployq.examples.lowlight.data:write_sid_folder",  # writes files
                                       "deployq.examples.zoo:conv_bn_relu",  # builds a module: not a listed factory
                                       "deployq.examples.timm_models:build",  # imports third-party code
                                       "deployq.examples.zoo:_init"])
def test_only_the_listed_example_factories_are_imported_on_a_files_word(saved, reference, monkeypatch):
    """deployq's own examples hold callables that are not model factories: a checkpoint naming
    one is refused like any other (the allow-list names factories, not a package), and nothing
    of it runs."""
    import importlib

    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    _, path = saved
    c = ck.load(path)
    c.factory = reference
    with pytest.raises(ck.CheckpointError, match=f"not one of deployq's examples.*--model {reference}"):
        loading.build(c)
    assert not imported
    assert reference not in loading.REGISTERED_FACTORIES


def test_every_listed_factory_exists():
    for reference in loading.REGISTERED_FACTORIES:
        factory = loading.import_factory(reference, allowed=False)
        assert callable(factory), reference


def test_cli_inspect_reads_checkpoints_and_factories(saved):
    _, path = saved
    runner = CliRunner()
    result = runner.invoke(main, ["inspect", "--ckpt", str(path), "--json", "-"])
    assert result.exit_code == 0, result.output
    assert '"name": "cat"' in result.output and '"bits": 10' in result.output
    result = runner.invoke(main, ["inspect", "--model", "deployq.examples.zoo:reused", "--input-shape", "1,3,8,8"])
    assert result.exit_code == 0 and "lrelu_dup3" in result.output
    result = runner.invoke(main, ["inspect", "--model", "deployq.examples.zoo:reused"])
    assert result.exit_code == 1 and "--input-shape" in result.output


def test_cli_version_and_help():
    runner = CliRunner()
    assert deployq.__version__ in runner.invoke(main, ["--version"]).output
    assert "inspect" in runner.invoke(main, ["--help"]).output


def test_model_kwargs_reach_the_factory(tmp_path):
    runner = CliRunner()
    torch.save(zoo.unet(width=4).state_dict(), tmp_path / "w4.pth")
    args = ["inspect", "--ckpt", str(tmp_path / "w4.pth"), "--model", "deployq.examples.zoo:unet", "--input-shape", "1,3,8,8"]
    assert runner.invoke(main, args).exit_code == 1  # width 8 by default: the weights do not fit
    result = runner.invoke(main, args + ["--model-kwargs", '{"width": 4}'])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, args + ["--model-kwargs", "width=4"])
    assert result.exit_code == 2 and "is not JSON" in result.output


def _rewritten(path, tmp_path, **fields):
    payload = torch.load(path, weights_only=True)
    payload.update(fields)
    out = tmp_path / "rewritten.pt"
    torch.save(payload, out)
    return out


def test_a_checkpoint_cannot_name_a_callable_inside_deployq_that_is_not_a_model_factory(saved, tmp_path):
    """The CLI's own entry point, with arguments from the file, would run a shell command."""
    _, path = saved
    marker = tmp_path / "ran"
    evil = _rewritten(path, tmp_path, factory="deployq.cli:main", factory_kwargs={
        "args": ["inspect", "--model", "os:system", "--model-kwargs", json.dumps({"command": f"touch {marker}"}),
                 "--input-shape", "1"], "standalone_mode": False})
    for command in (["inspect", "--ckpt", str(evil)], ["export", "--ckpt", str(evil), "--out", str(tmp_path / "o")],
                    ["check", "--ckpt", str(evil), "--onnx", str(evil)]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code != 0 and "deployq.cli:main" in result.output and "not one of deployq's examples" in result.output
        assert not marker.exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("factory,kwargs,message", [
    ("deployq.examples.zoo:unet", {"no_such_argument": 1}, "zoo:unet rejected the keyword arguments"),
    ("deployq.examples.torchvision_models:two_inputs", {"depth": 3}, "two_inputs does not take"),
    ("deployq.examples.zoo:unet", {"width": {1: 2}}, "plain data"),
    ("deployq.examples.zoo:unet", {"width": torch.ones(1)}, "plain data"),
])
def test_factory_arguments_from_a_file_must_be_plain_data_the_factory_takes(saved, tmp_path, factory, kwargs, message):
    _, path = saved
    c = ck.load(_rewritten(path, tmp_path, factory=factory, factory_kwargs=kwargs))
    with pytest.raises(ck.CheckpointError, match=message):
        loading.checkpoint_float_model(c)


@pytest.mark.parametrize("key, written, legacy, other", [
    ("quantize_float_ops", False, True, "concat_keeps_bits"),
    ("concat_keeps_bits", True, False, "quantize_float_ops"),
])
def test_a_checkpoint_from_before_a_placement_option_keeps_its_placement(saved, tmp_path, key, written, legacy, other):
    """A checkpoint written before ``quantize_float_ops`` quantized every op's output, one written
    before ``concat_keeps_bits`` learned its concat scales at the default width: read without the
    key, each keeps the placement its qparams were learned for; new ones keep their own setting,
    and the other key is read as written."""
    _, path = saved
    payload = torch.load(path, weights_only=True)
    other_value = payload["config"][other]
    assert payload["config"][key] is written
    assert getattr(ck.parse(payload, path).config, key) is written
    del payload["config"][key]
    assert getattr(ck.parse(payload, path).config, key) is legacy
    assert getattr(ck.parse(payload, path).config, other) is other_value
