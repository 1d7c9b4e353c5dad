"""Wall time and peak RAM of training each zoo model on this machine (one fresh process per model).

python benchmarks/zoo.py [NAME ...]        # default: every registered zoo model
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
from workbench.zoo.train import train_zoo_model, read_train_log
start = time.perf_counter()
model_dir = train_zoo_model(sys.argv[1], sys.argv[2], progress=False)
seconds = time.perf_counter() - start
log = read_train_log(model_dir)
meta = json.loads((model_dir / "meta.json").read_text())
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"name": sys.argv[1], "seconds": round(seconds, 1), "peak_rss_mib": round(peak_mib),
                  "steps": len(log), "final_loss": log[-1]["loss"], **meta}))
"""


def main() -> None:
    from workbench.zoo.train import SPECS

    names = sys.argv[1:] or list(SPECS)
    print(f"{'model':12s} {'seconds':>8s} {'peak RSS':>9s} {'steps':>6s} {'final loss':>10s}  reference")
    for name in names:
        with tempfile.TemporaryDirectory() as workspace:
            out = subprocess.run(
                [sys.executable, "-c", CHILD, name, workspace], capture_output=True, text=True, check=True
            )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        reference = (f"unigram entropy {row['unigram_entropy']:.3f}" if "unigram_entropy" in row
                     else f"chance {row['chance_accuracy']}")  # fmt: skip
        print(
            f"{name:12s} {row['seconds']:8.1f} {row['peak_rss_mib']:6d} MiB {row['steps']:6d} {row['final_loss']:10.3f}  {reference}"
        )


if __name__ == "__main__":
    main()
