"""The one switch between the Triton kernels and their PyTorch references.

`EQRECON_KERNELS` picks the path, read at every call so tests and launchers can flip it:

- unset / `auto`: Triton when every tensor is on CUDA and triton imports, the reference elsewhere;
- `triton`: Triton on CUDA; on CPU only when triton runs in interpreter mode (`TRITON_INTERPRET=1`
  set before triton was first imported), otherwise a loud warning and the reference;
- `ref`: always the reference.

A fallback warns once per reason, on rank 0 only. Both paths are functions without parameters,
so a model's `state_dict` is the same either way.
"""

from __future__ import annotations

import os
import warnings

import torch

_MODES = ("auto", "triton", "ref")
_warned: set[str] = set()
_triton_error: str | None = None
_triton_checked = False


def mode() -> str:
    """The requested mode, validated: 'auto', 'triton' or 'ref'."""
    value = os.environ.get("EQRECON_KERNELS", "").strip().lower() or "auto"
    if value not in _MODES:
        raise ValueError(f"EQRECON_KERNELS={value!r} is not one of triton|ref (or unset for auto)")
    return value


def interpret_requested() -> bool:
    """True when `TRITON_INTERPRET=1` is in the environment now."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_interprets() -> bool:
    """True when triton runs in interpreter mode.

    Triton fixes the mode of its own `tl` library functions (tl.sum, tl.max ...) when it is first
    imported, so what counts is TRITON_INTERPRET at that moment, not now: a kernel interpreted
    while they are compiled-mode functions fails, and vice versa.
    """
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    return not isinstance(tl.sum, JITFunction)


def triton_import_error() -> str | None:
    """None when triton imports, else the reason it does not (checked once)."""
    global _triton_error, _triton_checked
    if not _triton_checked:
        _triton_checked = True
        try:
            import triton
            import triton.language  # noqa: F401
        except Exception as exc:  # noqa: BLE001  (any failure to import means: no Triton path)
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_error


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def warn_once(message: str) -> None:
    """Warn loudly, once per message per process, and only on rank 0."""
    if message in _warned:
        return
    _warned.add(message)
    if _is_rank0():
        warnings.warn(f"eqrecon.kernels: {message}", RuntimeWarning, stacklevel=3)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide, for these inputs, whether the Triton kernel runs (True) or the reference (False)."""
    requested = mode()
    if requested == "ref":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if not on_cuda and requested == "auto":
        return False  # the expected CPU default: nothing to warn about
    error = triton_import_error()
    if error is not None:
        warn_once(f"triton does not import ({error}); falling back to the PyTorch reference kernels")
        return False
    if triton_interprets():
        if on_cuda:
            warn_once("triton is in interpreter mode (TRITON_INTERPRET=1): CUDA kernels run interpreted, slowly")
        return True
    if on_cuda:
        return True
    why = "was set after triton was first imported" if interpret_requested() else "is not 1"
    warn_once(
        f"EQRECON_KERNELS=triton but the tensors are on the CPU and TRITON_INTERPRET {why}; falling back "
        "to the PyTorch reference kernels (set TRITON_INTERPRET=1 before starting Python to run Triton on CPU)"
    )
    return False


_compiled: dict = {}


def kernel_for(fn, configs: list | None = None, key: list[str] | None = None):
    """The Triton kernel `fn` (a plain Python function) made launchable.

    A compiled JITFunction (autotuned over `configs` keyed on `key` when given), or the interpreter
    when triton itself is in interpreter mode. Wrapping lazily here, rather than with `@triton.jit`
    when this package is imported, keeps the kernels in the same mode as triton's own library even
    when TRITON_INTERPRET changed between the two imports.
    """
    interpret = triton_interprets()
    cache_key = (fn, interpret)
    if cache_key not in _compiled:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            kernel = InterpretedFunction(fn)
        else:
            import triton
            from triton.runtime.jit import JITFunction

            kernel = JITFunction(fn)
            if configs:
                kernel = triton.autotune(configs=configs, key=key or [])(kernel)
        _compiled[cache_key] = kernel
    return _compiled[cache_key]
