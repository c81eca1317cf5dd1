"""GPU checks and figures for one lent GPU session (not collected by pytest: it needs CUDA).

    python tests/gpu_check.py [--out DIR] [--budget SECONDS] [--parts correctness,bench,search,variants,packs]

In order, each part on its own (a part that fails is logged and the next one runs):
  1. correctness: train_pack with CUDA graphs against train_pack without them and against
     separate train_fold runs (float32, no autocast); SimAM in bfloat16 against float64;
  2. `lambda-search bench` on the paper's Figure 4 search (what `bench --json` prints);
  3. a quickstart search end to end on the GPU (pack auto, graphs, packed evaluation);
  4. compiled packs of 5 in NCHW and without SimAM, and a profile of the compiled step by kernel;
  5. pack images/s against pack size, eager or compiled, with or without CUDA graphs.
Figures go to DIR/gpu.json as each part ends; the last lines printed are a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

import lambda_search as ls
from lambda_search.bench import measure as _measure
from lambda_search.bench import run as _bench
from lambda_search.nn import simam as _simam
from lambda_search.train import plan as _objective
from lambda_search.train.engine import on_device
from lambda_search.train.pack import train_pack

ROOT = Path(__file__).resolve().parents[1]
DEVICE, SMOKE = "cuda", False
SMOKE_SET = ["data.options.num_samples=600", "data.options.image_size=8", "train.batch_size=16",
             ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later parts are skipped past it")
    parser.add_argument("--parts", default="correctness,bench,search,variants,packs")
    parser.add_argument("--smoke", action="store_true", help="a tiny run on the CPU, to check this script")
    args = parser.parse_args()
    global DEVICE, SMOKE
    DEVICE, SMOKE = ("cpu", True) if args.smoke else ("cuda", False)
    out = Path(args.out)
    start = time.monotonic()
    report: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if not SMOKE else "cpu"}

    def save():
        (out / "gpu.json").write_text(json.dumps(report, indent=1, default=str))

    def part(name, fn, need=0.0):
        left = args.budget - (time.monotonic() - start)
        if left < need:
            report[name] = {"skipped": f"{left:.0f} s left"}
            print(f"== {name}: skipped ({left:.0f} s left)", flush=True)
            return
        print(f"== {name}", flush=True)
        t = time.monotonic()
        try:
            report[name] = fn()
        except Exception as exc:
            traceback.print_exc()
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        report[name + "_seconds"] = round(time.monotonic() - t, 1)
        print(f"   {name}: {report[name]}  ({report[name + '_seconds']} s)", flush=True)
        save()

    parts = args.parts.split(",")
    if "correctness" in parts:
        part("correctness", correctness)
    if "bench" in parts:
        part("bench", bench, need=60)
    if "search" in parts:
        part("search", search, need=60)
    if "variants" in parts:
        part("variants", lambda: variants(start, args.budget), need=40)
    if "packs" in parts:
        part("packs", lambda: packs(start, args.budget), need=30)
    short = {
        k: ({n: x for n, x in v.items() if n not in ("profile", "tail", "projection")} if isinstance(v, dict) else v)
        for k, v in report.items()
    }
    print("\nSUMMARY", json.dumps(short, default=str)[:6000])


def correctness() -> dict:
    data = ls.load_dataset("synthetic", num_samples=301, num_classes=4, image_size=8, seed=3)
    folds = ls.make_folds(data.labels, n_splits=3, seed=0)
    cfg = ls.TrainConfig(epochs=3, batch_size=17, lr=0.05, device=DEVICE, amp=False,
                         checkpoint_every_seconds=None)
    lambdas, seeds = [1e-4, 1e-1, 3.0], [11, 12, 13]
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {}
    graphed = train_pack(data, folds, lambdas, cfg, seeds=seeds)
    plain = train_pack(data, folds, lambdas, replace(cfg, cuda_graphs=False), seeds=seeds)
    alone = [ls.train_fold(data, f, lam, cfg, seed=s) for f, lam, s in zip(folds, lambdas, seeds)]
    res["acc_graphed"] = [r.val_accuracy for r in graphed]
    res["acc_plain"] = [r.val_accuracy for r in plain]
    res["acc_alone"] = [r.val_accuracy for r in alone]
    res["loss_graphed_vs_plain"] = max(abs(a.val_loss - b.val_loss) for a, b in zip(graphed, plain))
    res["loss_graphed_vs_alone"] = max(abs(a.val_loss - b.val_loss) for a, b in zip(graphed, alone))
    res["train_loss_graphed_vs_alone"] = max(abs(x.train_loss - y.train_loss) for a, b in zip(graphed, alone)
                                             for x, y in zip(a.curve, b.curve))
    x = torch.randn(64, 32, 16, 16, device=DEVICE) * 3 + 1
    for lam in (1e-6, 1e-4, 1e-1):
        ref = _simam.simam_reference(x.double(), lam)
        for dtype in (torch.float32, torch.bfloat16):
            got = ls.simam(x.to(dtype), lam).double()
            res[f"simam_{dtype}_{lam:g}"] = float((got - ref).norm() / ref.norm())
    return res


def bench() -> dict:
    config = _bench.paper_figure4_config(SMOKE_SET if SMOKE else ())
    b = _bench.run_bench(config, log=print, rounds=2 if SMOKE else 7)
    print(_bench.format_bench(b))
    return b.to_json()


def search() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "lambda_search", "search", str(ROOT / "studies" / "quickstart.toml"),
               "--set", f"train.device='{DEVICE}'", "--set", f"study.storage='sqlite:///{tmp}/q.db'",
               "--set", f"study.checkpoint_dir='{tmp}/ckpt'"]
        t = time.monotonic()
        log = Path(os.environ.get("OUT", tmp)) / "search.log"
        with open(log, "w") as f:  # streamed: what it printed survives a timeout
            run = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, cwd=tmp)
        seconds = time.monotonic() - t
        text = log.read_text()
        print(text[-3000:])
        return {"rc": run.returncode, "seconds": round(seconds, 1), "tail": text[-700:]}


def variants(start: float, budget: float) -> dict:
    """Compiled, graphed packs of 5: NCHW instead of channels last; the network without SimAM;
    and a profile of the compiled step (no graph) by kernel."""
    config = _bench.paper_figure4_config(SMOKE_SET if SMOKE else ())
    plan = _objective.make_plan(config)
    device = torch.device(DEVICE)
    data = on_device(plan.data, plan.train, device)
    size = 2 if SMOKE else 5
    res = {}
    for name, attention, train in (("nchw", "simam", replace(plan.train, channels_last=False)),
                                   ("none", "none", plan.train),
                                   ("simam", "simam", plan.train)):
        if time.monotonic() - start > budget - 45:
            res[name] = "skipped"
            continue
        t = time.monotonic()
        try:
            p = replace(plan, train=train)
            engine = _measure.Engines(p)(attention)
            lam = 1e-4 if attention == "simam" else None
            seconds = _measure.measure_packs(p, engine, data, lam, [size], rounds=3, block_seconds=1.0)[size]
            res[name] = round(size * plan.train.batch_size / seconds)
            print(f"   {name}: {res[name]:,} training images/s ({time.monotonic() - t:.0f} s)", flush=True)
            if name == "simam" and time.monotonic() - start < budget - 20:
                step = _measure._pack_step(p, engine, data, lam, size)
                engine.cuda_graphs = False
                for _ in range(3):
                    step()
                from torch.profiler import ProfilerActivity, profile
                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
                with profile(activities=acts) as prof:
                    for _ in range(10):
                        step()
                    if DEVICE == "cuda":
                        torch.cuda.synchronize()
                key = "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total"
                table = prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=70)
                print(table, flush=True)
                res["profile"] = table[-4000:]
        except Exception as exc:
            traceback.print_exc()
            res[name] = f"{type(exc).__name__}: {exc}"[:300]
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return res


def packs(start: float, budget: float) -> dict:
    config = _bench.paper_figure4_config(SMOKE_SET if SMOKE else ())
    plan = _objective.make_plan(config)
    device = torch.device(DEVICE)
    data = on_device(plan.data, plan.train, device)
    res = {}
    for compile_ in (False, True):
        for graphs in (False, True):
            if compile_ and not graphs:
                continue
            train = replace(plan.train, compile=compile_, cuda_graphs=graphs)
            p = replace(plan, train=train)
            engine = _measure.Engines(p)("simam")
            for size in ((1, 5, 10, 30) if not compile_ else (5, 30)) if not SMOKE else (1, 2):
                if time.monotonic() - start > budget - 20:
                    res[f"c{int(compile_)}g{int(graphs)}p{size}"] = "skipped"
                    continue
                t = time.monotonic()
                try:
                    seconds = _measure.measure_packs(p, engine, data, 1e-4, [size], rounds=3, block_seconds=1.0)[size]
                    rate = size * plan.train.batch_size / seconds
                    key = f"c{int(compile_)}g{int(graphs)}p{size}"
                    res[key] = round(rate)
                    if graphs and size in (2, 5, 30):
                        res[key + "_eval"] = round(_measure._eval_images_per_s(engine, data, p, size))
                    print(f"   {key}: {rate:,.0f} training images/s ({time.monotonic() - t:.0f} s)", flush=True)
                except Exception as exc:
                    traceback.print_exc()
                    res[f"c{int(compile_)}g{int(graphs)}p{size}"] = f"{type(exc).__name__}: {exc}"[:300]

            torch.cuda.empty_cache()
    return res


if __name__ == "__main__":
    main()
