"""Timing helpers shared by the benchmarks: warm-up, alternation, medians, and where results go."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_at_start": load,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def time_alternating(functions: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn so that load changes hit all alike."""
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def write_result(name: str, result: dict, device: torch.device | None = None) -> Path:
    """benchmarks/results/<name>.json; a run on another device than the CPU writes <name>_<device type>.json,
    so that GPU and CPU results sit side by side."""
    if device is not None and device.type != "cpu":
        name = f"{name}_{device.type}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def add_device_arguments(parser) -> None:
    """--threads and --device, shared by the speed benchmarks (vs_diffusers, sampling, resolution)."""
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (on CUDA the models run in bf16 autocast)")


def setup_device(args) -> torch.device:
    """Apply --threads and check --device; returns the device."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the speed a GPU user would get); full fp32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def peak_memory(fn, device: torch.device) -> int:
    """Peak bytes of tensor memory allocated while fn() runs, above what was allocated before it.

    On CUDA, the caching allocator's own peak counter. On the CPU there is no such counter, and neither
    RSS (the C allocator keeps freed pages for reuse) nor tracemalloc (it does not see torch's allocator)
    measures it, so torch's profiler records every allocation and free of the CPU allocator
    (profile_memory=True) and the running sum of their sizes is followed to its maximum.
    """
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch._C._profiler import _ExtraFields_Allocation  # the profiler's raw allocation records

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    events = walk(prof.profiler.kineto_results.experimental_event_tree())
    allocations = sorted((e for e in events if isinstance(e.extra_fields, _ExtraFields_Allocation)
                          and e.extra_fields.device.type == "cpu"), key=lambda e: e.start_time_ns)
    live = peak = 0
    for event in allocations:
        live += event.extra_fields.alloc_size  # negative for a free
        peak = max(peak, live)
    return peak


def interleaved_samples(functions: dict, repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds of each call of each function, calling them in turn; the order turns by one each round, so that
    no function always runs right after the same other one (the call after a large model's can find the caches
    and the allocator's free memory in a different state). Sample i of every function comes from round i."""
    names = list(functions)
    for fn in functions.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            functions[name]()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return samples


def time_interleaved(functions: dict, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, from interleaved_samples."""
    return {name: statistics.median(values) for name, values in interleaved_samples(functions, repeats, warmup).items()}


def paired_ratios(samples: dict[str, list[float]], baseline: str) -> dict[str, float]:
    """Median over rounds of each function's time / the baseline's time in the same round.

    Each ratio compares two calls made a moment apart, so a change of load on a shared machine (another job
    starting on the other core) moves both; the median of these is steadier than a ratio of medians."""
    return {name: statistics.median(a / b for a, b in zip(values, samples[baseline]))
            for name, values in samples.items() if name != baseline}


def git_commit() -> dict | None:
    """The commit measured, and whether minildm/ had uncommitted changes (None outside a git checkout)."""
    root = Path(__file__).parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        status = subprocess.run(["git", "status", "--porcelain", "minildm"], cwd=root, capture_output=True,
                                text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"commit": commit.stdout.strip(), "minildm_modified": bool(status.stdout.strip())}
