"""Fixtures shared by the calibration tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """For tests that run thousands of tiny ops: on the shared 2-core CI machine a second intra-op thread only
    adds barrier waits (measured 5-10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
