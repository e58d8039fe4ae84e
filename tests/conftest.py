"""Shared fixtures: deterministic seeds and small models from deployq.examples.zoo."""

import numpy as np
import pytest
import torch

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
