"""Pieces shared by the CLI commands: the console, error handling, shared option groups."""

from __future__ import annotations

import functools
import inspect
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import click
from rich.console import Console

from deployq import api

# a wide console when output goes to a file or pipe, so tables keep one row per line
console = Console(width=None if sys.stdout.isatty() else 200)


EXIT_GATE = 3  # a gate that failed (diff --fail-below, check beyond 1 LSB); errors exit 1, Ctrl-C 130


class UserError(click.ClickException):
    """An error caused by the input; printed as 'Error: ...' with exit status 1."""


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                  line: Optional[str] = None) -> None:
    """deployq's own warnings as one line on stderr (no file and line number); others as usual."""
    if category.__module__.startswith("deployq"):
        click.echo(click.style("warning: ", fg="yellow", bold=True) + str(message), err=True)
    else:
        _default_show_warning(message, category, filename, lineno, file, line)


_default_show_warning = warnings.showwarning


def set_verbosity(quiet: bool, verbose: bool) -> None:
    """-q: nothing on stdout or stderr but errors, warnings, a failed gate and asked-for JSON;
    -v: also the rewriter's notes, deployq's log lines and the time of each stage."""
    from deployq.core import progress

    if quiet and verbose:
        raise click.UsageError("give -q/--quiet or -v/--verbose, not both")
    console.quiet = quiet
    progress.QUIET, progress.VERBOSE = quiet, verbose
    logger = logging.getLogger("deployq")
    if verbose and not any(getattr(h, "deployq_verbose", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.deployq_verbose = True  # type: ignore[attr-defined]
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


def _json_target(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """--json FILE is checked before any work: writable, and not a file of another kind it would replace."""
    if not value or value == "-":
        return value
    from deployq.core.files import check_output

    if Path(value).exists() and Path(value).suffix.lower() != ".json":
        raise click.BadParameter(f"{value} exists and is not a .json file; --json would overwrite it "
                                 "(give a new FILE.json, or - for stdout)", ctx, param)
    try:
        check_output(value, "--json")
    except ValueError as err:
        raise click.BadParameter(str(err), ctx, param) from None
    return value


def json_option(what: str) -> Callable:
    """--json FILE|-, the same on every command."""
    return click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True),
                        metavar="FILE|-", callback=_json_target,
                        help=f"Write {what} as JSON to FILE; with -, print only the JSON, to stdout.")


def write_json(path: Optional[str], data: Any) -> None:
    """--json: to stdout for -, else atomically to the file (checked writable before the work)."""
    if not path:
        return
    from deployq.core.files import AtomicOutputs, json_text

    if path == "-":
        click.echo(json_text(data), nl=False)
        return
    with AtomicOutputs() as out:
        out.write_text(path, json_text(data))


def say(text: str, err: bool = False) -> None:
    """A result line (a verdict, what was written), unless -q."""
    if not console.quiet:
        click.echo(text, err=err)


def _verbosity_options(command: Callable) -> Callable:
    """-q/--quiet and -v/--verbose on every command (handle_errors adds them)."""

    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        state = ctx.meta.setdefault("deployq.verbosity", {})  # one invocation's, never the next one's
        state[param.name] = value
        if len(state) == 2:
            set_verbosity(state["quiet"], state["verbose"])

    command = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=remember, is_eager=True,
                           help="Also print the rewriter's notes, log lines and the time of each stage.")(command)
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=remember, is_eager=True,
                        help="Print nothing on success (errors, warnings and a failed gate still print).")(command)


def _reset_verbosity() -> None:
    """After a command: the defaults again, for whatever runs next in this process."""
    from deployq.core import progress

    console.quiet = False
    progress.QUIET = progress.VERBOSE = False
    progress.restart_clock()
    logger = logging.getLogger("deployq")
    for handler in [h for h in logger.handlers if getattr(h, "deployq_verbose", False)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def handle_errors(command: Callable) -> Callable:
    """Turn deployq's own errors (ValueError family, missing files) into clean CLI errors; give the
    command the shared -q/-v options."""

    @_verbosity_options
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warnings.showwarning = _show_warning
        try:
            return command(*args, **kwargs)
        except click.ClickException:
            raise
        except (ValueError, FileNotFoundError, KeyError, RuntimeError, ImportError) as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            raise UserError(str(message)) from err
        except Exception as err:
            if type(err).__module__.startswith("onnxruntime"):  # its own exception types
                raise UserError(f"onnxruntime: {' '.join(str(err).split())}") from err
            raise
        finally:
            _reset_verbosity()

    return wrapper


class PositiveFloat(click.ParamType):
    """A positive, finite number (click's FloatRange lets NaN and infinity through)."""

    name = "number"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> float:
        number = click.FLOAT.convert(value, param, ctx)
        if not (math.isfinite(number) and number > 0):
            self.fail(f"{value!r} is not a positive finite number", param, ctx)
        return number


POSITIVE = PositiveFloat()


def parse_shape(value: Optional[str]) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    try:
        shape = tuple(int(v) for v in value.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated integers, e.g. 1,4,128,128") from None
    if not shape or any(d <= 0 for d in shape):
        raise click.BadParameter(f"{value!r}: every dimension must be a positive integer")
    return shape


def parse_input_shapes(values: tuple[str, ...]) -> Optional[list[tuple[Optional[str], tuple[int, ...]]]]:
    """``--input-shape`` values: ``N,C,H,W`` (a one-input model) or ``NAME:N,C,H,W`` (repeatable)."""
    if not values:
        return None
    shapes = []
    for value in values:
        name, _, dims = value.rpartition(":")
        shapes.append((name.strip() or None, parse_shape(dims)))
    names = [n for n, _ in shapes]
    if len(shapes) > 1 and (None in names or len(set(names)) != len(names)):
        raise click.BadParameter("with several --input-shape options, name each input once: NAME:N,C,H,W")
    return shapes


def parse_kwargs(value: Optional[str]) -> Optional[dict]:
    if value is None:
        return None
    try:
        kwargs = json.loads(value)
    except json.JSONDecodeError as err:
        raise click.BadParameter(f"{value!r} is not JSON: {err}") from None
    if not isinstance(kwargs, dict):
        raise click.BadParameter(f"{value!r}: expected a JSON object, e.g. '{{\"width\": 8}}'")
    return kwargs


def api_option(function: Callable, name: str, *flags: str, **kwargs: Any) -> Callable:
    """A click option for the parameter `name` of the API function behind a command: the same name,
    and the default the signature gives (so the CLI and the API cannot drift; a name the function
    does not take fails when the CLI is imported)."""
    parameter = inspect.signature(function).parameters.get(name)
    if parameter is None:
        raise TypeError(f"{function.__module__}.{function.__name__} has no parameter {name!r} for {flags[0]}")
    if "default" in kwargs:
        raise TypeError(f"{flags[0]}: its default is {function.__name__}'s, not the option's own")
    if parameter.default is not inspect.Parameter.empty and not kwargs.get("multiple"):
        # an empty sequence (nothing chosen) is no value to click: the option's callback makes it one
        kwargs["default"] = None if parameter.default == () else parameter.default
    return click.option(*flags, name, **kwargs)


def onnx_model_option(command: Callable) -> Callable:
    """--onnx FILE: a float ONNX model as the model (export, inspect)."""
    return api_option(
        api.load_model, "onnx_file", "--onnx", type=click.Path(dir_okay=False), metavar="FILE",
        help="A float ONNX model instead of a checkpoint: its graph and weights are imported, every quant point "
             "is named after the ONNX tensor it quantizes, and the exported models keep the file's tensor names, "
             "so `deployq diff FILE OUT/model.int8.onnx` pairs them. Checkpoints written from it record the file "
             "and its SHA-256.")(command)


def model_options(command: Callable) -> Callable:
    """--ckpt / --model / --config / --input-shape / --leaf, shared by the commands that build a model."""
    options = [
        api_option(api.load_model, "ckpt", "--ckpt", type=click.Path(dir_okay=False),
                   help="deployq checkpoint (or a plain state_dict with --model)."),
        api_option(api.load_model, "factory", "--model", metavar="PKG.MOD:FACTORY",
                   help="Model factory to import. Naming it allows deployq to import that code."),
        api_option(api.load_model, "model_kwargs", "--model-kwargs", callback=lambda c, p, v: parse_kwargs(v),
                   metavar="JSON", help='Keyword arguments for the --model factory, e.g. \'{"width": 8}\'.'),
        api_option(api.load_model, "config", "--config", type=click.Path(exists=True, dir_okay=False),
                   help="Quantization config (YAML): defaults, per-layer overrides, fusion."),
        api_option(api.load_model, "input_shape", "--input-shape", multiple=True,
                   callback=lambda c, p, v: parse_input_shapes(v), metavar="[NAME:]N,C,H,W",
                   help="Model input shape, e.g. 1,4,128,128 (default: the checkpoint's); repeat as "
                        "NAME:N,C,H,W for a model with several inputs."),
        api_option(api.load_model, "leaf", "--leaf", multiple=True, metavar="MODULE",
                   help="Keep this module (a path such as backbone.attn, or a class name) whole: it is not "
                        "traced into, its inputs and output are quant points and the layers inside stay float. "
                        "For a module neither torch.fx nor torch.export can capture (the error names it); "
                        "repeat for several. Same as leaf_modules: [...] in the --config YAML."),
    ]
    for option in reversed(options):
        command = option(command)
    return command
