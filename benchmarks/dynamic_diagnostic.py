"""Diagnostic for the dynamic-vs-static gap: static gates on exactly the groups `gate --dynamic` gates
(the residual blocks' internal widths; the streams ungated), with --dynamic's gate defaults (16 channels
per gate, min_keep 0.25), and prunekit's fine-tuning defaults otherwise. If this static model matches the
full static one, the gap of the dynamic model is not its placement.

    python benchmarks/dynamic_diagnostic.py --seed 0 --out benchmarks/results/dynamic_diagnostic.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from dynamic import add_recipe_arguments, finetune_config  # this folder's dynamic benchmark: its recipe
from peers import fixture  # the accuracy benchmark's fixture (this folder)

import prunekit
from prunekit.config import GateConfig
from prunekit.dynamic import find_dynamic_blocks
from prunekit.gates import GateLayout, ungated_copy
from prunekit.measure import count_macs
from prunekit.trainer import evaluate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_recipe_arguments(ap)  # the same fixture and recipe options as benchmarks/dynamic.py
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    model, spec, loaders = fixture(args)
    total = count_macs(model, spec.example_input(1)).total_macs
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    gated = prunekit.gate(copy.deepcopy(model), spec=spec, config=GateConfig(granularity=16, min_keep=0.25))
    placement = find_dynamic_blocks(ungated_copy(gated.model).eval(), gated.graph)
    dynamic_groups = {g for b in placement.blocks for g in b.groups}
    bank = gated.bank
    fixed = [
        f or g not in dynamic_groups
        for f, g in zip(bank.layout.fixed_on, bank.layout.gate_group, strict=True)
    ]
    bank.layout = GateLayout(bank.layout.unit_gate, bank.layout.gate_group, tuple(fixed))
    bank.fixed_on.copy_(torch.tensor(fixed))
    config = finetune_config(args, args.seed)  # the recipe of benchmarks/dynamic.py
    tuned = prunekit.finetune(gated, loaders.train, loaders.val, config=config)
    slim = prunekit.slim(tuned).model
    result = {
        "command": "python benchmarks/dynamic_diagnostic.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "variant": "static gates on the dynamic groups only (streams ungated), granularity 16, min_keep 0.25",
        "seed": args.seed,
        "top1": evaluate(slim, loaders.val, torch.device("cpu")).top1,
        "macs": count_macs(slim, spec.example_input(1)).total_macs / total,
        "seconds": time.perf_counter() - start,
    }
    print(json.dumps(result))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
