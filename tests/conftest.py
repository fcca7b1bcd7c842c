import importlib.util
import pathlib
import socket

import numpy as np
import pytest

import pycurv

if importlib.util.find_spec("torch") is not None:
    import torch

    # The adapter tests use models of a few hundred parameters: torch's thread pool
    # only adds synchronisation, and on a loaded machine its spinning barriers make
    # single products take 100x longer.
    torch.set_num_threads(1)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_report_header(config):
    info = pycurv.build_info()
    return f"pycurv {pycurv.__version__} from {pathlib.Path(pycurv.__file__).parent} ({info['compiler']}, openmp={info['openmp']})"


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture
def repo_root():
    return ROOT

