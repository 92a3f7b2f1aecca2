"""Peak memory of one client update: forward-only (FwdLLM central difference) vs backprop vs plain inference.

Same model, same LoRA (r = 8 on query/value), same batch of random token ids at sequence length 128, the
same loss (CE of a fixed linear read-out of the mean-pooled last hidden state). Every measurement runs
in a fresh process (with glibc's mmap threshold fixed, see MEASURE_ENV); a sampler thread reads the
resident set size (CPU) every 2 ms, or CUDA's ``max_memory_allocated`` on a GPU. We report the peak
*above* the memory held after loading the model and the LoRA (what the update itself needs:
activations, perturbation, gradients), and the total peak.

    python benchmarks/fwd_memory.py                                  # MiniLM, batches 8..128, CPU
    python benchmarks/fwd_memory.py --model roberta-large-random --batches 8 16 32
    python benchmarks/fwd_memory.py --model smollm2 --batches 8 16 32   # LoRA on q_proj / v_proj
    python benchmarks/fwd_memory.py --device cuda --model roberta-large-random   # on a GPU machine

``roberta-large-random`` builds RoBERTa-large's shape (355 M parameters) with random weights from its
config, offline. Results go to stdout as a markdown table and, with ``--out``, as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

MODES = ("inference", "forward", "backprop")
# glibc raises its mmap threshold after large frees, after which freed activations stay in the heap and
# count in RSS (the second forward of a central difference then looks 1.4x as large as one forward
# at batch 128 while torch holds no more tensors). A fixed threshold returns large blocks to the OS
# at once, so RSS tracks what the tensors need; every mode runs under the same setting.
MEASURE_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakSampler:
    """Max RSS seen while the block runs (getrusage's peak cannot be reset between phases)."""

    def __enter__(self):
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def _build(name: str, device: str):
    import torch
    from transformers import AutoConfig, AutoModel, RobertaConfig

    if name == "roberta-large-random":
        config = RobertaConfig(
            hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096, vocab_size=50265
        )
        model = AutoModel.from_config(config)
    else:
        from bbfl.blackbox import default_model_path
        from bbfl.models import resolve_model

        path = default_model_path() if name == "minilm" else resolve_model(name)  # smollm2, a .gguf, a dir
        config = AutoConfig.from_pretrained(path)
        model = AutoModel.from_pretrained(path)
    model = model.to(device).eval().requires_grad_(False)
    return SimpleNamespace(model=model, device=torch.device(device), word_embeddings=model.get_input_embeddings())


def measure_one(model_name: str, mode: str, batch: int, seq: int, device: str) -> dict:
    """One measurement in this process (the parent runs each in a fresh process)."""
    import torch

    from bbfl.optim.zeroth_order import central_difference
    from bbfl.peft import PeftConfig, PeftWeights

    torch.manual_seed(0)
    shim = _build(model_name, device)
    weights = PeftWeights(shim, PeftConfig("lora", rank=8, alpha=16), seed=0)
    hidden = shim.model.config.hidden_size
    ids = torch.randint(1000, 20000, (batch, seq), device=device)
    labels = torch.randint(0, 2, (batch,), device=device)
    readout = torch.randn(hidden, 2, device=device) / hidden**0.5

    def loss() -> torch.Tensor:
        pooled = shim.model(input_ids=ids).last_hidden_state.mean(1)
        return torch.nn.functional.cross_entropy(pooled @ readout, labels)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    base_rss = _rss_mb()
    start = time.perf_counter()
    with PeakSampler() as sampler:
        if mode == "inference":
            with torch.inference_mode():
                float(loss())
        elif mode == "forward":

            def forward_loss() -> float:
                with torch.inference_mode():
                    return float(loss())

            central_difference(forward_loss, weights.params(), seed=0, step=0, h=1e-2)
        else:
            leaves = [p.detach().clone().requires_grad_(True) for p in weights.params()]
            with weights.swapped(leaves):
                torch.autograd.grad(loss(), leaves)
        if device == "cuda":
            torch.cuda.synchronize()
    out = {
        "model": model_name,
        "mode": mode,
        "batch": batch,
        "seq": seq,
        "device": device,
        "seconds": round(time.perf_counter() - start, 3),
        "parameters_m": round(sum(p.numel() for p in shim.model.parameters()) / 1e6, 1),
        "lora_parameters": weights.num_parameters,
        "cpu_base_mb": round(base_rss, 1),
        "cpu_peak_mb": round(sampler.peak, 1),
        "cpu_update_mb": round(sampler.peak - base_rss, 1),
    }
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        out.update(cuda_base_mb=round(base, 1), cuda_peak_mb=round(peak, 1), cuda_update_mb=round(peak - base, 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default="minilm", help="minilm, roberta-large-random, smollm2, a .gguf or a local model dir"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.model, args.one[0], int(args.one[1]), args.seq, args.device)))
        return
    key = "cuda_update_mb" if args.device == "cuda" else "cpu_update_mb"
    print(f"| model | batch | inference MB | forward-only MB | backprop MB | fwd / inf | bp / fwd |  ({key})")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batches:
        row = {}
        for mode in MODES:
            cmd = [sys.executable, __file__, "--one", mode, str(batch), "--model", args.model]
            cmd += ["--seq", str(args.seq), "--device", args.device]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=MEASURE_ENV)
            result = json.loads(done.stdout.splitlines()[-1])
            row[mode] = result
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(result) + "\n")
        inf, fwd, bp = (row[m][key] for m in MODES)
        print(
            f"| {args.model} | {batch} | {inf:.0f} | {fwd:.0f} | {bp:.0f} | {fwd / max(inf, 1e-9):.2f} | "
            f"{bp / max(fwd, 1e-9):.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
