"""Run fedtune's benchmarks, print their tables, save them, and rewrite docs/benchmarks.md.

    python -m benchmarks.run                      # everything (about 30 min on 2 cores)
    python -m benchmarks.run --only throughput aggregation
    python -m benchmarks.run --skip compare       # the compare grid alone takes ~15 min
    python -m benchmarks.run --only standard-grid # the standard SST-2 grid, one seed (~35 min; not by default)
    python -m benchmarks.run --render-only        # docs/benchmarks.md from benchmarks/results.json

Results go to `benchmarks/results.json` (merged: a partial run keeps the other parts) and the
docs/benchmarks.md's section between the `benchmarks:begin` / `benchmarks:end` markers is regenerated from
that file. Not part of CI: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch

from fedtune.lockstep import ROOM_ROWS
from fedtune.config import Settings
from fedtune.console import quiet_libraries
from fedtune.runs import write_json

ROOT = Path(__file__).resolve().parents[1]
GPU_RESULTS = Path(__file__).resolve().parent / "gpu.json"
RESULTS = ROOT / "benchmarks" / "results.json"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
PARTS = ("throughput", "round", "clients", "aggregation", "scale", "compare", "standard-grid")
DEFAULT_PARTS = PARTS[:-1]  # the standard grid (~35 min of both cores) runs when asked for by name


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cpu or 'unknown CPU'}, {os.cpu_count()} cores, {memory:.0f} GiB RAM, "
            f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads)")


def run_part(part: str, settings: Settings) -> dict:
    from benchmarks import aggregation, federated, throughput

    if part == "throughput":
        return throughput.run(settings=settings)
    if part == "round":
        return federated.round_overhead(settings=settings)
    if part == "clients":
        return federated.clients_per_round(settings=settings)
    if part == "aggregation":
        return aggregation.run(settings=settings)
    if part == "scale":
        return {"engines": [federated.many_clients(settings=settings, engine=engine) for engine in ("ray", "local")]}
    if part == "standard-grid":
        return federated.standard_grid()
    return federated.compare_grid()


def table(header: list[str], rows: list[list]) -> str:
    cells = [[f"{v:,.3f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def peak_of(t: dict, precision: str = "fp32") -> float:
    """The matmul peak a row's MFU is measured against: that of its own precision."""
    if precision == "bf16":
        return t["matmul_peak_gflops_bf16"]
    return max(t["matmul_peak_gflops"], t.get("matmul_peak_gflops_after", 0.0))


def precision_of(row: dict) -> str:
    return row.get("precision", "fp32")  # rows measured before bf16 rows existed were fp32


def targets(results: dict) -> list[str]:
    """Issue #8's targets against the measured numbers."""
    lines = []

    def check(name: str, value: str, goal: str, met: bool) -> None:
        lines.append(f"| {name} | {value} | {goal} | {'met' if met else '**not met**'} |")

    if r := results.get("round"):
        check("simulated round / raw training of the same samples", f"{r['ratio']:.2f}x", "<= 1.10x", r["ratio"] <= 1.10)
    if t := results.get("throughput"):
        in_use = t.get("auto_precision", "fp32")  # what `precision auto` trains in on this host
        for lora in (x for x in t["rows"] if x["method"].startswith("lora") and precision_of(x) == in_use):
            mfu = lora["fedtune_gflops"] / peak_of(t, in_use)
            check(f"LoRA training FLOP/s / {in_use} matmul peak ({lora['method']})", f"{mfu:.0%}", ">= 70%",
                  mfu >= 0.70)
        fp32 = {x["method"]: x for x in t["rows"] if precision_of(x) == "fp32"}
        for row in (x for x in t["rows"] if precision_of(x) == "bf16" and x["method"] in fp32):
            speedup = row["fedtune_samples_per_s"] / fp32[row["method"]]["fedtune_samples_per_s"]
            if row["method"].startswith("lora"):
                check(f"LoRA samples/s, bf16 / fp32 ({row['method']})", f"{speedup:.2f}x", ">= 2x", speedup >= 2)
    for s in results.get("scale", {}).get("engines", []):
        overhead = sum(s["overhead_per_client"][1:]) / len(s["overhead_per_client"][1:])
        check(f"{s['clients']} clients, overhead per client turn, engine {s['engine']} (rounds 2-{s['rounds']})",
              f"{overhead:.3f} s", "<= 0.1 s", overhead <= 0.1)
        check(f"{s['clients']} clients, peak memory (PSS, process tree), engine {s['engine']}",
              f"{s['peak_pss_gb']:.2f} GB", "<= 4 GB", s["peak_pss_gb"] <= 4)
    if c := results.get("clients"):
        for row in (r for r in c["rows"] if r["clients"] == 4):
            ceiling = f" (raw loops: {row['ceiling']:.2f}x)" if "raw_samples_per_s" in row else ""
            check("batched clients, samples/s of a 4-client round / one at a time", f"{row['speedup']:.2f}x{ceiling}",
                  ">= 1.3x", row["speedup"] >= 1.3)
    if g := results.get("standard-grid"):
        check(f"standard SST-2 IID grid, one seed, every row ({g['cells']} cells, `--jobs 2`)",
              f"{g['seconds'] / 60:.1f} min", "<= 40 min", g["seconds"] <= 40 * 60)
    if a := results.get("aggregation"):
        worst = max((x for x in a["rows"] if x["algorithm"] == "flexlora"), key=lambda x: x["seconds"])
        check("FlexLoRA aggregation, default model", f"{worst['seconds']:.2f} s ({worst['clients']} clients, "
              f"rank {worst['rank']})", "<= 2 s", worst["seconds"] <= 2)
    return ["| target | measured | goal | |", "|---|---:|---:|---|", *lines] if lines else []


def on(part: dict) -> str:
    """Where and when a part was measured: its host's CPU and the date."""
    return f"{part['machine'].split(',')[0]}, {part['updated']}"


def render_gpu(g: dict) -> str:
    """The GPU check's part of the README section (benchmarks/gpu.json, from `scripts/gpu-check.sh run`)."""
    t = g["throughput"]
    rows = [[r["method"], r["precision"], r["batch_size"], f"{r['samples_per_s']:,.0f}", f"{r['tflops']:.2f}",
             f"{r['fraction_of_bf16_peak']:.2%}"] for r in t["rows"]]
    out = [f"**On a GPU** (`python -m benchmarks.gpu` via `scripts/gpu-check.sh run`, {t['device']}, torch {g['torch']}, "
           f"{g['updated']}; SST-2 batches by length; measured matmul peak {t['peak_gflops']['bf16'] / 1000:.0f} "
           f"TFLOP/s bf16, {t['peak_gflops']['fp32'] / 1000:.0f} fp32). GPU tests: "
           + "; then ".join(f"{x['result']}" + (f" ({x['failed']})" if x.get("failed") else "") for x in g["gpu_tests_log"])
           + ".", "", table(["method", "precision", "batch", "samples/s", "TFLOP/s", "share of bf16 peak"], rows)]
    if f := g.get("federated"):
        out += ["", f"`{f['command'].split(' --glue-dir')[0]}`: SST-2 dev accuracy **{f['dev']['accuracy']:.4f}** after "
                f"{f['rounds']} rounds in {f['seconds']:.0f} s (precision {f['precision_resolved']})."]
    return "\n".join(out)


def render(results: dict) -> str:
    """The README section, from the saved results."""
    machines = sorted({(results[p]["updated"], results[p]["machine"]) for p in PARTS if p in results}, reverse=True)
    out = ["Measured on: " + "; ".join(f"{m} ({d})" for d, m in machines) + ". Each part names its host: hosts of "
           "the same size differ (compare a part's numbers only with others from the same host).", "",
           "Regenerate: `python -m benchmarks.run` (or `--only PART ...`, parts: " + ", ".join(PARTS) + ").", "",
           *targets(results)]
    if t := results.get("throughput"):
        out += ["", f"**Local training throughput** (`throughput`, {on(t)}; SST-2 batches of {t['batch_size']}, padded per "
                f"batch, max-length {t['max_length']}; FLOPs counted by PyTorch's FlopCounterMode; fedtune's `train` "
                f"and a minimal loop run the same batches). Matmul peaks (2048x2048, best of 10, at the start "
                f"and the end of the same run): fp32 {peak_of(t):.1f} GFLOP/s"
                + (f", bf16 {peak_of(t, 'bf16'):.1f} GFLOP/s" if "matmul_peak_gflops_bf16" in t else "")
                + "; MFU = FLOP/s / the peak of the row's precision"
                + (f"; `precision auto` trains in {t['auto_precision']} on this host" if "auto_precision" in t else "")
                + ".", "",
                table(["method", "precision", "tokens / sample (padded)", "samples/s fedtune", "samples/s raw loop",
                       "GFLOP/s fedtune", "GFLOP/s raw loop", "MFU (fedtune / peak)"],
                      [[r["method"], precision_of(r),
                        f"{r['real_tokens'] / r['samples']:.1f} ({r['padded_tokens'] / r['samples']:.1f})",
                        r["fedtune_samples_per_s"], r["raw_samples_per_s"], r["fedtune_gflops"], r["raw_gflops"],
                        f"{r['fedtune_gflops'] / peak_of(t, precision_of(r)):.0%}"] for r in t["rows"]])]
        for key, what in (("lora_profile", "the model's own dropout (0.1)"), ("lora_profile_no_dropout", "model-dropout 0"),
                          ("lora_profile_bf16", "bf16 autocast, model-dropout 0")):
            if shares := t.get(key):
                out += ["", f"Where a LoRA step's CPU time goes, {what} (torch.profiler, self time): "
                        + ", ".join(f"`{op}` {share:.0%}" for op, share in shares.items()) + "."]
        e = t["evaluation"]
        out += ["", f"Evaluating the {e['rows']} SST-2 dev rows (LoRA model, batches of 128): "
                + ", ".join(f"{name} {s:.2f} s" for name, s in e["seconds"].items()) + "."]
    if r := results.get("round"):
        out += ["", f"**Round overhead** (`round`, {on(r)}; FedLoRA, {r['clients']} simulated clients x {r['local_steps']} "
                f"steps of {r['batch_size']}, the server evaluating 64 dev rows): round 2 took "
                f"{r['round_2_seconds']:.2f} s (round 1, with model loading in the actor: {r['round_1_seconds']:.2f} s); "
                f"the same {r['samples']} samples in the same batches through the raw loop took "
                f"{r['raw_seconds']:.2f} s, evaluation {r['eval_seconds']:.2f} s. Round / raw: **{r['ratio']:.2f}x** "
                f"({r['ratio_without_eval']:.2f}x without the evaluation)."]
    if c := results.get("clients"):
        out += ["", f"**Clients per round, one at a time vs batched** (`clients`, {on(c)}; FedLoRA on the local engine, "
                f"each client {c['local_steps']} steps of {c['batch_size']} SST-2 rows, {c.get('batching', 'by-length')} batches, "
                f"model-dropout 0, {c['precision']}; " + (f"the median of rounds 2-{c['timed_rounds'] + 1}"
                if c.get("timed_rounds") else "round 2") + " timed, evaluation excluded"
                + (f"; runs one at a time and batched alternate, {c['pairs']} pairs (one past 16 clients), the "
                   f"speed-up the median of the pairs' (each pair's in brackets)" if c.get("pairs") else "")
                + "; `batched-clients on` "
                f"trains the round's clients in lockstep over the shared frozen base. Raw loop: one model's minimal "
                f"loop over round 2's client batches, one client after another, and over the same rows cut into "
                f"the passes of combined steps (rooms of at most {ROOM_ROWS} rows; each step's rows sorted by "
                f"length: larger matmuls, less padding); their ratio is what batching buys in the model's own "
                f"work, `benchmarks.federated.batch_ceiling`):", "",
                table(["clients per round", "samples/s one at a time", "samples/s batched", "speed-up",
                       "raw loop, own batches", "raw loop, combined passes", "raw ratio"],
                      [[r["clients"], r["off_samples_per_s"], r["on_samples_per_s"], f"{r['speedup']:.2f}x"
                        + (f" ({', '.join(f'{x:.2f}' for x in r['speedups'])})"
                           if len(r.get("speedups", [])) > 1 else "")]
                       + ([r["raw_samples_per_s"], r["raw_grouped_samples_per_s"], f"{r['ceiling']:.2f}x"]
                          if "raw_samples_per_s" in r else ["-"] * 3) for r in c["rows"]])]
    if a := results.get("aggregation"):
        rows = [[x["algorithm"], x["clients"], x["rank"] or "-", f"{x['parameters_per_client']:,}", x["seconds"]]
                for x in a["rows"]]
        out += ["", f"**Aggregation time** (`aggregation`, {on(a)}; one call of the algorithm's `aggregate`, best of 3, "
                "random states of the real shapes):", "",
                table(["algorithm", "clients", "rank", "parameters / client", "seconds"], rows)]
    if engines := results.get("scale", {}).get("engines"):
        s = engines[0]
        rows = [[e["engine"], ", ".join(f"{x:.1f}" for x in e["seconds_per_round"]),
                 ", ".join(f"{x:.1f}" for x in e["client_train_seconds"]),
                 ", ".join(f"{x:.3f}" for x in e["overhead_per_client"]), e["setup_seconds"], e["total_seconds"],
                 e["peak_pss_gb"], e["peak_rss_gb"], e["dev_accuracy"]] for e in engines]
        out += ["", f"**{s['clients']} clients** (`scale`, {on(results['scale'])}; FlexLoRA, heavy-tail-light ranks, {s['per_round']} "
                f"clients per round, {s['local_steps']} local steps of {s['batch_size']}, all of SST-2, the server "
                f"evaluating 256 dev rows; clients train one at a time). Overhead per client = (round seconds - the "
                f"clients' training loops - aggregation - server work - evaluation) / clients in the round: "
                f"message handling, serialisation and each client's set-up (model from the process cache, its "
                f"rows tokenized). Set-up = Ray start-up or the in-process grid, the handshake with every node, "
                f"data and models before round 0. Memory: the whole process tree, PSS (summed RSS counts shared "
                f"pages once per process). Both engines run the same seeds, so their dev accuracy agrees.", "",
                table(["engine", "seconds per round", "training loops (s)", "overhead / client (s)", "set-up (s)",
                       "total (s)", "peak PSS (GB)", "peak RSS (GB)", "dev accuracy"], rows)]
    if GPU_RESULTS.exists():
        out += ["", render_gpu(json.loads(GPU_RESULTS.read_text()))]
    if c := results.get("compare"):
        out += ["", f"**Compare grid, small preset** (`compare`, {on(c)}; `fedtune compare --task {c['task']} --partition iid "
                f"--seeds {c['seeds']}` into an empty folder): {c['cells']} cells in {c['seconds'] / 60:.1f} min, "
                f"so the 60-minute target for one task's grid allows {int(60 // (c['seconds'] / 60 / c['seeds']))} "
                f"seeds at this rate."]
    if g := results.get("standard-grid"):
        metric = g.get("cell_metric", {})  # recorded since 2026-12-03's second run
        cells = ", ".join(f"{label} {seconds / 60:.1f}" + (f" ({metric[label]:.3f})" if label in metric else "")
                          for label, seconds in g["cell_seconds"].items())
        out += ["", f"**Standard grid** (`standard-grid`, {on(g)}; `{g['command']}` into an empty folder, precision "
                f"auto): {g['cells']} cells in {g['seconds'] / 60:.1f} min; each cell's minutes (two run at a "
                f"time; its dev accuracy or MCC where recorded): "
                f"{cells}."]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(DEFAULT_PARTS),
                        help="parts to run (default: all but standard-grid)")
    parser.add_argument("--skip", nargs="+", choices=PARTS, default=[])
    parser.add_argument("--glue-dir", default="", help="GLUE folder (default: $GLUE_DIR)")
    parser.add_argument("--device", default="cpu", help="where to compute (fedtune's `device`; the GPU check is "
                        "benchmarks.gpu)")
    parser.add_argument("--engine", default="ray", choices=("ray", "local"),
                        help="simulation engine of the `round` part (`scale` runs both)")
    parser.add_argument("--render-only", action="store_true", help="rewrite docs/benchmarks.md from results.json")
    args = parser.parse_args(argv)
    quiet_libraries()
    settings = Settings(task="sst2", glue_dir=args.glue_dir, device=args.device, engine=args.engine)
    if not settings.resolved_glue_dir and not args.render_only:
        raise SystemExit("benchmarks read real SST-2 rows: pass --glue-dir or set GLUE_DIR")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for part in [p for p in args.only if p not in args.skip and not args.render_only]:
        print(f"== {part}", flush=True)
        results[part] = {**run_part(part, settings), "machine": machine(), "updated": datetime.date.today().isoformat()}
        results["machine"] = machine()
        results["updated"] = datetime.date.today().isoformat()
        write_json(RESULTS, results)  # after every part: an interrupted suite keeps what it measured
        print(render({k: v for k, v in results.items() if k in (part, "machine", "updated")}), flush=True)
    if not results:
        raise SystemExit(f"{RESULTS} does not exist yet: run the benchmarks first")
    readme = ROOT / "docs" / "benchmarks.md"
    text = readme.read_text()
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        readme.write_text(head + BEGIN + "\n" + render(results) + "\n" + END + rest.split(END, 1)[1])
        print(f"updated {readme}")


if __name__ == "__main__":
    main()
