"""Test setup shared by every test file.

TRITON_INTERPRET must be set before triton is first imported so that @triton.jit kernels run on
CPU tensors; it is set here, at collection time, unless a GPU is present.  FASTMASK_BACKEND
defaults to ``torch`` so that model and training tests run the fast reference path; kernel tests
pass ``backend=`` explicitly, which wins over the environment.
"""
import os

os.environ.setdefault("FASTMASK_BACKEND", "torch")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (marked gpu); none is visible here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared 2-core box: one thread avoids OpenMP oversubscription stalls."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
