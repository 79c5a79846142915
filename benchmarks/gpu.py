"""The GPU check: one script for a machine with one CUDA GPU, about 9 minutes on an H200.

    python -m benchmarks.gpu --glue-dir DIR [--model minilm] [--skip-run]

1. the GPU tests (`tests/test_gpu.py`; skipped on machines without CUDA, so CI never runs them);
2. MiniLM training throughput on the GPU, fp32 vs bf16 autocast, full fine-tuning and LoRA, batches
   of 32 (the presets') and 256: samples/s and the fraction of this GPU's bf16 matmul peak measured in
   the same run (FLOPs counted by PyTorch's FlopCounterMode, as the CPU benchmark does);
3. one `full`-preset FedLoRA SST-2 IID grid cell end to end on the local engine (no Ray).

Writes benchmarks/gpu.json; `python -m benchmarks.run --render-only` puts it in docs/benchmarks.md.
`scripts/gpu-check.sh` packs what a bare GPU machine lacks (wheels, the model in fp16) and runs this.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.federated import clients_per_round
from benchmarks.throughput import build, count_flops, lr_of, matmul_peak, raw_loop, sst2_batches, synchronize
from fedtune.config import Settings
from fedtune.runs import write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "gpu.json"


def throughput(settings: Settings, steps: int = 30, batch_sizes=(32, 256)) -> dict:
    """Samples/s and bf16-peak fraction of full fine-tuning and LoRA, fp32 and bf16, on settings.device."""
    device = torch.device(settings.device)
    peaks = {"bf16": matmul_peak(8192, 20, device, torch.bfloat16), "fp32": matmul_peak(8192, 20, device)}
    rows = []
    for batch_size in batch_sizes:
        batches = sst2_batches(settings.replace(batch_size=batch_size), steps + 3, by_length=True)
        for method in ("full", "lora"):
            for precision in ("fp32", "bf16"):
                model, loss_fn = build(method, settings)
                model.to(device)
                lr = lr_of(method, settings)
                raw_loop(model, loss_fn, batches[:3], lr, precision)  # warm-up (kernels, allocator)
                flops = count_flops(model, loss_fn, batches[3:])
                seconds = raw_loop(model, loss_fn, batches[3:], lr, precision)
                samples = sum(len(b["labels"]) for b in batches[3:])
                rows.append({"method": method, "precision": precision, "batch_size": batch_size,
                             "samples_per_s": samples / seconds, "tflops": flops / seconds / 1e12,
                             "fraction_of_bf16_peak": flops / seconds / 1e9 / peaks["bf16"]})
                del model
                torch.cuda.empty_cache()
    synchronize(device)
    return {"device": torch.cuda.get_device_name(device), "peak_gflops": peaks, "rows": rows}


def federated_run(glue_dir: str, model: str) -> dict:
    """`fedtune compare --preset full --methods Fed-LoRA` on SST-2 IID, one seed, local engine, CUDA."""
    out = tempfile.mkdtemp(prefix="fedtune-gpu-")
    command = [sys.executable, "-m", "fedtune.cli", "compare", "--quiet", "--preset", "full", "--task", "sst2",
               "--partition", "iid", "--seeds", "1", "--methods", "Fed-LoRA", "--engine", "local",
               "--device", "cuda", "--glue-dir", glue_dir, "--model", model, "--out-dir", out]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    seconds = time.perf_counter() - start
    [cell] = json.loads(next(Path(out).glob("compare/*/results.json")).read_text())["cells"]
    summary = cell["summary"]
    return {"command": " ".join(["fedtune", *command[3:]]), "seconds": seconds, "dev": summary["dev"],
            "rounds": summary["rounds"], "precision": summary.get("settings", {}).get("precision", "auto")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue-dir", required=True)
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--skip-run", action="store_true", help="leave out the full-preset FedLoRA run")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where to write the JSON (default %(default)s)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
    results = {"updated": datetime.date.today().isoformat(), "torch": torch.__version__}
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py"], cwd=ROOT)
    results["gpu_tests_passed"] = tests.returncode == 0
    settings = Settings(task="sst2", glue_dir=args.glue_dir, model=args.model, device="cuda")
    # One lent machine, one try: a part that fails is recorded with its error and the next part runs.
    parts = {"throughput": lambda: throughput(settings),
             "clients": lambda: clients_per_round(settings=settings)}  # one at a time vs batched
    if not args.skip_run:
        parts["federated"] = lambda: federated_run(args.glue_dir, args.model)
    for name, part in parts.items():
        try:
            results[name] = part()
        except Exception:  # noqa: BLE001 - recorded, not swallowed: gpu.json and stdout show it
            results[name] = {"error": traceback.format_exc()}
        write_json(args.results, results)
        print(json.dumps(results[name], indent=1), flush=True)


if __name__ == "__main__":
    main()
