"""Fixtures shared by the tests; the small networks and their data are in ``tests/_nets.py``
(a plain module, so that the gloo workers of ``tests/_distributed.py`` can build them too)."""
import matplotlib
import pytest
import torch

matplotlib.use("Agg")  # figures are drawn off screen, before any test module imports pyplot


@pytest.fixture
def one_thread():
    """One torch thread for the test: small models run many tiny operations, and on a busy
    2-core machine a second OpenMP thread only makes them wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
