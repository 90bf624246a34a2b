"""Training-step throughput per method: samples/s, the step's time split, MFU and peak memory.

    python -m bench.step [--presets demo,demo-vicreg,...] [--device auto|cpu|cuda] [--steps N]
        [--warmup N] [--sources synthetic,loader] [--modes eager,compiled] [--data DIR] [--out DIR]
        [--section.field=value ...]

Each preset is one method. Its step is `train.loop.train_step` (the trainer's own step: forward,
backward, grad clipping, optimizer, schedule; bf16 autocast on CUDA) fed two ways:

    synthetic  random Batches already on the device: the model's ceiling, no input pipeline
    loader     the configured loader (`data.loader`, DALI by default) over the shards: what a run gets

Modes, side by side in the same process and from the same initial weights:

    eager      the method as built
    compiled   the method compiled as the trainer compiles it for one process (train/compile.py,
               `--run.compile=true`), timed on synthetic batches only (the loader's cost does not
               depend on the model). Compilation happens in the first warm-up step; that step's time
               minus a timed step's is reported as compile_s, apart from the timed steps.

Per step the clock is read (after synchronising CUDA) when the batch arrives ("data"), after the
forward, after the backward (incl. clipping) and after the optimizer, so the phases add up to the step.
FLOPs per step are counted once with torch's FlopCounterMode (forward + backward); MFU = FLOPs per
step / synthetic step time / peak, where peak is the GPU's dense bf16 datasheet figure, or on a CPU
the fp32 matmul throughput measured in this process (the JSON names which). Peak memory is
torch.cuda.max_memory_allocated on CUDA, and on a CPU the process's peak RSS (VmHWM, reset per
method; it includes the libraries, ~1 GB).

Defaults, chosen so that a bare `python -m bench.step` measures something real on either device:
on CUDA the vits16-* presets at batch 256 (one GPU's share of the paper's 2048 on 8) on synthetic
batches only (the loader source needs a real dataset, --data: the 64 demo photos cannot fill a
batch of 256); on a CPU the demo-* presets at their own batch, synthetic and over the demo shards.

Each preset's result is written as soon as it is measured, to bench/results/step-<preset>-<device>.json
(and --out DIR), so a run cut short keeps what finished; the whole run then goes to step-<device>.json.
Summary (docs/DESIGN.md): samples_per_s.<method> and mfu.<method> from synthetic batches,
loader_samples_per_s.<method> from the loader, peak_mem_gb.<method> (the larger of the two); with
the compiled mode compiled_samples_per_s.<method>, compile_speedup.<method> (compiled / eager
samples/s, synthetic batches) and compile_s.<method>.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/step.py` from anywhere

import torch
from torch.utils.flop_counter import FlopCounterMode

import kernels
from bench._provenance import write_result
from model import build_method
from pipeline import build_loader, resolve_data_dir
from pipeline.batch import Batch
from pipeline.multicrop import sample_masks, with_multicrop
from pipeline.path import THETA_DIM
from train.compile import wrap_compiled
from train.config import Config, to_dict
from train.loop import seed_all, set_cpu_threads, train_step
from train.optim import build_optimizer
from train.recipes import load_config
from train.schedules import Schedules, build_scheduler, total_steps

CPU_PRESETS = ("demo", "demo-xattn-path", "demo-vicreg", "demo-sie", "demo-xattn")
GPU_PRESETS = ("vits16-path", "vits16-xattn-path", "vits16-vicreg", "vits16-sie", "vits16-xattn")
# Dense bf16 tensor-core peaks from the datasheets (FLOP/s), matched on the device name.
GPU_PEAK_BF16 = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("4090", 165e12),
    ("A10", 125e12),
)
PHASES = ("data", "forward", "backward", "optimizer")
MODES = ("eager", "compiled")


def synthetic_batches(cfg: Config, device: torch.device, n: int = 2) -> list[Batch]:
    """n random Batches with the shapes the loader would give (B = the global batch, one process)."""
    d, g = cfg.data, torch.Generator(device="cpu").manual_seed(0)
    b, h, k, ht = d.batch_size, d.img_size, d.aug.k, d.out_target_size

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    def batch(i: int) -> Batch:
        out = Batch(
            rand(b, 3, h, h),
            rand(b, 3, h, h),
            rand(b, k, 3, ht, ht),
            rand(b, THETA_DIM),
            torch.full((b,), -1, dtype=torch.long, device=device),
        )
        mc = d.multicrop
        if not mc.enabled:
            return out
        # the DINO family's crops: L local crops and iBOT's masks, drawn as the loader draws them
        masks = (
            torch.stack([sample_masks(mc, "bench", i, j) for j in range(b)]).to(device) if mc.masks else None
        )
        return with_multicrop(out, rand(b, mc.n_local, 3, mc.local_size, mc.local_size), masks)

    return [batch(i) for i in range(n)]


def endless(loader):
    """The loader's batches across epoch boundaries (epoch restarts are part of the data time)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_BF16:
            if key in name:
                return flops, f"datasheet dense bf16 ({key})"
        return float("nan"), f"unknown GPU {name!r}: no datasheet peak"
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(10):  # the best of 10: a shared CPU is slow only some of the time
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 2048**3 / best, "measured fp32 2048^3 matmul on this CPU (best of 10), with the step's threads"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        except OSError:
            pass


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    return float("nan")


def time_steps(method, batches, cfg: Config, device: torch.device, warmup: int, steps: int) -> dict:
    """Run warmup + steps train_steps; -> per-phase mean ms, step ms, samples/s, peak memory."""
    optimizer = build_optimizer(cfg.optim, method, cfg.data.batch_size, device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.data.batch_size, 1000)
    # The DINO family's teacher update is timed too, and the prototype layer's update (frozen only in
    # the first epoch of a run): the steady state.
    unfrozen = copy.deepcopy(cfg)
    unfrozen.optim.teacher.freeze_last_layer_epochs = 0.0
    schedules = Schedules(unfrozen, 1000, total_steps(cfg.optim, 1000))
    amp = device.type == "cuda" and cfg.run.amp == "bf16"
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {p: [] for p in PHASES}
    reset_peak_memory(device)
    marks: list[float] = []

    def mark(_phase: str) -> None:
        sync()
        marks.append(time.perf_counter())

    first_step_s = float("nan")
    for i in range(warmup + steps):
        marks.clear()
        mark("start")
        batch = next(batches)
        mark("data")
        train_step(
            method,
            batch,
            optimizer,
            scheduler,
            step=i,
            clip_grad=cfg.optim.clip_grad,
            amp=amp,
            mark=mark,
            schedules=schedules,
        )
        if i == 0:
            first_step_s = marks[-1] - marks[0]  # a compiled method compiles here
        if i >= warmup:
            for phase, t0, t1 in zip(PHASES, marks, marks[1:]):
                times[phase].append(1e3 * (t1 - t0))
    step_ms = [sum(parts) for parts in zip(*times.values())]
    return {
        "step_ms": statistics.mean(step_ms),
        "step_ms_median": statistics.median(step_ms),
        **{f"{p}_ms": statistics.mean(v) for p, v in times.items()},
        "samples_per_s": cfg.data.batch_size / (statistics.mean(step_ms) / 1e3),
        "peak_mem_gb": peak_memory_gb(device),
        "first_step_s": first_step_s,
    }


def count_flops(method, batch: Batch, cfg: Config, device: torch.device) -> float:
    amp = device.type == "cuda" and cfg.run.amp == "bf16"
    args = Schedules(cfg, 1000, total_steps(cfg.optim, 1000)).forward_args(method, 0)
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = method(batch, **args)["loss"]
        loss.backward()
    method.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_preset(
    preset: str,
    overrides: list[str],
    sources: list[str],
    device: torch.device,
    warmup: int,
    steps: int,
    peak: float,
    modes: tuple[str, ...] = ("eager",),
) -> list[dict]:
    """Rows for `preset`: every source in eager mode, then synthetic batches compiled (see `MODES`)."""
    cfg = load_config(preset, overrides)
    set_cpu_threads(cfg, device)  # as the trainer does
    seed_all(cfg.run.seed)
    method = build_method(cfg.model, cfg.data).to(device).train()
    batches = synthetic_batches(cfg, device)
    flops = count_flops(method, batches[0], cfg, device)
    rows = []
    for mode in modes:
        if mode == "compiled":
            del method  # its memory is not the compiled run's
            torch._dynamo.reset()  # compiled code is cached per code object, up to a recompile limit
            seed_all(cfg.run.seed)  # the eager method's initial weights
            method = build_method(cfg.model, cfg.data).to(device).train()
            method = wrap_compiled(method, cfg.dist, "true", device, 1, amp=False)
        rows += _time_sources(preset, cfg, method, batches, sources, mode, device, warmup, steps, flops, peak)
    return rows


def _time_sources(preset, cfg, method, batches, sources, mode, device, warmup, steps, flops, peak) -> list:
    rows = []
    for source in sources if mode == "eager" else [s for s in sources if s == "synthetic"]:
        if source == "synthetic":
            stream = (batches[i % len(batches)] for i in range(10**9))
        else:
            cfg.data.dir = str(resolve_data_dir(cfg.data))
            stream = endless(build_loader(cfg.data, 0, 1, device))
        result = time_steps(method, stream, cfg, device, warmup, steps)
        mfu = flops / (result["step_ms"] / 1e3) / peak
        compiled = mode == "compiled"
        rows.append(
            {
                "preset": preset,
                "method": method_label(cfg),
                "source": source,
                "mode": mode,
                # the first step's extra time over a timed step: dynamo + inductor (+ autotuning on CUDA)
                "compile_s": result["first_step_s"] - result["step_ms"] / 1e3 if compiled else None,
                "loader": cfg.data.loader if source == "loader" else None,
                "batch_size": cfg.data.batch_size,
                "img_size": cfg.data.img_size,
                "k": cfg.data.aug.k,
                "backbone": cfg.model.backbone,
                "dtype": "bf16" if device.type == "cuda" and cfg.run.amp == "bf16" else "fp32",
                "flops_per_step": flops,
                "mfu": mfu,
                **result,
            }
        )
        compile_note = f"  compile {rows[-1]['compile_s']:.1f} s" if compiled else ""
        print(
            f"{preset:14s} {source:9s} {mode:8s} {result['samples_per_s']:9.1f} samples/s  step {result['step_ms']:8.1f} ms "
            f"(data {result['data_ms']:.1f}, fwd {result['forward_ms']:.1f}, bwd {result['backward_ms']:.1f}, "
            f"opt {result['optimizer_ms']:.1f})  mfu {mfu:.3f}  peak {result['peak_mem_gb']:.2f} GB{compile_note}",
            flush=True,
        )
    return rows


def method_label(cfg: Config) -> str:
    """The summary's method name: the family alone without an equivariant part (vicreg, ibot), the
    part alone beside VICReg (path), family+part otherwise (ibot+path)."""
    family, part = cfg.model.family, cfg.model.method
    return family if part == "none" else part if family == "vicreg" else f"{family}+{part}"


def resolve_defaults(
    args, overrides: list[str], cuda: bool
) -> tuple[list[str], list[str], int, int, list[str]]:
    """(presets, sources, steps, warmup, overrides) after the device's defaults (see the docstring)."""
    presets = args.presets.split(",") if args.presets else list(GPU_PRESETS if cuda else CPU_PRESETS)
    steps, warmup = args.steps or (20 if cuda else 5), args.warmup or (5 if cuda else 2)
    sources = (args.sources or ("synthetic" if cuda and not args.data else "synthetic,loader")).split(",")
    overrides = list(overrides)
    if args.data:
        overrides.append(f"--data.dir={args.data}")
    if cuda and not any(o.startswith("--data.batch_size") for o in overrides):
        overrides.insert(0, "--data.batch_size=256")  # one GPU's share of the paper's 2048 on 8 GPUs
    return presets, sources, steps, warmup, overrides


def parse(argv: list[str]):
    """(args, overrides): the bench's own flags, and --section.field=value overrides for the presets."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="", help="comma list (default: vits16-* on CUDA, demo-* on CPU)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--steps", type=int, default=0, help="timed steps per source (default: 20 GPU, 5 CPU)"
    )
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps first (default: 5 GPU, 2 CPU)")
    parser.add_argument(
        "--sources",
        default="",
        help="synthetic,loader (default: synthetic on CUDA unless --data is given; both on a CPU)",
    )
    parser.add_argument(
        "--modes",
        default="eager,compiled",
        help="eager,compiled: the method as built and torch.compile'd, side by side (compiled: synthetic only)",
    )
    parser.add_argument("--data", default="", help="shard folder for the loader (default: the demo photos)")
    parser.add_argument("--out", default=None, help="folder to write the result JSONs into as well")
    return parser.parse_known_args(argv)


def main(argv: list[str]) -> int:
    args, overrides = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible", file=sys.stderr)
        return 2
    cuda = args.device != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    presets, sources, steps, warmup, overrides = resolve_defaults(args, overrides, cuda)
    for source in sources:
        if source not in ("synthetic", "loader"):
            print(
                f"error: --sources: unknown source {source!r}; choose from synthetic, loader", file=sys.stderr
            )
            return 2
    modes = tuple(args.modes.split(","))
    if not modes or not set(modes) <= set(MODES):
        print(f"error: --modes {args.modes!r}: choose from {', '.join(MODES)}", file=sys.stderr)
        return 2
    set_cpu_threads(load_config(presets[0], overrides), device)  # the peak with the threads the steps get
    peak, peak_source = peak_flops(device)
    config = {
        "presets": presets,
        "overrides": overrides,
        "sources": sources,
        "modes": list(modes),
        "steps": steps,
        "warmup": warmup,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "torch_threads": torch.get_num_threads(),
    }
    rows = []
    for preset in presets:
        preset_rows = bench_preset(preset, overrides, sources, device, warmup, steps, peak, modes)
        rows += preset_rows
        done = {**config, "presets": [preset], "resolved": {preset: to_dict(load_config(preset, overrides))}}
        print(
            f"wrote {write_result(f'step-{preset}', done, preset_rows, summarise(preset_rows), device, args.out)}"
        )
    config.update(
        load_average_at_end=os.getloadavg(),
        kernel_choices=kernels.choices(),
        resolved={p: to_dict(load_config(p, overrides)) for p in presets},
    )
    path = write_result("step", config, rows, summarise(rows), device=device, out=args.out)
    print(f"wrote {path}")
    return 0


def summarise(rows: list[dict]) -> dict:
    """samples_per_s / mfu / loader_samples_per_s / peak_mem_gb per method (docs/DESIGN.md), and for
    the compiled mode compiled_samples_per_s / compile_speedup (compiled over eager) / compile_s."""
    summary = {}
    for row in rows:
        m = row["method"]
        if row.get("mode") == "compiled":
            summary[f"compiled_samples_per_s.{m}"] = row["samples_per_s"]
            summary[f"compile_s.{m}"] = row["compile_s"]
        elif row["source"] == "synthetic":
            summary[f"samples_per_s.{m}"], summary[f"mfu.{m}"] = row["samples_per_s"], row["mfu"]
        else:
            summary[f"loader_samples_per_s.{m}"] = row["samples_per_s"]
        summary[f"peak_mem_gb.{m}"] = max(summary.get(f"peak_mem_gb.{m}", 0.0), row["peak_mem_gb"])
    for key in [k for k in summary if k.startswith("compiled_samples_per_s.")]:
        m = key.split(".", 1)[1]
        if f"samples_per_s.{m}" in summary:
            summary[f"compile_speedup.{m}"] = summary[key] / summary[f"samples_per_s.{m}"]
    return summary


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
