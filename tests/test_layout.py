"""The import rule of docs/design.md, checked on every import statement (function-level ones too):

    cli -> api -> stages (qat -> train, qat -> ptq -> deploy -> verify -> infer) -> calib / exporters -> core

A folder may import itself and what the table below lists, nothing else; the verify stage reads
ONNX graphs through exporters' public names and graph helpers only, never a rewrite pass; nothing but the
examples themselves imports the examples; and no module grows past the size the layout asks for.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# installed name -> folder in the repository (pyproject's package-dir)
FOLDERS = {"deployq.calib": ROOT / "calib", "deployq.exporters": ROOT / "exporters",
           "deployq.examples": ROOT / "examples", "deployq": ROOT / "deployq"}

ALLOWED = {  # group -> groups it may import (besides itself)
    "core": set(),
    "calib": {"core"},
    "exporters": {"core"},
    "qat": {"core", "calib"},
    "train": {"core", "calib", "qat"},
    "ptq": {"core", "calib", "qat"},
    "deploy": {"core", "calib", "exporters", "qat", "ptq"},
    "verify": {"core", "calib", "exporters.api", "qat", "deploy"},
    "infer": {"core", "calib"},
    "api": {"core", "calib", "exporters", "qat", "ptq", "train", "deploy", "verify", "infer"},
    "cli": {"core", "calib", "exporters", "qat", "ptq", "train", "deploy", "verify", "infer", "api"},
    # deployq/__init__ (the lazy API names), __main__, _entry
    "top": {"core", "calib", "exporters", "qat", "ptq", "train", "deploy", "verify", "infer", "api", "cli"},
}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            if package == "deployq" and path.relative_to(folder).parts[0] in ("calib", "exporters", "examples"):
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _modules()


def group(module: str) -> str | None:
    """The layout group of an installed module name (None: not deployq's)."""
    parts = module.split(".")
    if parts[0] != "deployq":
        return None
    if len(parts) > 1 and parts[1] == "_version":
        return "core"
    if len(parts) == 1 or parts[1] in ("_entry", "__main__"):
        return "top"
    if parts[1] == "exporters" and (len(parts) == 2 or parts[2] == "graph"):
        return "exporters.api"  # the package's public names and its graph helpers
    return parts[1]


def imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
            found += [(node.lineno, name if name in MODULES else base) for name in names]
    return found


def _allowed(source: str, target: str) -> bool:
    if source == "examples":
        return True
    if target == "examples":
        return False
    if target == "exporters.api":  # whoever may use exporters may use its public names
        return source in ("exporters", "exporters.api") or bool({"exporters", "exporters.api"} & ALLOWED[source])
    if source == "exporters.api":
        source = "exporters"
    return target == source or target in ALLOWED[source]


def test_every_import_follows_the_layout_rule():
    broken = []
    for module, path in sorted(MODULES.items()):
        source = group(module)
        for line, target_module in imports(module, path):
            target = group(target_module)
            if target is not None and target != source and not _allowed(source, target):
                broken.append(f"{path.relative_to(ROOT)}:{line}: {source} imports {target_module} ({target})")
    assert not broken, "imports that break docs/design.md's rule:\n" + "\n".join(broken)


def test_the_rule_catches_an_upward_import(tmp_path):
    """The checker itself: a core module importing a stage, or verify reaching into a pass, is caught."""
    assert not _allowed("core", "qat")
    assert not _allowed("exporters", "qat")
    assert not _allowed("verify", "exporters")  # a rewrite pass, not the graph helpers
    assert _allowed("verify", "exporters.api")
    assert group("deployq.exporters.graph") == group("deployq.exporters") == "exporters.api"
    assert group("deployq.exporters.fold_bn") == "exporters"
    assert not _allowed("qat", "examples")
    fake = tmp_path / "fake.py"
    fake.write_text("def f():\n    from deployq.qat import prepare\n")
    assert imports("deployq.core.fake", fake) == [(2, "deployq.qat.prepare")]


def test_every_group_is_known():
    assert {group(m) for m in MODULES} <= set(ALLOWED) | {"examples", "exporters.api"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("deployq.examples")))
def test_no_module_is_too_long(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module].relative_to(ROOT)} has {lines} lines (layout: at most {MAX_LINES})"


MAX_FUNCTION_LINES = 60  # in the stages a newcomer reads first: prepare, export, verify
SHORT_FUNCTIONS = ("deployq.qat.", "deployq.deploy.", "deployq.verify.")


def test_no_function_in_the_pipeline_stages_is_too_long():
    long = []
    for module, path in MODULES.items():
        if not module.startswith(SHORT_FUNCTIONS):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}: {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_every_registered_factory_is_a_function_deployq_has():
    """The factories a checkpoint may name on its own are strings: each must import and be callable."""
    from deployq.qat.loading import REGISTERED_FACTORIES, import_factory

    for reference in sorted(REGISTERED_FACTORIES):
        assert callable(import_factory(reference, allowed=False)), reference


def test_nothing_defaults_to_allowing_imports():
    """A parameter that lets code named in a file be imported (`allowed`) is never True unless a
    caller says so: no default, or a default of False."""
    opened = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            positional = args.posonlyargs + args.args
            defaults = dict(zip([a.arg for a in positional][len(positional) - len(args.defaults):], args.defaults))
            defaults.update({a.arg: d for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None})
            default = defaults.get("allowed")
            if default is not None and not (isinstance(default, ast.Constant) and default.value is False):
                opened.append(f"{module}.{node.name}")
    assert not opened, f"`allowed` defaults open in {opened}"
