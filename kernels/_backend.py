"""The one switch between the Triton kernels and their PyTorch alternatives.

`EQRECON_KERNELS` picks the path, read at every call so tests and launchers can flip it:

- unset / `auto`: on CUDA, the first call for a new shape and dtype times every candidate
  (fwd + bwd; the Triton kernel against the best SDPA backend, or against the eager and compiled
  loss) and keeps the fastest for that shape, printed once on rank 0 and listed by `choices()` (the
  trainer records it). On CPU, the PyTorch reference, silently. Without triton, the PyTorch
  candidates only, with one warning;
- `triton`: Triton on CUDA; on CPU only when triton runs in interpreter mode (`TRITON_INTERPRET=1`
  set before triton was first imported), otherwise a loud warning and the reference;
- `ref`: always the reference.

triton itself is imported only here and in the `_*_triton` modules, on first use, so `import kernels`
works without it. A fallback warns once per reason, on rank 0 only. Every path is a function without
parameters, so a model's `state_dict` is the same either way.

Under torch.compile the choice is made when dynamo traces the call (set the switch before compiling), the
reference paths are compiled with the model, and the Triton paths are torch.library custom ops
(`eqrecon::*`, defined beside each kernel) that stay in the graph as opaque nodes; auto mode does no
timing inside a trace (`pick`).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

import torch

from pipeline.errors import ConfigError

_MODES = ("auto", "triton", "ref")
_warned: set[str] = set()
_triton_error: str | None = None
_triton_checked = False


def mode() -> str:
    """The requested mode, validated: 'auto', 'triton' or 'ref'."""
    value = os.environ.get("EQRECON_KERNELS", "").strip().lower() or "auto"
    if value not in _MODES:
        raise ConfigError(f"EQRECON_KERNELS={value!r} is not one of triton|ref (or unset for auto)")
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
            warn_once(
                "triton is in interpreter mode (TRITON_INTERPRET=1): CUDA kernels run interpreted, slowly"
            )
        return True
    if on_cuda:
        return True
    why = "was set after triton was first imported" if interpret_requested() else "is not 1"
    warn_once(
        f"EQRECON_KERNELS=triton but the tensors are on the CPU and TRITON_INTERPRET {why}; falling back "
        "to the PyTorch reference kernels (set TRITON_INTERPRET=1 before starting Python to run Triton on CPU)"
    )
    return False


def pick(
    op: str,
    key: tuple,
    make_candidates: Callable[[], dict[str, Callable[[], object]]],
    *tensors: torch.Tensor,
) -> str:
    """Which implementation of `op` runs for these inputs: 'triton', 'ref', or in auto mode on CUDA
    the fastest of `make_candidates()` (name -> a no-argument fwd+bwd run), timed once per `key`.

    The candidates are the PyTorch alternatives and 'triton'; they are built only when timed.
    """
    requested = mode()
    if requested != "auto" or not all(t.is_cuda for t in tensors):
        return "triton" if use_triton(*tensors) else "ref"
    without_triton = triton_import_error() is not None
    if torch.compiler.is_compiling() and key not in _choices:
        return "ref" if without_triton else "triton"  # no timing inside a torch.compile trace
    if without_triton and key not in _choices:
        use_triton(*tensors)  # the one warning about the missing triton
    return auto_choice(op, key, make_candidates, without_triton)


_choices: dict[tuple, dict] = {}


def auto_choice(
    op: str,
    key: tuple,
    make_candidates: Callable[[], dict[str, Callable[[], object]]],
    without_triton: bool = False,
) -> str:
    """The fastest candidate's name for `key`, timed with `time_ms` on the first call only."""
    if key not in _choices:
        candidates = make_candidates()
        if without_triton:
            candidates.pop("triton", None)
        _choices[key] = _time_candidates(op, key, candidates)
    return _choices[key]["chosen"]


def choices() -> dict[str, dict]:
    """Every auto-mode choice so far: '<op> <dtype> <shape>' -> {'chosen': name, 'ms': {name: ms}}."""
    return {" ".join(map(str, key)): dict(value) for key, value in _choices.items()}


def time_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn on CUDA (warm-up first, synchronised); tests replace it with a fake."""
    for _ in range(3):  # compilation, autotuning, allocator
        fn()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _time_candidates(op: str, key: tuple, candidates: dict[str, Callable[[], object]]) -> dict:
    ms: dict[str, float | None] = {}
    failed: dict[str, str] = {}
    for name, fn in candidates.items():
        try:
            ms[name] = time_ms(fn)
        except (RuntimeError, NotImplementedError) as exc:  # an SDPA backend refusing the shape, say
            ms[name] = None
            failed[name] = f"{type(exc).__name__}: {str(exc)[:100]}"
    timed = {n: t for n, t in ms.items() if t is not None}
    chosen = min(timed, key=timed.get) if timed else "ref"
    if _is_rank0():
        listed = ", ".join(
            f"{n} {t:.3f} ms" if t is not None else f"{n} failed ({failed[n]})" for n, t in ms.items()
        )
        print(
            f"eqrecon.kernels: {' '.join(map(str, key))} -> {chosen} ({listed})", file=sys.stderr, flush=True
        )
    return {"chosen": chosen, "ms": ms}


_compiled: dict = {}


def kernel_for(
    fn,
    configs: list | None = None,
    key: list[str] | None = None,
    prune=None,
    reset_to_zero: list[str] | None = None,
):
    """The Triton kernel `fn` (a plain Python function) made launchable.

    A compiled JITFunction (autotuned over `configs` keyed on `key` when given, `prune` choosing the
    candidates for each call's arguments before anything compiles, `reset_to_zero` naming outputs that
    are accumulated into), or the interpreter when triton itself is in interpreter mode. Wrapping lazily here, rather than with `@triton.jit`
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
                pruning = {"early_config_prune": prune} if prune is not None else None
                kernel = triton.autotune(
                    configs=configs, key=key or [], prune_configs_by=pruning, reset_to_zero=reset_to_zero
                )(kernel)
        _compiled[cache_key] = kernel
    return _compiled[cache_key]
