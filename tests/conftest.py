import sys
from pathlib import Path

import pytest

# Test helpers (fakes, fixtures builders) live beside the tests and are imported as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture()
def keep_torch_threads():
    """Restore torch's thread count after a test that changes it (crisp-relion's --j sets it for its process)."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def one_torch_thread(keep_torch_threads):
    """Run the test on one torch thread (stable timings and results on a shared machine), then restore."""
    import torch

    torch.set_num_threads(1)
