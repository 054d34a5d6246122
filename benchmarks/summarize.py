"""One table of the headline figures and targets of the benchmark JSONs in a directory.

    python benchmarks/summarize.py [benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load(directory: Path, name: str) -> dict | None:
    """<name>.json, else the rows of a run cut off before its end (<name>.partial.json, marked)."""
    path = directory / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    partial = directory / f"{name}.partial.json"
    return {**json.loads(partial.read_text()), "cut_off": True} if partial.is_file() else None


def lines(directory: Path) -> list[str]:
    out = []
    machine = None
    for name in ("throughput", "host_loop", "overhead", "scale", "vectorization", "vs_flower"):
        start = len(out)
        try:
            data = load(directory, name)
            if data is None:
                out.append(f"{name:<14} (no {name}.json)")
                continue
            file_machine = data["machine"]
            quick = " [quick sizes]" if data.get("quick") else ""
            if data.get("cut_off"):
                out.append(f"{name:<14} (cut off before its end: the rows measured until then)")
            if name == "throughput":
                for r in data["throughput"]:
                    share = f"  aggregation {r['aggregation_share']:.2f} of wall" if "aggregation_share" in r else ""  # (not in a run cut off before it)
                    out.append(
                        f"{name:<14} {r['latency']:>15} M={r['M']:<6} batch {r['mean_batch']:8.1f}  simulator {r['sim_updates_per_s']:9.0f} upd/s  "
                        f"sequential {r['seq_updates_per_s']:7.0f}  ratio {r['ratio']:7.2f}  efficiency {r['efficiency']:.2f}{share}{quick}"
                    )
                if data["throughput"] and "flat_aggregation_us_per_step" in data:
                    out.append(
                        f"{name:<14} aggregation step alone {data['throughput'][0]['aggregation_us_per_step']:.1f} us; "
                        f"on a flat layout (one vector per model) {data['flat_aggregation_us_per_step']:.1f} us{quick}"
                    )
            elif name == "host_loop":
                for r in data["rows"]:
                    out.append(
                        f"{name:<14} {r['latency']:>11} M={r['M']:<6} {r['aggregations_per_call']:>4} per call  {r['us_per_update']:6.1f} us/update  "
                        f"batch {r['mean_batch']:7.1f}" + (f"  lookahead {r['lookahead']} (not exact)" if r.get("lookahead", 1) > 1 else "") + quick
                    )
            elif name == "overhead":
                for r in data["rows"]:
                    out.append(f"{name:<14} {r['rule']:>8} {r['latency']:>15} M={r['M']:<6} overhead {r['overhead']:.2f}  efficiency {r['efficiency']:.2f}  host {r['host_us_per_update']:.0f} us/update{quick}")
            elif name == "scale":
                for r in data["rows"]:
                    if "error" in r:
                        out.append(f"{name:<14} N={r['N']:<8} M={r['M']:<6} FAILED")
                    else:
                        out.append(f"{name:<14} N={r['N']:<8} M={r['M']:<6} {r['updates_per_s']:8.0f} upd/s  setup+first run {r['total_s']:6.1f} s  peak {r['peak_rss_mb']:6.0f} MB{quick}")
            elif name == "vectorization":
                for r in data["rows"]:
                    if "error" in r:
                        out.append(f"{name:<14} M={r['M']:<6} {r['variant']:>26}: {r['error'][:80]}")
                    else:
                        out.append(f"{name:<14} M={r['M']:<6} {r['variant']:>26}: {r['samples_per_s']:10.0f} samples/s  {r.get('of_ceiling', float('nan')):.2f} of the ceiling{quick}")
            elif name == "vs_flower":
                for r in data["rows"]:
                    out.append(
                        f"{name:<14} {r['rule']:>8}: steady {r['steady_ratio']:.1f}x Flower, whole run {r['whole_run_ratio']:.1f}x shorter "
                        f"({r['cached_whole_run_ratio']:.1f}x with the compilation cache), accuracy {r['ours_accuracy']:.4f} vs {r['flower_accuracy']:.4f}{quick}"
                    )
            for t in data.get("targets", []):
                out.append(f"{'':<14} target: {t['target']}: {'met' if t['met'] else 'NOT met'} ({t['detail']})")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:  # (a file that is no such benchmark's output)
            del out[start:]
            out.append(f"{name:<14} (unreadable {name}.json: {type(exc).__name__}: {exc})")
        else:
            machine = machine or file_machine  # (from a file read whole)
    if machine:
        out.insert(0, f"machine: {machine['device_kind']} ({machine['backend']}), {machine['cpu']} x{machine['cpu_count']}, {machine['date']}, jax {machine['versions']['jax']}")
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", type=Path, default=Path(__file__).resolve().parent / "results", help="a benchmarks' --out directory")
    directory = parser.parse_args(sys.argv[1:] if argv is None else argv).directory
    if not directory.is_dir():
        sys.exit(f"error: {directory} is not a directory (a benchmarks' --out directory)")
    print("\n".join(lines(directory)))


if __name__ == "__main__":
    main()
