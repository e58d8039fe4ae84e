"""The README's Python example runs as written, and its checkpoint exports."""

import re
from pathlib import Path

from click.testing import CliRunner

from deployq.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_qat_example_runs_and_exports(tmp_path, monkeypatch):
    block = re.search(r"## The QAT API in ten lines\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len([line for line in block.splitlines() if line.strip()]) <= 14
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    result = CliRunner().invoke(main, ["export", "--ckpt", "qat.pt", "--out", "build"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "build" / "model.int8.onnx").is_file()
