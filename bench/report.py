"""The chart of bench/results/vm_start.json: latency per phase for each burst size, operator against raw.

    .venv/bin/pip install -e '.[bench]'      # matplotlib
    .venv/bin/python bench/report.py [--input bench/results/vm_start.json] [--output bench/results/vm_start.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# (label, operator phase, raw phase or None)
BARS = [("Scheduled", "scheduled", None), ("defined", "defined", "defined"), ("running", "running", "running"),
        ("Ready", "ready", "running"), ("delete:\ndomain gone", "domain_gone", "domain_gone"),
        ("delete:\nobject gone", "object_gone", "domain_gone")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, default=RESULTS / "vm_start.json")
    ap.add_argument("--output", type=Path, default=RESULTS / "vm_start.png")
    args = ap.parse_args()
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("matplotlib is needed: .venv/bin/pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(args.input.read_text())
    sizes = sorted(data["sizes"], key=int)
    fig, axes = plt.subplots(1, len(sizes), figsize=(4 * len(sizes), 3.6), dpi=80, squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        raw, op = data["sizes"][size]["raw"], data["sizes"][size]["operator"]
        xs = range(len(BARS))
        width = 0.38
        for offset, side, color, label in ((-width / 2, "raw", "#999999", "raw libvirt"),
                                           (width / 2, "operator", "#1f77b4", "operator")):
            p50, p95 = [], []
            for _, op_phase, raw_phase in BARS:
                phase = raw_phase if side == "raw" else op_phase
                figures = (raw if side == "raw" else op).get(phase or "", {})
                p50.append(figures.get("p50", 0))
                p95.append(figures.get("p95", 0))
            ax.bar([x + offset for x in xs], p95, width, color=color, alpha=0.45, label=f"{label} p95")
            ax.bar([x + offset for x in xs], p50, width, color=color, label=f"{label} p50")
        ax.set_xticks(list(xs), [b[0] for b in BARS], fontsize=7)
        ax.set_title(f"{size} VM{'s' if int(size) > 1 else ''} at once", fontsize=10)
        ax.set_ylabel("seconds from apply / delete", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    axes[0][0].legend(fontsize=7)
    m = data.get("machine", {})
    fig.suptitle(f"libvirt-operator vs raw libvirt ({m.get('cores')} cores, {m.get('accel')}, {m.get('when')})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.exit(main())
