"""timm coverage: analyse, slim by a random plan and check 40+ timm classification models.

Every model is built by prunekit's `timm:NAME` source (random weights, then every parameter and
BatchNorm statistic randomised), traced, analysed, slimmed by a random 50% plan and checked against the
masked model, exactly as benchmarks/coverage.py does for torchvision. Writes docs/coverage-timm.md:
exact / frozen with reason / failed with reason, and the prunable share of the MACs.

    python benchmarks/coverage_timm.py                       # the whole list below
    python benchmarks/coverage_timm.py --models resnet18,vit_tiny_patch16_224
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import coverage as zoo  # noqa: E402  (benchmarks/coverage.py: the per-model check and the table)

# family -> models (random weights; "drop_path_rate" marks the stochastic-depth variants)
MODELS = {
    "resnet": ["resnet18", "resnet50", "resnet26d", "resnet50d", "seresnet50", "ecaresnet26t", "skresnet18"],
    "resnet, stochastic depth": ["resnet34+sd", "resnet50+sd"],
    "resnet variants": ["res2net50_26w_4s", "resnext26ts", "cspresnet50", "dla34", "dpn68", "selecsls42b"],
    "regnet": ["regnetx_002", "regnety_002", "regnetz_b16"],
    "efficientnet / mobilenet (SE)": [
        "efficientnet_b0",
        "efficientnet_lite0",
        "tf_efficientnetv2_b0",
        "mobilenetv2_100",
        "mobilenetv3_small_100",
        "mobilenetv3_large_100",
        "mnasnet_100",
        "fbnetc_100",
        "tinynet_a",
        "lcnet_050",
        "hardcorenas_a",
    ],
    "ghostnet / rexnet": ["ghostnet_100", "rexnet_100"],
    "classic": ["vgg11_bn", "densenet121", "inception_v3", "xception41", "hrnet_w18_small", "darknet53"],
    "convnext": ["convnext_atto", "convnextv2_atto", "convnext_pico"],
    "transformers": [
        "vit_tiny_patch16_224",
        "deit_tiny_patch16_224",
        "pit_ti_224",
        "levit_128s",
        "crossvit_tiny_240",
        "mobilevit_xxs",
        "edgenext_xx_small",
        "efficientformer_l1",
    ],
    "mlp / metaformer": ["mixer_s16_224", "resmlp_12_224", "poolformer_s12"],
}
# models with a fixed input size (position embeddings, attention resolutions); the rest run at 64 px
FIXED_SIZE = ("vit_", "deit_", "pit_", "levit_", "crossvit_", "mixer_", "resmlp_", "efficientformer_")


def builder(entry: str):  # noqa: ANN201
    from prunekit.models import resolve_source

    name, _, variant = entry.partition("+")
    args = {"drop_path_rate": 0.1} if variant == "sd" else {}
    source = resolve_source(f"timm:{name}")
    return lambda: source.build(None, **args)


SIZE = {"inception_v3": 128}  # its stem needs more than 64 px


def size_of(entry: str) -> int:
    name = entry.partition("+")[0]
    if name in SIZE:
        return SIZE[name]
    if name.startswith(FIXED_SIZE):
        import timm

        return int(timm.create_model(name, pretrained=False).pretrained_cfg["input_size"][-1])
    return 64


def main(argv: list[str] | None = None) -> int:
    import timm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="comma-separated subset (default: every model listed here)")
    parser.add_argument("--out", type=Path, default=Path("docs/coverage-timm.md"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    entries = [m for ms in MODELS.values() for m in ms]
    if args.models:
        entries = [m.strip() for m in args.models.split(",") if m.strip()]
    command = shlex.join(["python", "benchmarks/coverage_timm.py", *(sys.argv[1:] if argv is None else argv)])
    family = {m: f for f, ms in MODELS.items() for m in ms}
    rows = []
    for entry in entries:
        try:
            row = zoo.run_one(entry, size_of(entry), builder(entry))
        except Exception as exc:  # a model timm cannot build here: reported, never silent
            row = zoo.Row(entry, 0, error=f"build: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        rows.append(row)
        zoo.print_row(row)
        args.out.write_text(render(rows, len(entries), command, family, args.threads, timm.__version__))
    exact = sum(r.exact for r in rows)
    print(f"{exact} of {len(rows)} timm models slim exactly; wrote {args.out}")
    return 0


def render(rows, total, command, family, threads, timm_version) -> str:  # noqa: ANN001
    exact = sum(r.exact for r in rows)
    lines = [
        "# timm coverage: analyse, slim, check",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()} (timm {timm_version}, torch "
        f"{torch.__version__}, Python {platform.python_version()}, {threads} thread(s)).",
        "",
        f"**{exact} of {len(rows)} timm models slim exactly**"
        + ("" if len(rows) == total else f" (partial: {len(rows)} of {total})")
        + ". Method as in `docs/coverage.md`: random weights and BatchNorm statistics, a random 50% plan "
        "of every prunable group, exact when max |slim - masked| <= 1e-4 x max |output|. A model that "
        "cannot be traced or analysed is listed with the first line of its error; anything frozen is "
        "listed with its reason; *prunable MACs* is the share of the MACs that depends on a prunable "
        "group. `+sd`: built with `drop_path_rate=0.1` (stochastic depth, identity in eval mode).",
        "",
        "| model | family | input | status | groups | prunable MACs | MACs | ratio | frozen |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r.name, family.get(r.name, "-"), str(r.size or "-"), zoo._status(r), str(r.groups)]
        cells += [f"{r.prunable_fraction:.1%}", zoo._m(r.macs), zoo._ratio(r), "; ".join(r.reasons) or "-"]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
