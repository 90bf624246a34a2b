"""Run in a fresh interpreter by tests/kernels/test_kernel_switch.py: the kernels' fallbacks, checked
where they happen (triton fixes its interpreter mode at first import, so these need their own process).

    python tests/kernels/fallback_worker.py               # Triton asked for on CPU without the interpreter
    python tests/kernels/fallback_worker.py --no-triton   # triton unimportable: kernels and model still import

Prints "ok" when the reference path ran and gave the reference's results.
"""

from __future__ import annotations

import importlib.abc
import sys


class BlockTriton(importlib.abc.MetaPathFinder):
    """Makes `import triton` fail as it does where triton is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")


def main(no_triton: bool) -> None:
    if no_triton:
        sys.meta_path.insert(0, BlockTriton())
    import torch

    import kernels
    import model  # noqa: F401  (the model package must import without triton too)

    if no_triton:
        assert "triton" not in sys.modules, "importing kernels/model imported triton"
    q = torch.randn(1, 2, 9, 32, requires_grad=True)
    out = kernels.cross_attention(q, q, q)  # EQRECON_KERNELS=triton: falls back to the reference
    assert "eqrecon_cross_attention" not in type(out.grad_fn).__name__, "Triton ran without the interpreter"
    assert torch.equal(out, kernels.cross_attention_ref(q, q, q))
    assert torch.equal(kernels.recon_loss(q, q * 2), kernels.recon_loss_ref(q, q * 2))
    if no_triton:
        assert torch.allclose(
            kernels.self_attention(q, q, q), kernels.cross_attention_ref(q, q, q), atol=1e-6
        )
    print("ok")


if __name__ == "__main__":
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2]))  # the repository root
    main("--no-triton" in sys.argv[1:])
