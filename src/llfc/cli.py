"""The ``llfc`` command: a thin front end over the Python API.

    llfc run [--config FILE] [--dataset NAME] ...      train pairs, measure, report (default: digits)
    llfc analyze A B [--dataset NAME] ...              measure two existing checkpoints
    llfc align A B --method weight|activation|ste --out C  permute B's units onto A's (Git Re-Basin)
    llfc probes MODEL [--dataset NAME]                 list the feature maps llfc can measure
    llfc report DIR                                    (re)build DIR/report.html (run or sweep folder)
    llfc reproduce --list | NAME                       the paper's experiments, one command each
    llfc sweep CONFIG [--jobs N] [--backend submitit]  a grid of pairs (k, seeds, widths...), aggregated
    llfc list                                          registered datasets and models

Bad input (unknown names, missing data, incompatible checkpoints, ...) prints one paragraph that
says what is wrong and how to fix it, and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from llfc.errors import ConfigError, LLFCError


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


def _model_args(text: str | None, flag: str = "--model-args", example: str = '{"widths": [64]}') -> dict | None:
    """Parse the JSON object of ``flag`` (--model-args, --dataset-args) into a dict (None when not given)."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"{flag} must be JSON, e.g. '{example}' (keys in double quotes); got {text!r} ({e.msg})."
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag} must be a JSON object, got {text!r}.")
    return value


def _alphas(text: str):
    """``11`` (grid size, at least 5) or ``0,0.25,0.5,0.75,1`` (explicit values).

    Raises:
        ConfigError: a count below 5 (the message suggests the list form).
    """
    if "," not in text and "." not in text:
        try:
            n = int(text)
        except ValueError:
            pass
        else:
            if n < 5:
                raise ConfigError(
                    f"--alphas {text}: a count needs at least 5 points (0, .25, .5, .75, 1). To choose the α "
                    "values yourself, list them, e.g. --alphas 0,0.5,1 (0.25 and 0.75 are then added: the LLFC "
                    "criterion is judged at them)."
                )
            return n
    return _floats(text)


def _add_measure_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement")
    g.add_argument(
        "--alphas",
        type=str,
        help="α grid: a count n (default 11: 0,.1,.2,.25,.4,.5,.6,.75,.8,.9,1; n points of linspace(0,1,n) "
        "with those nearest .25/.5/.75 moved onto them) or comma-separated values; "
        "α weights model A (θ_α = α·θ_A + (1−α)·θ_B); 0, .25, .5, .75, 1 are always included; "
        "write --alphas=-0.2,0.5 for values starting with a minus sign",
    )
    g.add_argument("--allow-extrapolation", action="store_true", help="accept α outside [0, 1]")
    g.add_argument("--abs-cos", action="store_true", help="use the official code's 1−|cos| instead of 1−cos")
    g.add_argument(
        "--per-token",
        action="store_true",
        help="for (B, T, D) token features: per-token cosine averaged over tokens "
        "(default: the paper's per-sample cosine of the flattened T·D vector)",
    )
    g.add_argument("--kinds", type=str, help="probe kinds to measure, comma-separated (pre,norm,post,residual,logits)")
    g.add_argument("--probes", type=str, help="probe names to measure, comma-separated (see `llfc probes`)")
    g.add_argument("--test-samples", type=int, help="measure on the first N test samples (default: all)")
    g.add_argument("--train-samples", type=int, help="train subset size for the train-set LMC curve")
    g.add_argument(
        "--bn-mode",
        choices=["interpolate", "reset"],
        help="BatchNorm running statistics along the path: interpolate (lerped like the weights, the "
        "official LLFC code; default) or reset (recomputed on training batches for every interior α, "
        "REPAIR-style; the endpoints keep their trained statistics, so the barrier compares reset "
        "interior networks against the trained endpoints)",
    )
    g.add_argument("--no-conditions", action="store_true", help="skip weak additivity and commutativity")
    g.add_argument(
        "--stitch-points",
        choices=["official", "pre"],
        help="identity stitching at the official code's points (default; ResNets: conv1, every "
        "block output, the final Linear) or at every Linear/Conv output (pre)",
    )


def _measure_overrides(args) -> dict:
    m = {}
    if args.abs_cos:
        m["absolute_cos"] = True
    if getattr(args, "per_token", False):
        m["per_token"] = True
    if args.kinds:
        m["kinds"] = args.kinds.split(",")
    if args.probes:
        m["probes"] = args.probes.split(",")
    if args.test_samples is not None:
        if args.test_samples < 1:
            raise ConfigError(
                f"--test-samples must be ≥ 1 (omit it to use the whole test set), got {args.test_samples}."
            )
        m["test_samples"] = args.test_samples
    if args.train_samples is not None:
        if args.train_samples < 0:
            raise ConfigError(
                f"--train-samples must be ≥ 0 (0 skips the train-set LMC curve), got {args.train_samples}."
            )
        m["train_samples"] = args.train_samples
    if args.bn_mode:
        m["bn_mode"] = args.bn_mode
    if args.no_conditions:
        m["conditions"] = False
    if args.stitch_points:
        m["stitch_points"] = args.stitch_points
    return m


def _default_out(prefix: str) -> Path:
    from llfc.distributed import broadcast_object  # under torchrun: rank 0's clock names it

    return Path(broadcast_object(str(Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")))


def cmd_run(args) -> int:
    """`llfc run`: build an ExperimentConfig from --config and the flags, run it."""
    from llfc.config import ExperimentConfig
    from llfc.experiment import run_experiment

    cfg = ExperimentConfig.from_yaml(args.config) if args.config else ExperimentConfig()
    d = cfg.to_dict()
    if args.model is not None and args.model != d.get("model"):
        d["model_args"] = None  # another architecture: the config's arguments were for the old one
    for key, val in (
        ("dataset", args.dataset),
        ("data_root", args.data_root),
        ("model", args.model),
        ("spawn_epoch", args.spawn_epoch),
        ("seed", args.seed),
        ("device", args.device),
    ):
        if val is not None:
            d[key] = val
    if args.dataset is not None and args.model is None and not args.config:
        d["model"] = None  # take the dataset's default architecture
    if args.download:
        d["download"] = True
    if args.pairs:
        d["pairs"] = args.pairs.split(",")
    if args.model_args:
        d["model_args"] = {**(d.get("model_args") or {}), **(_model_args(args.model_args) or {})}
    if args.dataset_args:
        dargs = _model_args(args.dataset_args, "--dataset-args", '{"context": 64}')
        d["dataset_args"] = {**(d.get("dataset_args") or {}), **(dargs or {})}
    if args.widths:
        try:
            widths = [int(w) for w in args.widths.split(",")]
        except ValueError:
            raise ConfigError(
                f"--widths takes comma-separated whole numbers, e.g. 512,512,512; got {args.widths!r}."
            ) from None
        d["model_args"] = {**(d.get("model_args") or {}), "widths": widths}
    if args.alphas:
        d["alphas"] = _alphas(args.alphas)
    if args.allow_extrapolation:
        d["allow_extrapolation"] = True
    train = dict(d.get("train") or {})
    for key, val in (("epochs", args.epochs), ("lr", args.lr), ("batch_size", args.batch_size)):
        if val is not None:
            train[key] = val
    d["train"] = train
    d["measure"] = {**d["measure"], **_measure_overrides(args)}
    cfg = ExperimentConfig.from_dict(d)
    out = Path(args.out) if args.out else _default_out(cfg.dataset)
    run_experiment(cfg, out, overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def cmd_analyze(args) -> int:
    """`llfc analyze A B`: measure two existing checkpoints."""
    from llfc.config import MeasureConfig
    from llfc.experiment import analyze_checkpoints

    measure = MeasureConfig(**_measure_overrides(args))
    if args.model_args and not args.model:
        raise ConfigError(
            "--model-args needs --model NAME: it describes plain weights that record no architecture. "
            "llfc checkpoints record theirs (their JSON sidecar); drop --model-args for them."
        )
    out = Path(args.out) if args.out else _default_out("analyze")
    analyze_checkpoints(
        args.a,
        args.b,
        out,
        dataset=args.dataset,
        data_root=args.data_root,
        model=args.model,
        model_args=_model_args(args.model_args),
        download=args.download,
        alphas=_alphas(args.alphas) if args.alphas else 11,
        allow_extrapolation=args.allow_extrapolation,
        measure=measure,
        device=args.device or "cpu",
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return 0


def cmd_report(args) -> int:
    """`llfc report DIR`: (re)build the self-contained report.html of a run or sweep folder."""
    from llfc.report.html import write_html_report

    path = write_html_report(args.dir)
    print(f"wrote {path} (self-contained; open it in a browser)")
    return 0


def cmd_align(args) -> int:
    """`llfc align A B`: permute B onto A and write the aligned checkpoint."""
    from llfc.experiment import align_checkpoints

    align_checkpoints(
        args.a,
        args.b,
        args.out,
        method=args.method,
        dataset=args.dataset,
        data_root=args.data_root,
        seed=args.seed or 0,
        overwrite=args.overwrite,
        model=args.model,
        model_args=_model_args(args.model_args),
        ste_epochs=args.ste_epochs,
        ste_lr=args.ste_lr,
    )
    return 0


def cmd_probes(args) -> int:
    """`llfc probes MODEL`: print the probe-able feature maps with shapes."""
    import torch

    from llfc.data import dataset_info
    from llfc.models import create_model
    from llfc.probe import FeatureExtractor, select_probes

    info = dataset_info(args.dataset)
    kwargs = _model_args(args.model_args) or {}
    model = create_model(args.model, input_shape=list(info.input_shape), num_classes=info.num_classes, **kwargs)
    x = torch.zeros(1, *info.input_shape, dtype=torch.long if info.modality == "text" else None)
    try:
        with torch.no_grad():
            model.eval()(x)
    except (RuntimeError, ValueError, IndexError) as e:
        kind = "windows of token ids" if info.modality == "text" else "images (channels, height, width)"
        raise ConfigError(
            f"{args.model} cannot take {args.dataset}'s inputs, {kind} of shape {tuple(info.input_shape)} "
            f"({str(e).splitlines()[0]}). Pass a --dataset of the kind the model reads (gpt: text such "
            f"as tinyshakespeare; vit, mlp, lenet, vgg, resnet: images), or other --model-args."
        ) from None
    fe = FeatureExtractor(model)
    probes = select_probes(fe.all_probes, kinds=args.kinds.split(",") if args.kinds else None)
    feats = fe.__class__(model, names=[p.name for p in probes if p.kind != "logits"])
    shapes = {k: tuple(v.shape[1:]) for k, v in feats(model.state_dict(), x).items()}
    print(f"{'name':<32} {'kind':<9} {'op':<14} {'feature shape':<18} conditions")
    for p in probes:
        cond = []
        if p.kind == "post" and p.input_node:  # ReLU, or any elementwise σ (GELU) without Theorem 1
            cond.append("weak additivity")
        if p.kind in ("pre", "logits") and p.input_node and not p.from_input:
            cond.append("commutativity")
        print(f"{p.name:<32} {p.kind:<9} {p.op:<14} {str(shapes.get(p.node, '')):<18} {', '.join(cond)}")
    return 0


def cmd_list(args) -> int:
    """`llfc list`: registered datasets and models."""
    from llfc.data import dataset_info, list_datasets
    from llfc.models import list_models

    print("datasets:")
    for n in list_datasets():
        i = dataset_info(n)
        if i.modality == "text":
            print(
                f"  {n:<15} text: windows of {i.input_shape[0]} characters (llfc run --dataset-args "
                f"'{{\"context\": T}}'), {i.num_classes}-character vocabulary"
            )
            continue
        print(
            f"  {n:<15} input {i.input_shape}, {i.num_classes} classes"
            + ("" if i.needs_files else " (bundled, no files needed)")
        )
    print("models:")
    print("  " + ", ".join(list_models()))
    return 0


def cmd_reproduce(args) -> int:
    """`llfc reproduce`: list or run the paper's experiments."""
    from llfc import reproduce

    if args.list or not args.name:
        print(reproduce.format_list(args.scale))
        return 0
    out = Path(args.out) if args.out else _default_out(args.name)
    reproduce.run(
        args.name,
        out,
        scale=args.scale,
        data_root=args.data_root,
        device=args.device or "auto",
        dry_run=args.dry_run,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    return 0


def cmd_sweep(args) -> int:
    """`llfc sweep CONFIG`: run (or resume) a grid of pairs and aggregate it (llfc.sweep)."""
    from llfc import sweep

    if args.aggregate_only:
        if not args.out:
            raise ConfigError("--aggregate-only needs --out SWEEP_FOLDER (the folder of the sweep to aggregate).")
        sweep.aggregate(args.out)
        return 0
    cfg = sweep.find_config(args.config)
    out = Path(args.out) if args.out else _default_out(cfg.stem)
    data_root = {"data_root": args.data_root} if args.data_root else {}
    sc = sweep.SweepConfig.from_yaml(cfg)
    if data_root or args.device:
        sc.base = {**sc.base, **data_root, **({"device": args.device} if args.device else {})}
    sweep.check_backend(args.backend)
    sweep.run_sweep(sc, out, jobs=args.jobs, threads=args.threads, backend=args.backend, progress=not args.no_progress)
    print(f"\nsweep tables, figures and report.html in {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``llfc`` command."""
    from llfc import __version__

    p = argparse.ArgumentParser(
        prog="llfc", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"llfc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def common(q, data=True, out=True):
        if data:
            q.add_argument(
                "--data-root", help="data folder in torchvision's layout (default $LLFC_DATA_ROOT or ./data)"
            )
            q.add_argument("--download", action="store_true", help="download missing data (needs internet)")
        if out:
            q.add_argument("--out", help="output folder (default runs/<name>-<time>)")
        q.add_argument("--overwrite", action="store_true", help="replace results already in --out")
        q.add_argument("--device", help="cpu, cuda or auto")
        q.add_argument(
            "--threads",
            type=int,
            help="torch CPU threads (default $OMP_NUM_THREADS, else the "
            "cores available; results are bit-identical only for the same count; use 1 on a "
            "machine other jobs load)",
        )
        q.add_argument("--no-progress", action="store_true", help="no progress bars")

    r = sub.add_parser("run", help="train pairs, measure LMC/LLFC, write results and figures")
    r.add_argument("--config", help="YAML experiment description (CLI flags override it)")
    r.add_argument("--dataset", help="dataset name (default digits; see `llfc list`)")
    r.add_argument("--model", help="architecture name (default: the dataset's)")
    r.add_argument("--widths", help="MLP hidden widths, comma-separated (e.g. 512,512,512)")
    r.add_argument(
        "--model-args",
        help='architecture arguments as JSON, e.g. \'{"width": 32, "depth": 2}\' for vit/gpt '
        "(merged over the config's; see docs/models.md)",
    )
    r.add_argument(
        "--dataset-args",
        help="dataset options as JSON, e.g. '{\"context\": 64}' for a text dataset (window length T, and "
        "stride; merged over the config's dataset_args)",
    )
    r.add_argument(
        "--pairs",
        help="comma-separated: spawn, independent, permutation-weight, "
        "permutation-activation, permutation-ste; or finetune alone (Cross-Task Linearity; "
        "needs --config with a finetune: section, see docs/results-ctl.md)",
    )
    r.add_argument("--spawn-epoch", type=int, help="epoch k at which the spawned pair forks (0 allowed)")
    r.add_argument("--epochs", type=int, help="training epochs")
    r.add_argument("--lr", type=float, help="learning rate")
    r.add_argument("--batch-size", type=int, help="training batch size")
    r.add_argument("--seed", type=int, help="master seed (every other seed derives from it)")
    common(r)
    _add_measure_args(r)
    r.set_defaults(func=cmd_run)

    a = sub.add_parser("analyze", help="measure two existing checkpoints")
    a.add_argument("a", help="checkpoint of model A (.safetensors with its .json sidecar)")
    a.add_argument("b", help="checkpoint of model B")
    a.add_argument("--dataset", help="dataset (default: recorded in the checkpoint)")
    a.add_argument("--model", help="architecture of plain .safetensors files without JSON sidecars")
    a.add_argument("--model-args", help="its arguments as JSON, e.g. '{\"widths\": [64]}'")
    common(a)
    _add_measure_args(a)
    a.set_defaults(func=cmd_analyze)

    al = sub.add_parser("align", help="permute B's hidden units onto A's (Git Re-Basin)")
    al.add_argument("a", help="checkpoint of model A (the reference)")
    al.add_argument("b", help="checkpoint of model B (the one permuted onto A)")
    al.add_argument(
        "--method",
        choices=["weight", "activation", "ste"],
        default="weight",
        help="weight matching, activation matching, or the straight-through estimator (ste: needs --dataset, "
        "or one recorded in the checkpoints; --ste-epochs, --ste-lr; docs/permutation.md)",
    )
    al.add_argument("--dataset", help="dataset for activation matching (default: recorded in the checkpoint)")
    al.add_argument("--seed", type=int, help="seed of weight matching's group order (default 0)")
    al.add_argument("--model", help="architecture of plain .safetensors / .pt files without JSON sidecars")
    al.add_argument("--model-args", help="its arguments as JSON, e.g. '{\"widths\": [64]}'")
    al.add_argument(
        "--ste-epochs",
        type=int,
        help="--method ste: epochs over the alignment data (default 1; config key align.ste_epochs)",
    )
    al.add_argument("--ste-lr", type=float, help="--method ste: SGD learning rate (default 0.01; align.ste_lr)")
    al.add_argument(
        "--out",
        required=True,
        help="required: the aligned B is written to OUT.safetensors + OUT.json (+ OUT.report.json); "
        "when OUT is an existing folder, inside it as <B's name>_aligned",
    )
    common(al, out=False)
    al.set_defaults(func=cmd_align)

    pr = sub.add_parser("probes", help="list the feature maps llfc measures for a model")
    pr.add_argument("model", help="registered architecture (see `llfc list`)")
    pr.add_argument("--dataset", default="digits", help="sets the input shape and classes (default digits)")
    pr.add_argument("--model-args", help="architecture arguments as JSON, e.g. '{\"widths\": [64]}'")
    pr.add_argument("--kinds", help="only these kinds, comma-separated")
    pr.set_defaults(func=cmd_probes)

    rep = sub.add_parser(
        "report",
        help="(re)build report.html in a run or sweep folder",
        description="Write DIR/report.html: one self-contained page (figures embedded) "
        "with the summary, figures, tables, config and environment of a run folder "
        "(llfc run / analyze), or the co-occurrence table and one row per pair of a "
        "sweep folder.",
    )
    rep.add_argument("dir", help="run folder (holding results.json) or sweep folder")
    rep.set_defaults(func=cmd_report)

    rp = sub.add_parser("reproduce", help="run one of the paper's experiments")
    rp.add_argument("name", nargs="?", help="experiment name (see --list); without it, the list is shown")
    rp.add_argument("--list", action="store_true", help="list the experiments with their cost")
    rp.add_argument(
        "--scale",
        choices=["paper", "cpu"],
        default="cpu",
        help="paper: published settings (GPU); cpu: reduced, finishes on 2 cores (default)",
    )
    rp.add_argument("--dry-run", action="store_true", help="run a few batches of each stage only")
    common(rp)
    rp.set_defaults(func=cmd_reproduce)

    sw = sub.add_parser(
        "sweep",
        help="a grid of pairs (spawn point k, seeds, widths, ...), aggregated",
        description="Run or resume a sweep: a grid of pairs over the spawn point k, seeds, "
        "widths, architectures, datasets and pair kinds (YAML: see llfc.sweep), then "
        "aggregate it into sweep.csv, the co-occurrence table and figures.",
    )
    sw.add_argument("config", help="sweep YAML file, or a catalogue name (`llfc reproduce --list`)")
    sw.add_argument("--out", help="sweep folder (default runs/<name>-<time>); rerun to resume")
    sw.add_argument("--jobs", type=int, default=1, help="parallel local worker processes (default 1)")
    sw.add_argument(
        "--threads",
        type=int,
        help="torch threads per job (default $OMP_NUM_THREADS, else the cores available // --jobs)",
    )
    sw.add_argument(
        "--backend",
        choices=["local", "submitit"],
        default="local",
        help="local process pool, or submitit (Slurm; needs `pip install submitit`)",
    )
    sw.add_argument("--data-root", help="data folder in torchvision's layout (default $LLFC_DATA_ROOT or ./data)")
    sw.add_argument("--device", help="cpu, cuda or auto (overrides the config's base)")
    sw.add_argument("--aggregate-only", action="store_true", help="only re-aggregate the finished pairs in --out")
    sw.add_argument("--no-progress", action="store_true", help="no progress bars")
    sw.set_defaults(func=cmd_sweep)

    ls = sub.add_parser(
        "list",
        help="registered datasets and models",
        description="List the registered datasets and model architectures.",
    )
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llfc`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    warnings.filterwarnings("once")
    warnings.showwarning = lambda msg, cat, *a, **k: print(f"llfc: warning: {msg}", file=sys.stderr)
    from llfc import distributed

    who = ""
    owned = not distributed.is_active()  # a group set up by the caller is left to the caller
    try:
        if hasattr(args, "threads"):
            from llfc.seeding import set_threads

            set_threads(args.threads)
        if distributed.init_from_env(device=getattr(args, "device", None) or "cpu"):
            who = f" (rank {distributed.rank()} of {distributed.world_size()})"
            if not distributed.is_main():  # rank 0 alone prints and draws progress bars
                warnings.simplefilter("ignore")
                args.no_progress = True
                sys.stdout = open(os.devnull, "w")
        return args.func(args)
    except LLFCError as e:
        print(f"llfc: error{who}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no: a path that is a file, not writable, full...
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(
            f"llfc: error: {e.strerror or e}{where}. Check the paths given (--out, --data-root, "
            f"checkpoints): they must exist, be folders where folders are expected, and be "
            f"writable where llfc writes.",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        again = "the same command without --overwrite" if getattr(args, "overwrite", False) else "the same command"
        print(f"llfc: interrupted. Run {again} again to resume from the last checkpoint.", file=sys.stderr)
        return 130
    finally:
        if owned:
            distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
