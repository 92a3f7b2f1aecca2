"""BBT on real SST-2 from Python (16-shot, a short budget so it runs in minutes on a CPU).

python examples/bbt_sst2.py ../shared/data/sst2
"""

import sys

from bbfl.experiment import BlackBoxConfig, DataConfig
from bbfl.methods.bbt import BBTConfig, run_bbt_experiment

data_dir = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/sst2"
run, rows = run_bbt_experiment(
    DataConfig(task="sst2", data_dir=data_dir, k_shot=16, test_limit=400),
    BBTConfig(budget=600, seed=42),  # paper: 8000 queries
    BlackBoxConfig(),  # embedded MiniLM, full prompt attention (the paper's function), CPU
    out_root="runs",
)
for row in rows:
    print(f"{row['method']:>18}: test accuracy {row['test_acc']:.3f}")
print("run directory:", run.path)
