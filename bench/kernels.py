"""Benchmark the Triton kernels against their strongest baselines, in one process.

    python -m bench.kernels [--preset vits16-xattn-path] [--out DIR]   # CUDA: bf16, per-GPU batch 256
    python -m bench.kernels --device cpu --preset demo-xattn-path --batch 1    # CPU: Triton in its interpreter

The shapes are the preset's decoder at training time (`decoder_shapes`): for vits16-xattn-path's
xattn-path decoder (width 192 = 3 heads × 64, 14×14 tokens, K = 2 path steps) the cross-attention
block's packed K·196 = 392 queries × 392 keys (both views' tokens) and the self-attention blocks'
196 × 196 per (image, step). Cross-attention runs Triton against every SDPA backend that accepts
the shapes, the eager reference and `torch.compile` of it; self-attention is SDPA's (what the decoder
calls), timed against Triton for the record; the pixel-MSE loss (B, K, N, P) and its fused pixel-head
variant against eager and compiled references. Forward, backward (fwd+bwd − fwd) and fwd+bwd: median
time, GB/s over the fewest bytes each pass must move, fraction of the measured roofline, peak memory
(CUDA). Writes bench/results/kernels-<device>.json (docs/DESIGN.md; also into --out) and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument(
        "--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument(
        "--target-dtype",
        default="fp32",
        choices=["bf16", "fp16", "fp32"],
        help="dtype of the reconstruction targets (the pipeline delivers fp32)",
    )
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch; default 256 on CUDA, 2 on CPU")
    p.add_argument("--norm-pix", action="store_true", help="per-patch normalised targets")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    p.add_argument("--reps", type=int, default=5, help="CPU timing repetitions (CUDA uses do_bench)")
    p.add_argument(
        "--preset", default="vits16-xattn-path", help="the training preset whose decoder shapes are timed"
    )
    p.add_argument("--out", default=None, help="folder to write the result JSON into as well")
    return p.parse_args(argv)


def decoder_shapes(preset: str, batch: int) -> dict:
    """The kernels' shapes when `preset` trains at per-GPU `batch` (its xattn or xattn-path decoder).

    -> {"xattn": (B, H, Nq, Nk, D), "self_attn": (B·K, H, N, N, D), "recon": (B, K, N, P), "width": C}
    """
    from train.recipes import load_config

    cfg = load_config(preset, [])
    m, d = cfg.model, cfg.data
    if m.decoder not in ("xattn", "xattn-path"):
        raise SystemExit(
            f"bench.kernels: preset {preset!r} has decoder {m.decoder!r}; pick one with xattn or xattn-path"
        )
    grid = d.img_size // m.patch_size
    n, k = grid * grid, (d.aug.k if m.decoder == "xattn-path" else 1)
    heads, head_d = m.dec_heads, m.dec_width // m.dec_heads
    n_k = 2 * n if m.decoder == "xattn-path" else n  # xattn-path: K/V = both views' tokens
    patch = d.out_target_size // grid
    return {
        "xattn": (batch, heads, k * n, n_k, head_d),
        "self_attn": (batch * k, heads, n, n, head_d),
        "recon": (batch, k, n, patch * patch * 3),
        "width": m.dec_width,
    }


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------
# Timing, memory and ceilings
# ---------------------------------------------------------------------------------------------


def _median_ms(fn: Callable, device: torch.device, reps: int) -> float:
    """Median wall time of fn in ms, after warm-up, synchronised (do_bench's events on CUDA)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up: compilation, allocator, caches
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _peak_mb(fn: Callable, device: torch.device) -> float | None:
    """Peak memory allocated by one call of fn above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _ceilings(device: torch.device, dtype: torch.dtype, reps: int) -> dict:
    """Measured memory bandwidth (a large copy, bytes read + written) and matmul rate on this device."""
    n_bytes = 2**30 if device.type == "cuda" else 2**27
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src), device, reps)
    src = dst = None  # free the buffers before the matmul
    m = 8192 if device.type == "cuda" else 1024
    a = torch.randn(m, m, device=device, dtype=dtype)
    b = torch.randn(m, m, device=device, dtype=dtype)
    mm_ms = _median_ms(lambda: a @ b, device, reps)
    return {"copy_gb_per_s": 2 * n_bytes / copy_ms / 1e6, "matmul_tflops": 2 * m**3 / mm_ms / 1e9}


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _time_impl(
    fn: Callable, inputs: list, extra: tuple, grad_out: Callable, device: torch.device, reps: int
) -> tuple[dict, float | None]:
    """({pass: ms}, peak MB of fwd+bwd) for one implementation; gradients by autograd.grad (no .grad
    accumulation inside the timed region)."""

    def fwd():
        return fn(*inputs, *extra)

    g = grad_out(fwd())

    def fwd_bwd():
        return torch.autograd.grad(fn(*inputs, *extra), inputs, g)

    fwd_bwd()  # compile/autotune both directions before timing
    times = {"fwd": _median_ms(fwd, device, reps), "fwd+bwd": _median_ms(fwd_bwd, device, reps)}
    bwd = times["fwd+bwd"] - times["fwd"]
    times["bwd"] = bwd if bwd > 0 else None  # None: the difference is below the timing noise
    return times, _peak_mb(fwd_bwd, device)


def _measure(
    op: str,
    impls: dict,
    inputs: list,
    extra: tuple,
    grad_out: Callable,
    passes: dict,
    device: torch.device,
    reps: int,
    ceil: dict,
) -> list[dict]:
    """Rows for every implementation of one op: fwd, bwd (= fwd+bwd − fwd) and fwd+bwd."""
    rows = []
    for impl, fn in impls.items():
        row_base = {"op": op, "impl": impl}
        try:
            times, peak = _time_impl(fn, inputs, extra, grad_out, device, reps)
        except Exception as exc:  # noqa: BLE001  (a backend that rejects these shapes is a result, not a crash)
            rows.append({**row_base, "pass": "fwd+bwd", "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            continue
        for name in ("fwd", "bwd", "fwd+bwd"):
            n_bytes, flops = passes[name]
            if times[name] is None:
                rows.append(
                    {**row_base, "pass": name, "ms": None, "note": "fwd+bwd − fwd below timing noise"}
                )
                continue
            floor_ms = max(n_bytes / ceil["copy_gb_per_s"] / 1e6, flops / ceil["matmul_tflops"] / 1e9)
            rows.append({
                **row_base, "pass": name, "ms": round(times[name], 4),
                "gb_per_s": _sig(n_bytes / times[name] / 1e6) if times[name] > 0 else None,
                "tflops": _sig(flops / times[name] / 1e9) if times[name] > 0 and flops else None,
                "roofline_fraction": _sig(floor_ms / times[name]) if times[name] > 0 else None,
                "peak_mem_mb": round(peak, 1) if peak is not None and name == "fwd+bwd" else None,
                "bytes": n_bytes, "flops": flops,
            })  # fmt: skip
    return rows


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _bench_xattn(kernels, shape, dtype, device, reps, ceil, compile_refs, op="xattn") -> list[dict]:
    from torch.nn.attention import SDPBackend

    b, h, n_q, n_k, d = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(device, dtype) for n in (n_q, n_k, n_k))
    inputs = _leaves(q, k, v)
    es = torch.finfo(dtype).bits // 8
    q_b, kv_b = b * h * n_q * d * es, b * h * n_k * d * es
    mm = 2 * b * h * n_q * n_k * d  # one (Nq × D) · (D × Nk) product
    passes = {
        "fwd": (2 * q_b + 2 * kv_b, 2 * mm),  # read q, k, v; write out
        "bwd": (4 * q_b + 4 * kv_b, 4 * mm),  # read q, k, v, out, dout; write dq, dk, dv (no recompute)
    }
    passes["fwd+bwd"] = tuple(a + c for a, c in zip(passes["fwd"], passes["bwd"]))
    impls = {"triton": kernels.cross_attention}
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ):
        impls[f"sdpa-{backend.name.lower()}"] = _sdpa(backend)
    impls["eager"] = kernels.cross_attention_ref
    if compile_refs:
        impls["compile"] = torch.compile(kernels.cross_attention_ref)
    return _measure(op, impls, inputs, (), lambda out: torch.randn_like(out), passes, device, reps, ceil)


def _bench_recon(
    kernels, shape, dtype, target_dtype, norm_pix, device, reps, ceil, compile_refs
) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(1)
    pred = torch.randn(shape, generator=g).to(device, dtype)
    target = torch.randn(shape, generator=g).to(device, target_dtype)
    n, es, et = pred.numel(), pred.element_size(), target.element_size()
    passes = {"fwd": (n * (es + et), 0), "bwd": (n * es, 0), "fwd+bwd": (n * (2 * es + et), 0)}
    b, k, n, p = shape
    grid, patch = math.isqrt(n), math.isqrt(p // 3)
    images = torch.randn(b, k, 3, grid * patch, grid * patch, generator=g).to(device, target_dtype)

    def from_images(pred, _target, norm_pix):  # the targets as the pipeline delivers them, read in place
        return kernels.recon_loss(pred, images, norm_pix)

    impls = {
        "triton": kernels.recon_loss,
        "triton-image-targets": from_images,
        "eager": kernels.recon_loss_ref,
    }
    if compile_refs:
        impls["compile"] = torch.compile(kernels.recon_loss_ref)
    return _measure(
        "recon",
        impls,
        _leaves(pred),
        (target, norm_pix),
        lambda out: torch.ones_like(out),
        passes,
        device,
        reps,
        ceil,
    )


def _bench_recon_linear(
    kernels, shape, width, dtype, target_dtype, norm_pix, device, reps, ceil, compile_refs
) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(2)
    *lead, p = shape
    hidden = torch.randn(*lead, width, generator=g).to(device, dtype)
    weight = (torch.randn(p, width, generator=g) / math.sqrt(width)).to(device, dtype)
    bias = torch.zeros(p).to(device, dtype)
    target = torch.randn(shape, generator=g).to(device, target_dtype)
    rows, es, et = math.prod(lead), hidden.element_size(), target.element_size()
    h_b, w_b, t_b = rows * width * es, p * width * es, rows * p * et
    mm = 2 * rows * width * p
    passes = {  # the fused ideal: pred never reaches memory
        "fwd": (h_b + w_b + t_b, mm),
        "bwd": (h_b + w_b, 2 * mm),
        "fwd+bwd": (2 * h_b + 2 * w_b + t_b, 3 * mm),
    }

    def unfused(hidden, weight, bias, target, norm_pix):
        return kernels.recon_loss(F.linear(hidden, weight, bias), target, norm_pix)

    impls = {
        "triton-fused": kernels.recon_loss_linear,
        "triton-unfused": unfused,
        "eager": kernels.recon_loss_linear_ref,
    }
    if compile_refs:
        impls["compile"] = torch.compile(kernels.recon_loss_linear_ref)
    return _measure(
        "recon_linear",
        impls,
        _leaves(hidden, weight, bias),
        (target, norm_pix),
        lambda out: torch.ones_like(out),
        passes,
        device,
        reps,
        ceil,
    )


# ---------------------------------------------------------------------------------------------
# Summary and report
# ---------------------------------------------------------------------------------------------


def _time(rows, op, impl, name="fwd+bwd"):
    for r in rows:
        if r["op"] == op and r["impl"] == impl and r["pass"] == name and r.get("ms") is not None:
            return r
    return None


def _ratio(a, b):
    return _sig(a / b) if a is not None and b else None


def _summary(rows: list[dict]) -> dict:
    out: dict = {}
    for op in ("xattn", "self_attn"):
        tri = _time(rows, op, "triton")
        sdpa = [
            r
            for r in rows
            if r["op"] == op
            and r["impl"].startswith("sdpa-")
            and r["pass"] == "fwd+bwd"
            and r.get("ms") is not None
        ]
        best = min(sdpa, key=lambda r: r["ms"]) if sdpa else None
        out[f"{op}_speedup_vs_sdpa"] = _ratio(best and best["ms"], tri and tri["ms"])
        out[f"{op}_best_sdpa_backend"] = best and best["impl"]
        out[f"{op}_roofline_fraction"] = tri and tri["roofline_fraction"]
    for op, impl, prefix in (("recon", "triton", "recon"), ("recon_linear", "triton-fused", "recon_linear")):
        mine = _time(rows, op, impl)
        eager, comp = _time(rows, op, "eager"), _time(rows, op, "compile")
        out[f"{prefix}_speedup_vs_eager"] = _ratio(eager and eager["ms"], mine and mine["ms"])
        out[f"{prefix}_speedup_vs_compile"] = _ratio(comp and comp["ms"], mine and mine["ms"])
        out[f"{prefix}_peak_mem_vs_eager"] = _ratio(
            mine and mine["peak_mem_mb"], eager and eager["peak_mem_mb"]
        )
    return out


def _table(rows: list[dict]) -> str:
    lines = [
        "| op | impl | fwd ms | bwd ms | fwd+bwd ms | fwd+bwd GB/s | roofline | peak MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    seen = []
    for r in rows:
        if (r["op"], r["impl"]) not in seen:
            seen.append((r["op"], r["impl"]))
    for op, impl in seen:
        fb = _time(rows, op, impl)
        if fb is None:
            err = next(r["error"] for r in rows if r["op"] == op and r["impl"] == impl)
            lines.append(f"| {op} | {impl} | — | — | — | — | — | {err[:60]} |")
            continue
        f, b = _time(rows, op, impl, "fwd"), _time(rows, op, impl, "bwd")
        b_ms = f"{b['ms']:.3f}" if b else "noise"
        lines.append(
            f"| {op} | {impl} | {f['ms']:.3f} | {b_ms} | {fb['ms']:.3f} | {fb['gb_per_s']} | "
            f"{fb['roofline_fraction']} | {fb['peak_mem_mb'] if fb['peak_mem_mb'] is not None else '—'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = _args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench.kernels: --device cuda but no CUDA device is visible")
    if args.device == "cpu":
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("bench.kernels: --device cpu needs TRITON_INTERPRET=1 before triton is imported")
        os.environ["TRITON_INTERPRET"] = "1"  # the kernels run in Triton's interpreter on CPU
    os.environ["EQRECON_KERNELS"] = "triton"
    import kernels  # after the environment: triton fixes interpreter mode when first imported
    from bench._provenance import write_result

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    target_dtype = DTYPES[args.target_dtype]
    batch = args.batch or (256 if on_gpu else 2)
    shapes = decoder_shapes(args.preset, batch)
    xattn_shape, self_shape, recon_shape, width = (
        shapes["xattn"],
        shapes["self_attn"],
        shapes["recon"],
        shapes["width"],
    )
    torch.manual_seed(0)
    ceil = _ceilings(device, dtype, args.reps)
    compile_refs = not args.no_compile

    rows = _bench_xattn(kernels, xattn_shape, dtype, device, args.reps, ceil, compile_refs)
    rows += _bench_xattn(kernels, self_shape, dtype, device, args.reps, ceil, compile_refs, op="self_attn")
    rows += _bench_recon(
        kernels, recon_shape, dtype, target_dtype, args.norm_pix, device, args.reps, ceil, compile_refs
    )
    rows += _bench_recon_linear(
        kernels, recon_shape, width, dtype, target_dtype, args.norm_pix, device, args.reps, ceil, compile_refs
    )
    summary = _summary(rows)
    config = {
        "device": args.device, "dtype": str(dtype).removeprefix("torch."),
        "target_dtype": str(target_dtype).removeprefix("torch."), "norm_pix": args.norm_pix,
        "preset": args.preset, "batch": batch, "xattn_shape_B_H_Nq_Nk_D": list(xattn_shape),
        "self_attn_shape_BK_H_N_N_D": list(self_shape), "recon_shape_B_K_N_P": list(recon_shape),
        "recon_linear_width": width, "triton_interpreter": not on_gpu,
        "timing": "triton.testing.do_bench median (warmup 25 ms, rep 100 ms)" if on_gpu
        else f"median of {args.reps} perf_counter runs after one warm-up",
        "ceilings": {k: round(v, 2) for k, v in ceil.items()},
        "roofline": "floor = max(bytes / measured copy GB/s, flops / measured matmul TFLOP/s); bytes are the "
                    "fewest each pass must move (inputs read once, outputs written once)",
        "bwd": "fwd+bwd − fwd",
        "note": None if on_gpu else "CPU run: Triton kernels in the interpreter; proves the bench runs, "
                                     "not a performance figure",
    }  # fmt: skip
    path = write_result("kernels", config, rows, summary, device=device, out=args.out)
    print(_table(rows))
    print({k: v for k, v in summary.items()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
