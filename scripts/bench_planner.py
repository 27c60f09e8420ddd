#!/usr/bin/env python3
"""KV fetch planner on a GPU: one layer's K/V brought back from Harvest leases by the
planner's split (KVPR: host + recomputation; three-way: + the GPU lease), against
transfer alone and against a sweep of the recomputed share, in one run.

    python scripts/bench_planner.py --lender-gpu 0 --out bench/results/planner.json
    python scripts/bench_planner.py --smoke --out /tmp/planner-smoke.json   # CPU, tiny

A node is started (``bench_node``: a CUDA VMM lender on --lender-gpu and a host lender),
a host lease (pinned, mapped for --device) and a GPU lease each hold every layer's K, V
and activations for ``tokens x batch`` tokens (random; K and V made from the activations,
so recomputed and stored agree). Per layer shape and token count: rates profiled on the
leases, then transfer only (l = 0), the planner's host + recompute split, a sweep of l,
and the three-way plan. CUDA events, warm-ups, median of repeats. Prints a table, writes
JSON and a PNG (time vs recompute share; skipped without matplotlib) next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchkit.node import REPO, bench_node, pyplot

from client.kv.fetch import fetch_kv
from client.kv.measure import timer
from client.kv.plan import FetchPlan, KVShape
from client.kv.planner import FetchPlanner
from harvestd.sizes import GiB, MiB

SHAPES = {"opt-6.7b": (4096, 32, 32), "opt-13b": (5120, 40, 40), "llama-3-8b": (4096, 32, 8)}
SMOKE_SHAPES = {"opt-6.7b/16": (256, 4, 4), "opt-13b/16": (320, 5, 5), "llama-3-8b/16": (256, 4, 1)}


class Layer:
    """One layer's weights, its K/V and activations in both leases, and its outputs."""

    def __init__(
        self, shape: KVShape, n: int, dtype: Any, device: Any, host: Any, peer: Any, seed: int
    ) -> None:
        import torch

        gen = torch.Generator(device=device).manual_seed(seed)
        hidden, kv_dim = shape.hidden_size, shape.kv_dim
        scale = hidden**-0.5
        self.w_k, self.w_v = (
            (torch.randn(kv_dim, hidden, generator=gen, device=device) * scale).to(dtype)
            for _ in range(2)
        )
        self.b_k, self.b_v = (
            (torch.randn(kv_dim, generator=gen, device=device) * 0.1).to(dtype) for _ in range(2)
        )
        x = torch.randn(n, hidden, generator=gen, device=device).to(dtype)
        self.k = torch.addmm(self.b_k, x, self.w_k.t())
        self.v = torch.addmm(self.b_v, x, self.w_v.t())
        kv_bytes = n * kv_dim * shape.dtype_bytes
        self.stores = {}
        for name, lease in (("host", host), ("peer", peer)):
            k = lease.tensor(dtype, (n, kv_dim))
            v = lease.tensor(dtype, (n, kv_dim), offset=kv_bytes)
            a = lease.tensor(dtype, (n, hidden), offset=2 * kv_bytes)
            with lease.use():
                k.copy_(self.k), v.copy_(self.v), a.copy_(x)
            self.stores[name] = (k, v, a)
        self.out_k, self.out_v = torch.empty_like(self.k), torch.empty_like(self.v)
        self.scale = max(self.k.float().abs().max().item(), self.v.float().abs().max().item())

    def fetch(self, plan: FetchPlan, chunk: int) -> None:
        """One fetch: activations from the link the plan names."""
        fetch_kv(
            plan,
            out_k=self.out_k,
            out_v=self.out_v,
            peer_kv=self.stores["peer"][:2],
            host_kv=self.stores["host"][:2],
            activations=self.stores[plan.activations_via or "host"][2],
            w_k=self.w_k,
            b_k=self.b_k,
            w_v=self.w_v,
            b_v=self.b_v,
            chunk_tokens=chunk,
            synchronize=False,
        )

    def check(self, plan: FetchPlan) -> dict[str, Any]:
        """Copied rows byte-equal to the stored K/V; recomputed rows close to them."""
        import torch

        r = plan.recompute_tokens
        copied = all(
            torch.equal(o[r:].view(torch.uint8), ref[r:].view(torch.uint8))
            for o, ref in ((self.out_k, self.k), (self.out_v, self.v))
        )
        err = max(
            ((o[:r].float() - ref[:r].float()).abs().max().item() if r else 0.0)
            for o, ref in ((self.out_k, self.k), (self.out_v, self.v))
        )
        return {
            "copied_exact": copied,
            "recomputed_max_abs_err": err,
            "ok": copied and err <= 0.02 * self.scale,
        }


def bench_config(
    name: str, shape: KVShape, n: int, args: argparse.Namespace, ctx: dict
) -> dict[str, Any]:
    """Every measurement for one layer shape and token count."""
    layer = Layer(
        shape, n, ctx["dtype"], ctx["device"], ctx["host"], ctx["peer"], seed=len(ctx["rows"])
    )
    with ctx["host"].use(), ctx["peer"].use():
        rates = FetchPlanner.profile(
            shape,
            ctx["device"],
            host=ctx["host"].as_bytes(),
            peer=ctx["peer"].as_bytes(),
            dtype=ctx["dtype"],
            chunk_tokens=args.chunk_tokens,
            nbytes=ctx["profile_bytes"],
        )
    planner = FetchPlanner(chunk_tokens=args.chunk_tokens)
    measure = timer(ctx["device"], args.warmup, args.repeats)

    def run(plan: FetchPlan) -> dict[str, Any]:
        with ctx["host"].use(), ctx["peer"].use():
            sec = measure(lambda: layer.fetch(plan, args.chunk_tokens))
        return {
            "recompute": plan.recompute_tokens,
            "peer": plan.peer_tokens,
            "host": plan.host_tokens,
            "via": plan.activations_via,
            "measured_ms": sec * 1e3,
            "predicted_ms": plan.predicted_s * 1e3,
            "check": layer.check(plan),
        }  # what the last repeat left in the outputs

    transfer = run(planner.fixed(n, shape, rates))
    kvpr_plan = planner.plan(n, shape, rates, peer_available=False)
    kvpr = run(kvpr_plan)
    kvpr["reason"] = kvpr_plan.reason
    points = args.sweep
    ls = (
        sorted(
            {
                min(n, round(i * n / (points - 1) / args.chunk_tokens) * args.chunk_tokens)
                for i in range(points)
            }
            | {n}
        )
        if shape.recompute_pays
        else [0]
    )
    sweep = [run(planner.fixed(n, shape, rates, recompute_tokens=l)) for l in ls]
    three_plan = planner.plan(n, shape, rates, peer_available=True)
    three = run(three_plan)
    three["reason"] = three_plan.reason
    best = min(sweep, key=lambda row: row["measured_ms"])
    row = {
        "shape": name,
        "hidden": shape.hidden_size,
        "kv_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "tokens": n,
        "batch": args.batch,
        "kv_bytes_per_token": shape.kv_bytes_per_token,
        "act_bytes_per_token": shape.act_bytes_per_token,
        "mha": shape.recompute_pays,
        "rates": {k: v for k, v in vars(rates).items()},
        "transfer_only": transfer,
        "planner": kvpr,
        "sweep": sweep,
        "best_sweep": best,
        "three_way": three,
        "speedup_planner_over_transfer": transfer["measured_ms"] / kvpr["measured_ms"],
        "planner_over_best_sweep": kvpr["measured_ms"] / best["measured_ms"],
    }
    return row


def baseline(ctx: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Pinned host-to-device copy of 1 GiB (CPU memcpy of 64 MiB in smoke mode)."""
    import torch

    nbytes = GiB if ctx["cuda"] else 64 * MiB
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=ctx["cuda"])
    dst = torch.empty(nbytes, dtype=torch.uint8, device=ctx["device"])
    sec = timer(ctx["device"], 2, 5)(lambda: dst.copy_(src, non_blocking=True))
    return {
        "bytes": nbytes,
        "GBps": nbytes / sec / 1e9,
        "what": "pinned host-to-device copy" if ctx["cuda"] else "CPU memcpy (smoke)",
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the JSON document."""
    import torch

    cuda = not args.smoke
    device = torch.device(args.device if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = (
        torch.float32 if args.smoke else {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    )
    item = torch.empty((), dtype=dtype).element_size()
    shapes = {
        name: KVShape(h, kv, h // heads, item)
        for name, (h, heads, kv) in (SMOKE_SHAPES if args.smoke else SHAPES).items()
    }
    tokens = [int(t) * args.batch for t in args.tokens.split(",")]
    need = max(
        t * (s.kv_bytes_per_token + s.act_bytes_per_token) for t in tokens for s in shapes.values()
    )
    lease_bytes = -(-need // (2 * MiB)) * 2 * MiB
    node_bytes = f"{-(-lease_bytes // GiB) + 1}GiB"
    doc: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "smoke": args.smoke,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "dtype": str(dtype),
        "chunk_tokens": args.chunk_tokens,
        "timing": "CUDA events, median" if cuda else "wall clock, median",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rows": [],
    }
    began = time.monotonic()
    node_args = (
        dict(backend="cuda-vmm", gpus=args.lender_gpu, cap=node_bytes, host_bytes=node_bytes)
        if cuda
        else dict(backend="host", host_bytes="256MiB")
    )
    with bench_node(**node_args) as node, node.connect() as client:
        host = client.lease(lease_bytes, backend="host", device=device if cuda else None)
        peer = client.lease(
            lease_bytes, backend="cuda-vmm" if cuda else "host", device=device if cuda else None
        )
        doc["host_lease"] = {
            "id": host.id,
            "bytes": host.nbytes,
            "pinned": bool(cuda and host.as_bytes().is_pinned()),
        }
        if cuda:
            from lender.backends import cuda_driver as cu

            same = peer.gpu_uuid == cu.device_uuid(device.index)
            note = (
                "the GPU lease is on the reading GPU itself: 'peer' copies are "
                "device-local, not an NVLink peer"
                if same
                else "the GPU lease is on another GPU: a real peer link"
            )
        else:
            same, note = False, "smoke: a second host lease stands in for the GPU lease"
        doc["peer_lease"] = {
            "id": peer.id,
            "bytes": peer.nbytes,
            "backend": peer.backend.value,
            "same_gpu": same,
            "note": note,
        }
        doc["baseline"] = baseline({"cuda": cuda, "device": device}, args)
        ctx = {
            "cuda": cuda,
            "device": device,
            "dtype": dtype,
            "host": host,
            "peer": peer,
            "rows": doc["rows"],
            "profile_bytes": (256 * MiB) if cuda else (4 * MiB),
        }
        for name, shape in shapes.items():
            for n in tokens:
                t0 = time.monotonic()
                doc["rows"].append(bench_config(name, shape, n, args, ctx))
                print(f"  {name} {n} tokens: {time.monotonic() - t0:.1f} s", flush=True)
        host.release()
        peer.release()
    doc["elapsed_s"] = time.monotonic() - began
    doc["targets"] = targets(doc["rows"])
    return doc


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The goals, each with its figures and whether it was met."""
    mha, gqa = [r for r in rows if r["mha"]], [r for r in rows if not r["mha"]]
    speedups = [r["speedup_planner_over_transfer"] for r in mha]
    within = [r["planner_over_best_sweep"] for r in rows]
    return {
        "mha_speedup_ge_1.3": {"values": speedups, "met": bool(speedups) and min(speedups) >= 1.3},
        "planner_within_10pct_of_best_sweep": {"values": within, "met": max(within) <= 1.10},
        "gqa_no_recompute": {
            "met": all(
                r["planner"]["recompute"] == 0 and r["three_way"]["recompute"] == 0 for r in gqa
            ),
            "reason": gqa[0]["planner"]["reason"] if gqa else None,
        },
        "results_verified": {
            "met": all(
                run["check"]["ok"]
                for r in rows
                for run in [r["transfer_only"], r["planner"], r["three_way"], *r["sweep"]]
            )
        },
    }


def report(doc: dict[str, Any]) -> None:
    """The table."""
    print(
        f"\n{doc['device']}  {doc['dtype']}  baseline {doc['baseline']['what']}: "
        f"{doc['baseline']['GBps']:.1f} GB/s   peer: {doc['peer_lease']['note']}"
    )
    print(
        f"{'shape':14s} {'tokens':>7s} {'xfer ms':>8s} {'plan l':>7s} {'plan ms':>8s} "
        f"{'pred':>7s} {'speedup':>7s} {'best l':>7s} {'best ms':>8s} {'/best':>6s} "
        f"{'3-way r/p/h':>20s} {'ms':>7s} {'pred':>7s}"
    )
    for r in doc["rows"]:
        p, b, t = r["planner"], r["best_sweep"], r["three_way"]
        split = f"{t['recompute']}/{t['peer']}/{t['host']}"
        print(
            f"{r['shape']:14s} {r['tokens']:7d} {r['transfer_only']['measured_ms']:8.3f} "
            f"{p['recompute']:7d} {p['measured_ms']:8.3f} {p['predicted_ms']:7.3f} "
            f"{r['speedup_planner_over_transfer']:7.2f} {b['recompute']:7d} "
            f"{b['measured_ms']:8.3f} {r['planner_over_best_sweep']:6.2f} {split:>20s} "
            f"{t['measured_ms']:7.3f} {t['predicted_ms']:7.3f}"
        )
    for key, value in doc["targets"].items():
        print(
            f"{'MET ' if value['met'] else 'MISS'} {key}: "
            f"{value.get('values', value.get('reason', ''))}"
        )
    print(f"elapsed {doc['elapsed_s']:.1f} s")


def plot(doc: dict[str, Any], path: Path) -> None:
    """Time against recompute share, one panel per shape, the planner's choice marked."""
    plt = pyplot()
    if plt is None:
        return
    names = list(dict.fromkeys(r["shape"] for r in doc["rows"]))
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for r in (r for r in doc["rows"] if r["shape"] == name):
            xs = [p["recompute"] / r["tokens"] for p in r["sweep"]]
            (line,) = ax.plot(
                xs, [p["measured_ms"] for p in r["sweep"]], "o-", label=f"{r['tokens']} tokens"
            )
            ax.plot(
                xs, [p["predicted_ms"] for p in r["sweep"]], "--", c=line.get_color(), alpha=0.6
            )
            ax.plot(
                r["planner"]["recompute"] / r["tokens"],
                r["planner"]["measured_ms"],
                "*",
                ms=16,
                c=line.get_color(),
                mec="k",
            )
        ax.set_title(name)
        ax.set_xlabel("recomputed share l / s (host + recompute)")
        ax.set_ylabel("ms (solid: measured, dashed: model, star: planner)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{doc['device']}: one layer's KV from a host lease")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    """Parse arguments, run, write the JSON and the plot, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lender-gpu", default="0", help="the CUDA VMM lender's GPU")
    parser.add_argument("--device", default="cuda:0", help="the GPU that reads the KV")
    parser.add_argument("--tokens", default=None, help="sequence lengths (comma list)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per layer fetch")
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--sweep", type=int, default=13, help="points of the l sweep")
    parser.add_argument("--chunk-tokens", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", default=str(REPO / "bench/results/planner.json"))
    args = parser.parse_args()
    args.tokens = args.tokens or ("2048,4096" if args.smoke else "16384,32768")
    args.batch = args.batch or (1 if args.smoke else 2)
    if args.smoke:
        args.chunk_tokens = min(args.chunk_tokens, 128)
        args.sweep = min(args.sweep, 9)
    doc = run(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc, out.with_suffix(".png"))
    report(doc)
    print(f"wrote {out}")
    return 0 if doc["targets"]["results_verified"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
