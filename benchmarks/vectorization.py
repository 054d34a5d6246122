"""Per-client training of a LEAF CNN at large M: which execution reaches the shared-weights ceiling.

    python benchmarks/vectorization.py            # M = 128, 512, 1024; the LEAF FEMNIST CNN (6.6 M parameters)
    python benchmarks/vectorization.py --quick    # M = 4, 8; a narrow CNN (seconds on a CPU)

Bare training (the project's BatchedTrainer and local training, no simulation) of M clients, each
with its own weights, S local steps of batch B on 28x28 images (synthetic: this measures speed), by
  vmap-all        one vmapped call over all M clients;
  vmap-chunk-c    chunks of c clients, one vmapped call per chunk (chunk_size = c);
  map-vmap-c      one call: a loop over groups of c vmapped clients (execution=map, map_batch=c);
  ...-bf16        the same with the forward and backward passes in bfloat16 (compute_dtype);
  chunk-donated-c chunks of c clients whose start weights are passed in and donated, so the
                  trained weights are written over them (no new buffer per chunk);
  ...-patches     the same with the model's convolutions as slices and one matmul
                  (model.conv=patches, models/conv.py) instead of XLA's (model.conv=lax);
against the shared-weights ceiling: one model trained on batches of M x B for S steps, the same
arithmetic with one set of weights (`shared`, and `shared-bf16` for the bfloat16 variants), the
faster of its two convolutions.
Reported: samples/s (M x S x B / wall, median of --repeats after a compiling call) and the
fraction of the ceiling. The target (GPU): >= 0.6 of the ceiling at M = 128, 512, 1024.

Writes <out>/vectorization.json and vectorization.png.
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import numpy as np

try:
    from . import common
except ImportError:
    import common

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from asyncflower_jax.client.batched import BatchedTrainer  # noqa: E402
from asyncflower_jax.client.local_train import LocalTraining, make_local_train  # noqa: E402
from asyncflower_jax.client.precision import mixed_precision  # noqa: E402
from asyncflower_jax.compilation import jit  # noqa: E402
from asyncflower_jax.data.store import ClientStore  # noqa: E402
from asyncflower_jax.models.conv import conv_function  # noqa: E402

FULL = {"concurrency": [128, 512, 1024], "steps": 5, "batch": 32, "widths": (32, 64, 2048), "classes": 62, "samples_per_client": 64, "pool": 16384,
        "chunks": [64, 128], "map_batches": [64], "bf16_chunks": [64, 128], "donated_chunks": [64]}
QUICK = {"concurrency": [4, 8], "steps": 2, "batch": 8, "widths": (4, 8, 32), "classes": 62, "samples_per_client": 16, "pool": 512,
         "chunks": [2], "map_batches": [2], "bf16_chunks": [2], "donated_chunks": [2]}


class LeafCNN(nn.Module):
    """LEAF's FEMNIST CNN: conv 5x5 (32) - max-pool - conv 5x5 (64) - max-pool - dense 2048 - dense 62."""

    widths: tuple[int, int, int] = (32, 64, 2048)
    num_classes: int = 62
    conv: str = "lax"

    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], 28, 28, 1))
        for width in self.widths[:2]:
            x = nn.relu(nn.Conv(width, (5, 5), padding="SAME", conv_general_dilated=conv_function(self.conv))(x))
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = nn.relu(nn.Dense(self.widths[2])(x.reshape((x.shape[0], -1))))
        return nn.Dense(self.num_classes)(x)


def setup(p: dict, m: int, conv: str = "lax"):
    rng = np.random.default_rng(0)
    x = rng.random((p["pool"], 784), dtype=np.float32)
    y = rng.integers(0, p["classes"], p["pool"]).astype(np.int32)
    spc = p["samples_per_client"]
    offsets = ((np.arange(m) * spc) % (p["pool"] - spc + 1)).astype(np.int32)
    store = ClientStore(jnp.asarray(x), jnp.asarray(y), offsets, np.full(m, spc, np.int32))
    module = LeafCNN(tuple(p["widths"]), p["classes"], conv)
    params = module.init(jax.random.key(0), jnp.zeros((1, 784)))
    return store, module, params


def time_call(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def per_client(p, store, module, params, m, execution, chunk, map_batch, compute_dtype, repeats):
    training = LocalTraining(num_steps=p["steps"], batch_size=p["batch"], learning_rate=0.01)
    trainer = BatchedTrainer(make_local_train(mixed_precision(module.apply, compute_dtype), training), store, jax.random.key(1), chunk_size=chunk, execution=execution, map_batch=map_batch)
    stacked = jax.tree.map(lambda leaf: leaf[None], params)
    args = (stacked, np.zeros(m, np.int32), np.arange(m), np.arange(m))
    return time_call(lambda: [c.params for c in trainer.train_from(*args)], repeats)


def donated_chunks(p, store, module, params, m, chunk, repeats):
    """Chunks of `chunk` clients whose start weights are materialized first and donated to training."""
    training = LocalTraining(num_steps=p["steps"], batch_size=p["batch"], learning_rate=0.01)
    local_train = make_local_train(module.apply, training)
    base = jax.random.key(1)

    @functools.partial(jit, donate_argnums=(0,))
    def train(start, x, y, offsets, counts, ids):
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(ids)
        trained, loss = jax.vmap(local_train, in_axes=(0, None, None, 0, 0, 0))(start, x, y, offsets, counts, keys)
        return trained, loss

    broadcast = jit(lambda tree: jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (chunk, *leaf.shape)), tree))

    def run():
        out = []
        for lo in range(0, m, chunk):
            rows = np.arange(lo, lo + chunk) % m
            out.append(train(broadcast(params), store.x, store.y, store.offsets[rows], store.counts[rows], rows.astype(np.uint32))[0])
        return out

    return time_call(run, repeats)


def shared(p, store, module, params, m, compute_dtype, repeats):
    """One model, batches of M x B: the same arithmetic with shared weights (the ceiling)."""
    training = LocalTraining(num_steps=p["steps"], batch_size=m * p["batch"], learning_rate=0.01)
    train = jit(make_local_train(mixed_precision(module.apply, compute_dtype), training))
    n = np.int32(store.x.shape[0])
    return time_call(lambda: train(params, store.x, store.y, np.int32(0), n, jax.random.key(2))[0], repeats)


def variants_of(p: dict, m, bf16: bool = True, convs=("lax",)) -> list[tuple]:
    """The variants run at concurrency m, in order, ceilings first: (name, conv, function, its
    arguments between (p, store, module, params, m) and repeats); a name ends in -patches where
    the convolution is (models.conv)."""
    named = lambda name, conv: name if conv == "lax" else f"{name}-patches"  # noqa: E731
    ceilings = [(named(n, c), c, f, e) for c in convs for n, f, e in _variants(p, m, bf16) if n.startswith("shared")]
    return ceilings + [(named(n, c), c, f, e) for c in convs for n, f, e in _variants(p, m, bf16) if not n.startswith("shared")]


def _variants(p: dict, m, bf16: bool) -> list[tuple]:
    found = [("shared", shared, (None,))] + ([("shared-bf16", shared, ("bfloat16",))] if bf16 else [])
    found.append(("vmap-all", per_client, ("vmap", m, 1, None)))
    found += [(f"vmap-chunk-{c}", per_client, ("vmap", c, 1, None)) for c in p["chunks"] if c < m]
    found += [(f"map-vmap-{c}", per_client, ("map", m, c, None)) for c in p["map_batches"] if c < m]
    if bf16:
        found += [(f"vmap-chunk-{c}-bf16", per_client, ("vmap", c, 1, "bfloat16")) for c in p["bf16_chunks"] if c < m]
    found += [(f"chunk-donated-{c}", donated_chunks, (c,)) for c in p["donated_chunks"] if c < m]
    return found


def main(argv=None) -> dict:
    parser = common.common_arguments(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter), "vectorization")
    parser.add_argument("--concurrency", type=common.positive_int, nargs="+", action=common.DistinctValues)
    parser.add_argument("--repeats", type=common.positive_int, default=3)
    parser.add_argument("--no-bf16", action="store_true", help="skip the bfloat16 variants")
    parser.add_argument("--variants", nargs="+", action=common.DistinctValues, metavar="NAME", help="run only these variants (e.g. shared vmap-chunk-64); the ceilings 'shared' and 'shared-bf16' are always run")
    parser.add_argument("--conv", nargs="+", action=common.DistinctValues, choices=["lax", "patches"], default=["lax", "patches"], help="the models' convolutions to run (default both)")
    args = parser.parse_args(argv)
    p = dict(QUICK if args.quick else FULL)
    if args.concurrency:
        p["concurrency"] = args.concurrency
    known = {name for name, _, _, _ in variants_of(p, math.inf, convs=("lax", "patches"))}
    if args.variants and set(args.variants) - known:
        parser.error(f"--variants: unknown {sorted(set(args.variants) - known)}; choose from {sorted(known)}")
    runnable = {name for m in p["concurrency"] for name, *_ in variants_of(p, m, bf16=not args.no_bf16, convs=args.conv)}
    if args.variants and set(args.variants) - runnable:
        parser.error(
            f"--variants: {sorted(set(args.variants) - runnable)} run at none of M = {p['concurrency']} with these options "
            "(a chunk or group must be smaller than M; -bf16 variants need no --no-bf16; -patches variants need --conv patches)"
        )
    out = {"benchmark": "vectorization", "quick": args.quick, "machine": common.machine(), "parameters": {**p, "repeats": args.repeats}, "rows": []}
    started = time.perf_counter()
    for m in p["concurrency"]:
        built = {conv: setup(p, m, conv) for conv in args.conv}
        samples = m * p["steps"] * p["batch"]
        ceiling = {}  # "shared" / "shared-bf16" -> the faster convolution's samples/s
        for name, conv, fn, extra in variants_of(p, m, bf16=not args.no_bf16, convs=args.conv):
            if args.variants and not (name.startswith("shared") or name in args.variants):
                continue
            store, module, params = built[conv]
            try:
                wall = fn(p, store, module, params, m, *extra, args.repeats)
                row = {"M": m, "variant": name, "conv": conv, "wall": wall, "samples_per_s": samples / wall}
            except Exception as exc:  # e.g. out of device memory for the widest vmap
                row = {"M": m, "variant": name, "conv": conv, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            precision = "shared-bf16" if "bf16" in name else "shared"
            if name.startswith("shared") and "samples_per_s" in row:
                ceiling[precision] = max(ceiling.get(precision, 0.0), row["samples_per_s"])
            reference = None if name.startswith("shared") else ceiling.get(precision)
            if "samples_per_s" in row and reference:
                row["of_ceiling"] = row["samples_per_s"] / reference
            out["rows"].append(row)
            common.write_partial(out, args.out, "vectorization")
            print(f"  M={m:<5} {name:>26}: " + (f"{row['samples_per_s']:12.0f} samples/s  {row.get('of_ceiling', float('nan')):.2f} of the ceiling" if "error" not in row else row["error"][:120]), flush=True)
        for row in out["rows"]:  # each ceiling against the faster of them
            if row["M"] == m and row["variant"].startswith("shared") and "samples_per_s" in row:
                row["of_ceiling"] = row["samples_per_s"] / ceiling["shared-bf16" if "bf16" in row["variant"] else "shared"]
    ok = [r for r in out["rows"] if "error" not in r]
    print(f"\n# per-client LEAF CNN{' (narrow, quick)' if args.quick else ''}: samples/s, {p['steps']} steps of batch {p['batch']} per client")
    print(common.table(ok, [("M", "M", "d"), ("variant", "variant", "s"), ("samples_per_s", "samples/s", ".0f"), ("of_ceiling", "of ceiling", ".2f")]))
    best = {}
    for r in ok:
        if not r["variant"].startswith("shared") and r.get("of_ceiling") is not None and r["of_ceiling"] > best.get(r["M"], {}).get("of_ceiling", -1):
            best[r["M"]] = r
    out["best"] = {str(m): r for m, r in best.items()}
    out["targets"] = [
        {
            "target": "per-client CNN >= 0.6 of the shared-weights ceiling at every M",
            "met": bool(best) and all(r["of_ceiling"] >= 0.6 for r in best.values()),
            "detail": ", ".join(f"M={m}: {r['variant']} {r['of_ceiling']:.2f}" for m, r in sorted(best.items())) or "no per-client variant ran",
        }
    ]
    return common.finish(out, args.out, "vectorization", plot, started)


def plot(out: dict, path):
    plt = common.use_matplotlib()
    rows = [r for r in out["rows"] if "error" not in r]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    ms = sorted({r["M"] for r in rows})
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(variants)), 4))
    width = 0.8 / max(1, len(ms))
    for i, m in enumerate(ms):
        values = {r["variant"]: r["samples_per_s"] for r in rows if r["M"] == m}
        ax.bar([j + i * width for j in range(len(variants))], [values.get(v, 0) for v in variants], width, label=f"M={m}")
    ax.set_xticks([j + width * (len(ms) - 1) / 2 for j in range(len(variants))], variants, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("samples / s")
    ax.set_title(f"per-client CNN training, {common.machine_title(out)}", fontsize=9)
    ax.legend(fontsize=7)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
