import os
from collections.abc import Iterator

# Triton kernels run on the CPU only in the interpreter; must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from pfn.model import PFN, PFNConfig  # noqa: E402
from pfn.predictor import Predictor  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

REAL_CURVES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                           "real_curves.npz")


@pytest.fixture(params=[(False, False, False), (True, False, False), (True, True, False),
                        (True, True, True)],
                ids=["plain", "sharpen", "inputs", "gauss"])
def tiny_model(request: pytest.FixtureRequest) -> PFN:
    """A small random-weight PFN (seeded) for shape and semantics tests: plain, with the
    sharpening head, with the head, the step inputs and the anchor inputs, and with all of
    these and the Gaussian head (their zero-initialised output layers given random weights,
    so that none is the identity)."""
    torch.manual_seed(0)
    sharpen, steps, gauss = request.param
    cfg = PFNConfig(n_layers=2, d_model=32, n_heads=4, d_ff=64, n_buckets=50, encoder_hidden=16,
                    sharpen_head=sharpen, step_inputs=steps, anchor_inputs=steps,
                    gauss_head=gauss)
    model = PFN(cfg, torch.linspace(-0.2, 1.2, 51)).eval()
    if model.sharpen is not None:
        torch.nn.init.normal_(model.sharpen.weight, std=0.1)
    for enc in (model.step_enc, model.anchor_enc, model.gauss):
        if enc is not None:
            torch.nn.init.normal_(enc[-1].weight, std=0.3)
    return model


@pytest.fixture(scope="module")
def pred() -> Iterator[Predictor]:
    """The embedded default model, run on one torch thread (small batches on a shared CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Predictor.load()
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def real_curves_path() -> str:
    if not os.path.exists(REAL_CURVES):
        pytest.skip("../shared/data/real_curves.npz not present")
    return REAL_CURVES
