"""Latency of ONNX Runtime against PyTorch eager on the same inputs.

Both engines get the same thread count, warm-up runs and inputs. The execution provider
a session actually uses is recorded; a requested provider that did not load is reported
in the row and the log, never hidden.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mmkd.config import input_names as config_input_names

logger = logging.getLogger(__name__)


def create_session(path: Path, providers: list[str], *, threads: int) -> tuple[ort.InferenceSession, dict]:
    """Open an ONNX Runtime session trying `providers` in order, CPU last.

    Returns:
        The session and a record of the providers requested, available, used, and
        every requested provider that was not used with the reason.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    available = ort.get_available_providers()
    requested_order = [p for p in providers if p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]
    unavailable = {p: "not in this onnxruntime build" for p in requested_order if p not in available}
    try_list = [p for p in requested_order if p in available]
    session = ort.InferenceSession(str(path), sess_options=options, providers=try_list)
    used = session.get_providers()
    not_loaded = dict(unavailable)
    for provider in try_list:
        if provider not in used:
            not_loaded[provider] = "failed to load (no device or missing libraries); ONNX Runtime fell back"
    for provider, reason in not_loaded.items():
        if provider in providers:
            logger.warning("ONNX Runtime provider %s was requested but %s; using %s", provider, reason, used[0])
    record = {"requested": list(providers), "available": available, "used": used[0], "not_loaded": not_loaded}
    return session, record


MIN_TIMED_CALLS = 5

GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def onnx_call(session: ort.InferenceSession, feed: dict[str, np.ndarray], *, io_binding: bool) -> Callable[[], object]:
    """Return a function that runs `session` once on `feed` and returns its outputs.

    With `io_binding`, the inputs are copied to the provider's device once, here, and the
    outputs stay there. A timed call then measures the model and not the copies between
    host and device, as PyTorch's timed calls start from tensors already on the device.
    """
    if not io_binding:
        return lambda: session.run(None, feed)
    device = "cuda" if session.get_providers()[0] in GPU_PROVIDERS else "cpu"
    binding = session.io_binding()
    for name, array in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, device, 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, device)

    def call() -> list[ort.OrtValue]:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding.get_outputs()

    return call


def _resident_kib() -> tuple[int, int] | None:
    """Return (peak, current) resident memory of this process in KiB, or None off Linux."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(fields["VmHWM"].split()[0]), int(fields["VmRSS"].split()[0])
    except (OSError, KeyError, ValueError):
        return None


class ResidentPeak:
    """Measures how far resident memory rises above its starting level inside a `with` block.

    Linux resets a process's peak resident size (VmHWM) when "5" is written to
    /proc/self/clear_refs, so the peak read at the end belongs to the block alone.
    `mib` stays None where that is not available.
    """

    def __init__(self) -> None:
        self.mib: float | None = None
        self._start_kib: int | None = None

    def __enter__(self) -> ResidentPeak:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return self
        resident = _resident_kib()
        self._start_kib = resident[1] if resident else None
        return self

    def __exit__(self, *exc_info: object) -> None:
        resident = _resident_kib()
        if self._start_kib is not None and resident is not None:
            self.mib = max(0, resident[0] - self._start_kib) / 1024


def time_calls(call: Callable[[], object], *, warmup: int, iterations: int, max_seconds: float | None = None) -> np.ndarray:
    """Return the wall-clock latency in milliseconds of up to `iterations` calls after `warmup` calls.

    With `max_seconds`, timing stops once the timed calls have taken that long and at least
    five were made, so a slow model at a large batch does not stall the benchmark. The
    row's `iterations` field gives how many were timed.
    """
    for _ in range(warmup):
        call()
    latencies = np.empty(iterations)
    spent = 0.0
    for i in range(iterations):
        started = time.perf_counter()
        call()
        latencies[i] = (time.perf_counter() - started) * 1000.0
        spent += latencies[i] / 1000.0
        if max_seconds is not None and spent >= max_seconds and i + 1 >= MIN_TIMED_CALLS:
            return latencies[: i + 1]
    return latencies


def summarise(latencies_ms: np.ndarray, batch_size: int) -> dict:
    """Return p50/p90/p99 latency and throughput in examples per second."""
    return {
        "p50_ms": float(np.percentile(latencies_ms, 50)),
        "p90_ms": float(np.percentile(latencies_ms, 90)),
        "p99_ms": float(np.percentile(latencies_ms, 99)),
        "mean_ms": float(latencies_ms.mean()),
        "throughput_per_s": float(batch_size * 1000.0 / latencies_ms.mean()),
        "iterations": int(latencies_ms.size),
    }


def _repeat_rows(inputs: tuple[torch.Tensor, ...], batch_size: int) -> tuple[torch.Tensor, ...]:
    """Return a batch of `batch_size` rows made of the real rows in `inputs`, repeated as needed."""
    index = torch.arange(batch_size) % len(inputs[0])
    return tuple(x[index].contiguous() for x in inputs)


def benchmark_onnx(
    name: str,
    onnx_path: Path,
    inputs: tuple[torch.Tensor, ...],
    *,
    batch_sizes: list[int],
    providers: list[str],
    threads: int,
    warmup: int,
    iterations: int,
    max_seconds: float | None = None,
    io_binding: str = "auto",
) -> list[dict]:
    """Time one ONNX model in ONNX Runtime at each batch size; one row per batch size.

    `io_binding` is "on", "off" or "auto" (on when the session runs on a GPU provider).
    """
    session, provider_record = create_session(onnx_path, providers, threads=threads)
    bound = io_binding == "on" or (io_binding == "auto" and provider_record["used"] in GPU_PROVIDERS)
    input_names = [i.name for i in session.get_inputs()]
    rows: list[dict] = []
    for batch_size in batch_sizes:
        batch = _repeat_rows(inputs, batch_size)
        feed = {n: x.numpy() for n, x in zip(input_names, batch, strict=True)}
        with ResidentPeak() as peak:
            onnx_ms = time_calls(onnx_call(session, feed, io_binding=bound), warmup=warmup, iterations=iterations,
                                 max_seconds=max_seconds)
        rows.append({
            "model": name, "engine": "onnxruntime", "provider": provider_record["used"],
            "batch_size": batch_size, **_lengths(batch, input_names),
            **summarise(onnx_ms, batch_size), "peak_mib": peak.mib, "io_binding": bound,
            "requested_providers": provider_record["requested"],
            "providers_not_loaded": provider_record["not_loaded"],
        })
        logger.info("%s batch %d: onnxruntime (%s) p50 %.3f ms", name, batch_size, provider_record["used"], rows[-1]["p50_ms"])
    return rows


def benchmark_model(
    name: str,
    model: torch.nn.Module,
    onnx_path: Path,
    inputs: tuple[torch.Tensor, ...],
    *,
    batch_sizes: list[int],
    providers: list[str],
    threads: int,
    warmup: int,
    iterations: int,
    max_seconds: float | None = None,
    torch_compile: bool = False,
    io_binding: str = "auto",
) -> list[dict]:
    """Time one model in ONNX Runtime and in PyTorch eager (and compiled) at each batch size.

    `inputs` are real rows in the model's positional order; a batch of size b repeats
    them as needed. PyTorch runs on CUDA when ONNX Runtime's session does. With
    `torch_compile`, rows of engine "pytorch-compile" time `torch.compile(model)` after
    its compilation, which happens in the warm-up; if compiling fails, the warning is
    logged and those rows are left out.
    """
    onnx_rows = benchmark_onnx(name, onnx_path, inputs, batch_sizes=batch_sizes, providers=providers,
                               threads=threads, warmup=warmup, iterations=iterations, max_seconds=max_seconds,
                               io_binding=io_binding)
    device = torch.device("cuda") if onnx_rows[0]["provider"] in GPU_PROVIDERS else torch.device("cpu")
    model = model.eval().to(device)
    engines = {"pytorch-eager": model}
    if torch_compile:
        engines["pytorch-compile"] = torch.compile(model)
    input_names = [*config_input_names(getattr(model, "modalities", [])), "mask"]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows: list[dict] = []
    try:
        for onnx_row, batch_size in zip(onnx_rows, batch_sizes, strict=True):
            batch = _repeat_rows(inputs, batch_size)
            torch_batch = tuple(x.to(device) for x in batch)

            rows.append(onnx_row)
            for engine, runnable in list(engines.items()):

                def torch_call(runnable=runnable) -> None:
                    with torch.inference_mode():
                        runnable(*torch_batch)
                    if device.type == "cuda":
                        torch.cuda.synchronize()

                try:
                    with ResidentPeak() as peak:
                        torch_ms = time_calls(torch_call, warmup=max(warmup, 1), iterations=iterations,
                                              max_seconds=max_seconds)
                except Exception as exc:  # noqa: BLE001 - compilers fail in many ways; eager rows still count
                    if engine == "pytorch-eager":
                        raise
                    logger.warning("%s: torch.compile failed at batch %d, so it is not timed: %s", name, batch_size, exc)
                    del engines[engine]
                    continue
                rows.append({
                    "model": name, "engine": engine, "provider": str(device),
                    "batch_size": batch_size, **_lengths(batch, input_names),
                    **summarise(torch_ms, batch_size), "peak_mib": peak.mib,
                })
                logger.info("%s batch %d: %s p50 %.3f ms", name, batch_size, engine, rows[-1]["p50_ms"])
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def _lengths(batch: tuple[torch.Tensor, ...], names: list[str]) -> dict[str, int | None]:
    """Return the batch's recording length in samples and text length in tokens (None without that input)."""
    shapes = {name: x.shape for name, x in zip(names, batch, strict=True)}
    return {"audio_samples": int(shapes["audio"][1]) if "audio" in shapes else None,
            "tokens": int(shapes["input_ids"][1]) if "input_ids" in shapes else None}
