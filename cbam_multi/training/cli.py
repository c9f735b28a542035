"""`cbam-multi` command line: a thin layer over the library. Each subcommand lives in one function.

    cbam-multi parity [--preset P ...] [--dtype D ...] [--backends torch jax] [--compile] [--model resnet18|resnet50] [--device cuda]
    cbam-multi parity --train [--steps 200] [--dtype D ...]       # torch vs JAX training trajectories
    cbam-multi train --backend torch|jax [--epochs N --batch-size B --lr LR --seed S --no-cbam --dataset D
                     --data-dir DIR --n-train N --n-test N --out DIR --resume --init-from CKPT --dtype D ...]
                     [--distributed]   # data parallel: torchrun (torch DDP) / multi-host JAX; see docs/SCALE_OUT.md
    cbam-multi evaluate --backend torch|jax --checkpoint CKPT_OR_RUN_DIR [--dataset D --data-dir DIR ...]
    cbam-multi convert IN OUT --from official|timm|torchvision|canonical --to ... [--add-cbam PRESET]
    cbam-multi convert IN --list                                   # the CBAM blocks of a checkpoint
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from cbam_multi.spec import CBAMSpec

# The one data-location policy (`cbam_multi.training.data.find_mnist_dir`), as every --data-dir help says it.
DATA_DIR_HELP = (
    "default: $CBAM_MNIST_DIR, then ~/.cache/cbam_multi/mnist (or $CBAM_MULTI_CACHE), a torchvision-style "
    "MNIST/raw folder under either or ./data, then a download into that cache"
)

DEBUG_ENV = "CBAM_MULTI_DEBUG"  # set (to anything but "" or "0") for the traceback of a user error, like --debug


class _Parser(argparse.ArgumentParser):
    """Bad flags: one line (what is wrong, where to look) and exit 2, instead of the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int):
    """An argparse type: a whole number >= ``low``, else a one-line usage error naming the flag."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


_positive_int, _nonneg_int = _int_at_least(1), _int_at_least(0)


def cmd_parity(args: argparse.Namespace) -> int:
    """Print max errors per case, backend pair and quantity; exit 1 if any exceeds its tolerance."""
    if getattr(args, "train", False):
        return cmd_parity_train(args)
    if "jax" in args.backends:  # `--backends torch` imports no JAX at all
        import jax

        # float64 cases need x64; parity is about exact maths, so no reduced-precision matmuls either.
        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_default_matmul_precision", "highest")
    from cbam_multi.parity import TORCH_DEVICE_ENV

    previous = os.environ.get(TORCH_DEVICE_ENV)
    if args.device:  # the runners read the device from the environment; put it back afterwards
        os.environ[TORCH_DEVICE_ENV] = args.device
    try:
        return _parity_report(args)
    finally:
        if previous is None:
            os.environ.pop(TORCH_DEVICE_ENV, None)
        else:
            os.environ[TORCH_DEVICE_ENV] = previous


def _parity_report(args: argparse.Namespace) -> int:
    from cbam_multi.parity import CASES, check_case, devices, format_table

    print(devices(tuple(args.backends)))
    rows = []
    if args.model != "cbam":  # whole networks: torch vs JAX vs the float64 oracle
        from cbam_multi import parity_resnet

        depth = int(args.model[len("resnet"):])
        for case in [c for c in parity_resnet.RESNET_CASES if c.depth == depth]:
            for dtype in args.dtype:
                rows += parity_resnet.check_case(case, dtype, backends=tuple(args.backends))
    else:
        for case in [c for c in CASES if c.preset in args.preset]:
            for dtype in args.dtype:
                rows += check_case(case, dtype, backends=tuple(args.backends), with_compile=args.compile or None)
    print(format_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"\n{len(rows) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    from cbam_multi import __version__

    parser = _Parser(prog="cbam-multi", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cbam-multi {__version__}")
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of errors (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parity", help="cross-framework numerical parity report (CBAM block)")
    p.add_argument("--preset", nargs="+", choices=CBAMSpec.PRESETS, default=list(CBAMSpec.PRESETS),
                   help="CBAM presets whose cases to run (default: all)")
    p.add_argument("--dtype", nargs="+", choices=("float64", "float32"), default=["float64", "float32"],
                   help="precisions to check (default: both)")
    p.add_argument("--backends", nargs="+", choices=("torch", "jax"), default=["torch", "jax"],
                   help="frameworks to compare with the NumPy oracle and each other; only these are imported (default: both)")
    p.add_argument("--model", choices=("cbam", "resnet18", "resnet50"), default="cbam",
                   help="cbam: the CBAM block cases (default); resnet18 / resnet50: whole ResNet-CBAM networks")
    p.add_argument("--compile", action="store_true", help="compare torch.compile with eager on every case (slow)")
    p.add_argument("--device", default=None,
                   help="torch device of the torch side: cpu, cuda or cuda:N (default: $CBAM_MULTI_TORCH_DEVICE, else cpu); "
                        "JAX runs on its default backend, and the first line printed names both")
    p.add_argument("--train", action="store_true", help="instead: torch vs JAX MNIST training trajectories (loss per step)")
    p.add_argument("--steps", type=_positive_int, default=200, help="with --train: optimizer steps (default 200)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="with --train: batch size (default 64)")
    p.add_argument("--n-test", type=_positive_int, default=1000,
                   help="with --train: test images both trained models are evaluated and compared on (default 1000)")
    p.add_argument("--data-dir", default=None, help="with --train: folder with the full MNIST IDX files (" + DATA_DIR_HELP + ")")
    p.set_defaults(func=cmd_parity)

    add_train_parser(sub)
    add_evaluate_parser(sub)
    add_plot_parser(sub)
    add_convert_parser(sub)
    return parser


# ---------------------------------------------------------------- training (train / evaluate / parity --train)
def _setup_jax(dtype: str) -> None:
    """JAX computes float64 only in x64 mode; turn it on when asked for float64."""
    if dtype == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_default_matmul_precision", "highest")


def _default_data_dir(dataset: str):
    from cbam_multi.training import default_mnist_dir

    if dataset == "sample":
        return None
    d = default_mnist_dir()
    return None if d is None else str(d)


def cmd_parity_train(args: argparse.Namespace) -> int:
    """Train the same model from the same init on the same batches in torch and JAX; print the loss curves."""
    import tempfile

    from cbam_multi.training import format_trajectory, trajectory_parity, trajectory_tolerance
    from cbam_multi.training.data import find_mnist_dir

    for dtype in args.dtype:
        trajectory_tolerance(dtype, args.steps)  # ConfigError now, not after training both backends
    if "float64" in args.dtype:
        _setup_jax("float64")
    data_dir = args.data_dir or _default_data_dir("mnist")
    if find_mnist_dir(data_dir) is None:  # before any training: the 5,000-image sample is too small for 200 steps
        from cbam_multi.training.data import load_mnist

        load_mnist(None, dataset="mnist")  # downloads into the cache, or raises DataError saying where it looked
    failed = 0
    for dtype in args.dtype:
        with tempfile.TemporaryDirectory(prefix="cbam-trajectory-") as tmp:
            report = trajectory_parity(args.steps, dtype, batch_size=args.batch_size, n_test=args.n_test, data_dir=data_dir,
                                       out_root=tmp)
        print(format_trajectory(report, every=max(1, args.steps // 20)) + "\n")
        failed += not report["ok"]
    return 1 if failed else 0


def add_train_parser(sub) -> None:
    from cbam_multi.training.config import DATASETS, MODEL_PRESETS, OPTIMIZERS, SCHEDULES

    p = sub.add_parser("train", help="train MNISTNet or a ResNet (CBAM) on MNIST with torch or JAX; metrics + checkpoints in --out")
    p.add_argument("--backend", choices=("torch", "jax"), help="default: the --config file's, else torch")
    p.add_argument("--config", help="a TrainConfig JSON file; the flags below override its fields")
    p.add_argument("--model", choices=sorted(MODEL_PRESETS),
                   help="model preset (default: the --config file's, else mnist); resnet18 = cifar-stem ResNet-18-CBAM, "
                   "1 channel, 10 classes, MNIST padded to 32x32")
    p.add_argument("--width", type=_positive_int, help="ResNet stem / layer1 width (64 published; smaller for quick runs)")
    p.add_argument("--epochs", type=_positive_int, help="passes over the training set (default 5)")
    p.add_argument("--batch-size", type=_positive_int, help="training batch size (default 64)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="update rule, the same formula in torch.optim and optax (default adamw)")
    p.add_argument("--weight-decay", type=float, help="decoupled (adamw) or L2 (adam, sgd) weight decay")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule after the warmup (default cosine)")
    p.add_argument("--warmup-frac", type=float, help="fraction of all steps spent warming the learning rate up linearly")
    p.add_argument("--augment-shift", type=_nonneg_int, help="random translation by up to this many pixels (0 = off)")
    p.add_argument("--seed", type=int, help="model init seed")
    p.add_argument("--data-seed", type=int, help="batch order / augmentation seed")
    p.add_argument("--no-cbam", action="store_true", help="baseline without CBAM blocks")
    p.add_argument("--dataset", choices=DATASETS, help="auto (default): full MNIST if found, else the bundled sample")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (" + DATA_DIR_HELP + ")")
    p.add_argument("--n-train", type=_positive_int, help="use the first N training images")
    p.add_argument("--n-test", type=_positive_int, help="use the first N test images")
    p.add_argument("--eval-batch-size", type=_positive_int, help="batch size of the test-set evaluation after each epoch")
    p.add_argument("--out", help="run directory (default runs/mnist-<backend>[-nocbam])")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its train_state.safetensors")
    p.add_argument("--init-from", help="start from this model checkpoint (file or run dir, either framework)")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), help="bfloat16 = mixed precision (float32 weights)")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over processes: torch = DDP under torchrun (automatic when WORLD_SIZE > 1); "
        "jax = jax.distributed.initialize() (automatic when JAX_COORDINATOR_ADDRESS is set). "
        "A single JAX process always uses all its local devices.",
    )
    p.add_argument("--stop-after-epoch", type=_positive_int, help="stop after this epoch (as if interrupted; continue with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard event files to <out>/tensorboard (losses, accuracy, learning rate, "
                   "images/s; needs the tensorboard extra); view with: tensorboard --logdir runs")
    p.add_argument(
        "--malloc-defaults", action="store_true",
        help="leave glibc's allocator as it is (default: keep freed memory in the heap, see cbam_multi.training.heap)",
    )
    p.add_argument("--print-config", action="store_true", help="print the effective TrainConfig JSON and exit")
    p.set_defaults(func=cmd_train)


def train_config_from_args(args: argparse.Namespace):
    import dataclasses
    from pathlib import Path

    from cbam_multi.models import ResNetSpec
    from cbam_multi.training.config import MODEL_PRESETS, ConfigError, TrainConfig

    config = TrainConfig.from_json(Path(args.config).read_text()) if args.config else TrainConfig()
    flags = {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "optimizer": args.optimizer,
        "weight_decay": args.weight_decay, "schedule": args.schedule, "warmup_frac": args.warmup_frac,
        "augment_shift": args.augment_shift, "seed": args.seed, "data_seed": args.data_seed,
        "dataset": args.dataset, "data_dir": args.data_dir, "n_train": args.n_train, "n_test": args.n_test,
        "eval_batch_size": args.eval_batch_size, "init_from": args.init_from, "dtype": args.dtype,
    }
    changes = {k: v for k, v in flags.items() if v is not None}
    if args.backend is not None:
        changes["backend"] = args.backend
    model = MODEL_PRESETS[args.model] if args.model else config.model
    if args.width is not None:
        if not isinstance(model, ResNetSpec):
            raise ConfigError("--width applies to a ResNet: add --model resnet18")
        model = dataclasses.replace(model, width=args.width)
    if args.no_cbam:
        model = dataclasses.replace(model, **({"attention": "none"} if isinstance(model, ResNetSpec) else {"cbam": False}))
    if model != config.model:
        changes["model"] = model
    if args.resume:
        changes["resume"] = True
    if args.no_progress:
        changes["progress"] = False
    if args.tensorboard:
        changes["tensorboard"] = True
    if args.out is not None:
        changes["out"] = args.out
    elif not args.config:
        name = f"resnet{model.depth}" if isinstance(model, ResNetSpec) else "mnist"
        nocbam = model.attention == "none" if isinstance(model, ResNetSpec) else not model.cbam
        changes["out"] = f"runs/{name}-{{backend}}" + ("-nocbam" if nocbam else "")
    config = config.replace(**changes)
    if config.data_dir is None:
        config = config.replace(data_dir=_default_data_dir(config.dataset))
    return config


def _setup_distributed(backend: str, requested: bool) -> bool:
    """Join the process group / JAX cluster when asked (``--distributed``) or launched for it. Returns
    whether this process is the main one (the one that prints)."""
    if backend == "torch":
        from cbam_multi.torch import distributed

        if requested or distributed.launched_by_torchrun():
            distributed.init_distributed()
        return distributed.rank() == 0
    from cbam_multi.jax import sharding

    if requested or sharding.distributed_requested():
        sharding.initialize_distributed()  # before anything touches a JAX device
    import jax

    return jax.process_index() == 0


def cmd_train(args: argparse.Namespace) -> int:
    """Thin layer: flags -> TrainConfig -> <backend>.train.train_and_evaluate; prints a per-epoch table."""
    config = train_config_from_args(args)
    if args.print_config:
        print(config.to_json(indent=2))
        return 0
    if not args.malloc_defaults:
        from cbam_multi.training.heap import keep_heap

        keep_heap()  # before the first large allocation: steps reuse their buffers instead of re-faulting them
    if config.backend == "jax":
        _setup_jax(config.dtype)
    main_process = _setup_distributed(config.backend, getattr(args, "distributed", False))
    from cbam_multi.training import train_and_evaluate

    try:
        metrics = train_and_evaluate(config, stop_after_epoch=args.stop_after_epoch)
    finally:
        if config.backend == "torch":
            from cbam_multi.torch import distributed

            distributed.shutdown()
    if not main_process or metrics.get("already_finished"):
        return 0
    ds = metrics["dataset"]
    print(f"{metrics['backend']} on {metrics['device']}; data {ds['name']} ({ds['n_train']} train / {ds['n_test']} test)")
    print(f"{'epoch':>5} {'train loss':>10} {'test loss':>9} {'test acc':>8} {'s/epoch':>8} {'img/s':>7}")
    for e in metrics["epochs"]:
        print(
            f"{e['epoch']:>5} {e['train_loss']:>10.4f} {e['test_loss']:>9.4f} {100 * e['test_accuracy']:>7.2f}% "
            f"{e['epoch_seconds']:>8.1f} {e['images_per_s']:>7.0f}"
        )
    print(f"metrics: {config.out_dir / 'metrics.json'}; checkpoint: {metrics['checkpoint']}")
    return 0


def add_evaluate_parser(sub) -> None:
    from cbam_multi.training.config import DATASETS

    p = sub.add_parser("evaluate", help="evaluate a model checkpoint (written by either framework) on the test split")
    p.add_argument("--backend", choices=("torch", "jax"), default="torch",
                   help="framework that runs the model, whichever wrote the checkpoint (default torch)")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.safetensors, train_state.safetensors or a run directory, e.g. runs/mnist-jax")
    p.add_argument("--dataset", choices=DATASETS, default="auto",
                   help="auto (default): full MNIST if found or downloadable, else the 5,000-image sample")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (" + DATA_DIR_HELP + ")")
    p.add_argument("--n-test", type=_positive_int, help="evaluate on the first N test images (default: all)")
    p.add_argument("--batch-size", type=_positive_int, default=1000, help="evaluation batch size (default 1000)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="precision of the evaluation (default float32)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (predictions included)")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    if args.backend == "jax":
        _setup_jax(args.dtype)
    from cbam_multi.training import evaluate

    result = evaluate(
        args.checkpoint, backend=args.backend, dataset=args.dataset,
        data_dir=args.data_dir or _default_data_dir(args.dataset), n_test=args.n_test,
        batch_size=args.batch_size, dtype=args.dtype,
    )
    if args.json:
        out = {k: v for k, v in result.items() if k != "logits"}
        out["predictions"] = result["predictions"].tolist()
        print(json.dumps(out))
    else:
        ds = result["dataset"]
        print(
            f"{result['backend']}: {result['checkpoint']} (written by {result['written_by']}) on {ds['name']} "
            f"{ds['n_test']} test images: accuracy {100 * result['accuracy']:.2f}% ({result['correct']}/{result['n']}), "
            f"loss {result['loss']:.4f}"
        )
    return 0


def add_plot_parser(sub) -> None:
    p = sub.add_parser("plot", help="PNGs: both backends' training curves overlaid; digits with attention maps")
    p.add_argument("runs", nargs="+", help="run directories (or metrics.json files) to overlay, e.g. runs/mnist-*")
    p.add_argument("--checkpoint", help="model checkpoint for the attention grid (default: the first run's)")
    p.add_argument("--n-images", type=_positive_int, default=8, help="test digits in the attention grid (default 8)")
    p.add_argument("--dataset", choices=("auto", "mnist", "sample"), default="auto",
                   help="where the digits come from: auto (default) = full MNIST if found, else the sample")
    p.add_argument("--data-dir", help="folder with the MNIST IDX files (" + DATA_DIR_HELP + ")")
    p.add_argument("--out", default="runs/plots", help="folder for curves.png and attention.png")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from cbam_multi.training import plots
    from cbam_multi.training.data import load_mnist

    out = Path(args.out)
    print(f"curves: {plots.plot_curves(args.runs, out / 'curves.png')}")
    checkpoint = Path(args.checkpoint or args.runs[0])
    if checkpoint.is_dir():
        checkpoint = checkpoint / "checkpoint.safetensors"
    _setup_jax("float32")
    ds = load_mnist(args.data_dir or _default_data_dir(args.dataset), dataset=args.dataset)
    n = args.n_images
    path = plots.plot_attention(checkpoint, ds.test_images[:n], ds.test_labels[:n], out / "attention.png")
    print(f"attention: {path}")
    return 0


# ---------------------------------------------------------------- convert (ResNet checkpoints)
CONVERT_FORMATS = ("canonical", "official", "timm", "torchvision")


def add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert ResNet(-CBAM) checkpoints: official / timm / torchvision <-> canonical safetensors; --list the CBAM blocks",
    )
    p.add_argument("input", help="checkpoint file (.pth/.pth.tar/.pt: needs torch; .safetensors: does not)")
    p.add_argument("output", nargs="?", help="file to write (canonical/timm/torchvision: .safetensors or .pth; official: .pth)")
    p.add_argument("--from", dest="src", choices=CONVERT_FORMATS, help="format of INPUT")
    p.add_argument("--to", dest="dst", choices=CONVERT_FORMATS, help="format of OUTPUT")
    p.add_argument("--add-cbam", metavar="PRESET", choices=CBAMSpec.PRESETS, default=None,
                   help="with --from torchvision: load the plain backbone into a ResNet-CBAM, initialising the CBAM blocks")
    p.add_argument("--init", choices=("official", "canonical"), default="official", help="init of added CBAM blocks (default official)")
    p.add_argument("--seed", type=int, default=0, help="seed of added CBAM blocks")
    p.add_argument("--list", action="store_true", help="list the CBAM blocks in INPUT (prefix, channels, hidden, preset) and exit")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    from cbam_multi.models import resnet_convert as rc

    if args.list:
        blocks = rc.list_cbam_blocks(args.input)
        for b in blocks:
            print(f"{b['prefix']:<24} {b['format']:<10} channels {b['channels']:>5}  hidden {b['hidden']:>4}  preset {b['preset']}")
        print(f"{len(blocks)} CBAM block(s)")
        return 0
    if not (args.output and args.src and args.dst):
        print("cbam-multi convert: error: give INPUT OUTPUT --from FORMAT --to FORMAT (or INPUT --list)", file=sys.stderr)
        return 2
    # user errors (CBAMError, missing files) are reported by `main`: one line, exit 2
    report = rc.convert(args.input, args.output, args.src, args.dst, add_cbam_preset=args.add_cbam, seed=args.seed, init=args.init)
    print(f"wrote {report['out']}: {report['tensors']} tensors, {report['spec']}")
    if report["initialised"]:
        print(f"initialised {len(report['initialised'])} CBAM tensors: {', '.join(report['initialised'][:6])} ...")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A user error (a `CBAMError`: bad config, spec, checkpoint or data; a missing or
    unreadable file) prints ONE line and exits 2; ``--debug`` or ``$CBAM_MULTI_DEBUG`` adds the traceback."""
    from cbam_multi.errors import CBAMError

    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    with warnings.catch_warnings():  # restores the caller's filters and showwarning afterwards
        warnings.simplefilter("default")  # each distinct warning once
        warnings.showwarning = _show_one_line
        try:
            return args.func(args)
        except (CBAMError, OSError) as e:
            user_os_errors = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
            if isinstance(e, OSError) and not isinstance(e, user_os_errors):
                raise  # not a user error: a real I/O failure keeps its traceback
            if debug:
                import traceback

                traceback.print_exc()
            print(f"cbam-multi {args.command}: error: {_one_line(e)}", file=sys.stderr)
            return 2


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename is not None:
        what = "permission denied" if isinstance(e, PermissionError) else (e.strerror or str(e)).lower()
        return f"{e.filename}: {what}"
    return " ".join(str(e).split())


_SHOWN: set[str] = set()


def _show_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as the CLI prints them: one line, no source excerpt (it is the library's, not the user's),
    each distinct one once per process."""
    text = f"warning: {message}"
    if text not in _SHOWN:
        _SHOWN.add(text)
        print(text, file=file or sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
