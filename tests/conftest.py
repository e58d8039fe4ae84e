"""Shared fixtures: deterministic seeds and small models from deployq.examples.zoo; the repository's
benchmarks/ package made importable (tests run parts of it)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def import_benchmarks() -> None:
    """Import the repository's benchmarks/ package by its path: putting the repository root on
    sys.path would also make calib/ and exporters/ importable as top-level modules. The wheel's
    test run (scripts/test-wheel.sh) copies tests/ without benchmarks/ and runs no test that needs
    it."""
    folder = ROOT / "benchmarks"
    if "benchmarks" not in sys.modules and (folder / "__init__.py").exists():
        spec = importlib.util.spec_from_file_location("benchmarks", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        sys.modules["benchmarks"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


import_benchmarks()

# One thread per test process: the suite runs on 2 workers (pytest -n 2), and on tiny tensors a
# second OpenMP thread competing for a busy core made single convolutions ~70x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)



@pytest.fixture(autouse=True)
def _eager_quantizer_kernels(monkeypatch):
    """Training in tests runs a few steps: compiling the quantizers' backward (torch.compile, ~30 s
    once) would cost more than it saves. tests/test_quantizers.py tests the compiled kernels."""
    from deployq.qat import fake_quant
    from deployq.train import loop as train

    monkeypatch.setattr(train, "use_compiled_kernels", lambda enabled=True: fake_quant.use_compiled_kernels(False))
