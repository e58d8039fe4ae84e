"""One set of options for the CLI and the API: every command's options are parameters of the API
functions it calls, with the same names and defaults, and every command calls those functions."""

from __future__ import annotations

import inspect

import click
import pytest
from click.testing import CliRunner

from deployq import api
from deployq.cli import main
from deployq.cli.common import api_option

COMMAND_API = {  # command -> the API functions whose parameters its options are
    "export": (api.load_model, api.export),
    "inspect": (api.load_model, api.inspect),
    "hessian": (api.load_model, api.hessian, api.write_distill),
    "diff": (api.diff,),
    "check": (api.check,),
    "train": (api.train,),
    "run": (api.run, api.latency),
}
# options that shape what the command prints or gates, not what the API computes
PRESENTATION = {"json_path", "html_path", "top@diff", "fail_below@diff"}


def _parameters(command: str) -> dict[str, inspect.Parameter]:
    found: dict[str, inspect.Parameter] = {}
    for function in COMMAND_API[command]:
        for name, parameter in inspect.signature(function).parameters.items():
            found.setdefault(name, parameter)
    return found


def test_every_command_is_covered():
    assert set(main.commands) == set(COMMAND_API)


@pytest.mark.parametrize("command", sorted(COMMAND_API))
def test_every_option_is_an_api_parameter_with_the_same_default(command):
    parameters = _parameters(command)
    for param in main.commands[command].params:
        if param.name in PRESENTATION or f"{param.name}@{command}" in PRESENTATION or param.name in ("quiet", "verbose"):
            continue
        assert param.name in parameters, f"deployq {command} {param.opts[0]}: no API parameter {param.name!r}"
        default = parameters[param.name].default
        if default is inspect.Parameter.empty or getattr(param, "multiple", False) or param.nargs == -1:
            continue
        given = () if default == () and param.default is None else param.default  # api_option's empty sequence
        assert given == default, f"deployq {command} {param.opts[0]}: default {param.default!r}, API {default!r}"


def test_api_option_refuses_a_name_the_function_lacks_and_a_default_of_its_own():
    with pytest.raises(TypeError, match="no parameter 'calib_batches'"):
        api_option(api.export, "calib_batches", "--calib-batches")
    with pytest.raises(TypeError, match="default"):
        api_option(api.export, "calib_limit", "--calib-batches", default=7)
    option = api_option(api.export, "calib_limit", "--calib-batches", type=int)(click.command(lambda calib_limit: None))
    assert option.params[0].default == inspect.signature(api.export).parameters["calib_limit"].default


class _Called(Exception):
    """Raised by a patched API function: the command got as far as calling it."""


def _recorder(calls: dict, name: str, result: object = None):
    def record(*args, **kwargs):
        calls[name] = (args, kwargs)
        if result is None:
            raise _Called(name)
        return result
    return record


INVOCATIONS = {  # command line -> the API function it must reach, and keywords it must pass
    "export": (["export", "--ckpt", "x.pt", "--calib-batches", "7", "--ptq", "bias", "--refine-samples", "5",
                "--bias-shrink", "0"], "export", {"calib_limit": 7, "ptq": ("bias",), "refine_samples": 5,
                                                  "bias_shrink": 0.0}),
    "export defaults": (["export", "--ckpt", "x.pt"], "export", {"calib_limit": 100, "ptq": (), "target": "int8"}),
    "inspect": (["inspect", "--ckpt", "x.pt"], "inspect", {}),
    "hessian": (["hessian", "--ckpt", "x.pt", "--data", ".", "--batches", "3", "--estimator", "per-layer"], "hessian",
                {"limit": 3, "estimator": "per-layer"}),
    "diff": (["diff", "a.onnx", "b.onnx", "--random", "2", "--mode", "local"], "diff", {"random": 2, "mode": "local"}),
    "check": (["check", "--ckpt", "x.pt", "--onnx", "m.onnx", "--accumulated"], "check", {"local": False}),
    "train": (["train", "--recipe", "{recipe}", "--epochs", "2"], "train", {"epochs": 2}),
    "run": (["run", "m.onnx", "--bench", "3", "--batch", "2"], "latency", {"batch": 2}),
}


@pytest.mark.parametrize("command", sorted(INVOCATIONS))
def test_every_command_calls_the_api_with_its_options(command, monkeypatch, tmp_path):
    argv, target, expected = INVOCATIONS[command]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {}\n")
    calls: dict = {}
    monkeypatch.setattr(api, "load_model", _recorder(calls, "load_model", result=object()))
    for name in ("export", "inspect", "hessian", "diff", "check", "train", "run", "latency"):
        monkeypatch.setattr(api, name, _recorder(calls, name))
    result = CliRunner().invoke(main, [a.format(recipe=recipe) for a in argv])
    assert isinstance(result.exception, _Called), result.output
    args, kwargs = calls[target]
    for key, value in expected.items():
        assert kwargs[key] == value
