"""The ``toolkit`` command.

Sub-commands (``toolkit COMMAND --help`` for each)::

    toolkit fit          --model vgg16 --data IMAGENET --out vgg16.patterns.safetensors
    toolkit quality      --model vgg16 --patterns FILE --data IMAGENET [--figure quality.png]
    toolkit explain      --model vgg16 --patterns FILE IMAGE... --out DIR
    toolkit perturbation --model vgg16 --patterns FILE --data IMAGENET --out DIR
    toolkit reproduce    --out results
    toolkit course student DIR

Models (``--model``) are named in one of three ways (:func:`toolkit.zoo.load_model`): a
torchvision model (``vgg16``; ``--weights`` DEFAULT, another weight name, ``random`` or a
FILE), a factory ``package.module:function`` (``--model-args`` JSON for its keyword
arguments, ``--weights FILE`` to load a state dict into it), or a model file written by
:func:`toolkit.models.save_model`.

Data (``--data``) is a folder of images in any layout :func:`toolkit.imagenet.image_dataset`
reads (an ImageNet root with ``train/`` and ``val/``, class folders, a flat folder),
preprocessed as ``--resize``/``--crop``/``--mean``/``--std`` say (ImageNet's by
default); or a tensor file of inputs the model takes as they are: ``.pt`` (a tensor, an
``(inputs, labels)`` pair, or a dict with ``images``) or ``.npz`` (arrays ``images`` and
optionally ``labels``; with ``--split NAME`` the arrays ``NAME_images``/``NAME_labels``).
Integer arrays are divided by 255 and ``(N, H, W)`` arrays get a channel axis.

Launched by ``torchrun``, ``fit`` initialises ``torch.distributed`` itself (NCCL on
GPUs, Gloo on CPUs, one GPU per process after ``LOCAL_RANK``), every process reads its
own shard of the data, the statistics are summed over all processes, and only rank 0
writes the output (docs/distributed.md).

Errors a user can fix are printed as one line ``toolkit COMMAND: error: ...`` with exit
status 2; set ``TOOLKIT_TRACEBACK=1`` to see the traceback instead. That covers bad
files (missing, truncated, not safetensors, of another model: each message names the
option and the file) and outputs that cannot be written, which are checked before the
work starts.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

TENSOR_SUFFIXES = (".pt", ".pth", ".npz")  # toolkit.imagenet.TENSOR_SUFFIXES, without importing torch here


def _methods() -> dict:
    """The registered methods (:data:`toolkit.methods.REGISTRY`): the ``--method`` names.
    Each method's aliases are accepted too (the command's older ``guidedbackprop`` and
    ``lrpz``); outputs keep the spelling given."""
    from toolkit.methods import REGISTRY

    return REGISTRY


def _method_names() -> str:
    """The ``--method`` names for the help, with the aliases."""
    methods = _methods()
    aliases = [f"{alias} for {m.name}" for m in methods.values() for alias in m.aliases]
    return ", ".join(methods) + (f" (also {', '.join(aliases)})" if aliases else "")


def _pattern_method_names() -> str:
    return ", ".join(name for name, m in _methods().items() if m.needs_patterns)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Fills the registered method names into the help strings (``{methods}``,
    ``{pattern_methods}``) only when a help is shown, so that building the parser does not
    import torch (which takes seconds)."""

    NAMES = {"{methods}": _method_names, "{pattern_methods}": _pattern_method_names}

    def _get_help_string(self, action):
        text = super()._get_help_string(action)
        for placeholder, names in self.NAMES.items():
            if text and placeholder in text:
                text = text.replace(placeholder, names())
        return text


class CommandError(ValueError):
    """A problem with the command line that the user can fix."""


# ----------------------------------------------------------------------------------
# files: read errors name the file, outputs are checked first
# ----------------------------------------------------------------------------------
def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a user's file may raise when the file is bad (not when the code is)."""
    import pickle
    import zipfile

    errors: list[type[BaseException]] = [OSError, ValueError, TypeError, KeyError, EOFError,
                                         RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(errors)


def _message(error: BaseException) -> str:
    """An exception's message on one line (a KeyError's key without its quotes)."""
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    return " ".join(str(text).split()) or type(error).__name__


@contextmanager
def reading(option: str, path) -> None:
    """Turn any error of reading ``path`` into a :class:`CommandError` that starts with
    the option and names the file, e.g. ``--patterns p.safetensors: ...``."""
    try:
        yield
    except CommandError:
        raise
    except _read_errors() as error:
        if isinstance(error, RuntimeError) and type(error).__module__.startswith("torch.distributed"):
            raise
        message = _message(error)
        named = f": {message}" if str(path) in message else f" {path}: {message}"
        raise CommandError(f"{option}{named}") from error


def check_writable(option: str, path, folder: bool = False) -> Path:
    """Raise a :class:`CommandError` now if ``path`` (a file, or a folder if ``folder``)
    cannot be written later: it is of the wrong kind, or it or the nearest existing
    folder above it is not writable, or a file stands where a folder is needed."""
    path = Path(path)
    kind = "folder" if folder else "file"
    if path.exists():
        if path.is_dir() != folder:
            raise CommandError(f"{option} {path}: it is a {'file' if folder else 'folder'}, "
                               f"not a {kind}")
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise CommandError(f"{option} {path}: the {kind} is not writable (permission denied)")
        return path
    above = next(p for p in path.absolute().parents if p.exists())
    if not above.is_dir():
        raise CommandError(f"{option} {path}: cannot create the {kind}, {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise CommandError(f"{option} {path}: cannot create the {kind}, the folder {above} is not "
                           "writable (permission denied)")
    return path


def _check_safetensors(option: str, path) -> None:
    """Read the header of an existing safetensors file, so a bad one fails at once."""
    from safetensors import safe_open

    with reading(option, path), safe_open(str(path), framework="pt") as f:
        f.metadata()


# ----------------------------------------------------------------------------------
# shared pieces: device, model, data
# ----------------------------------------------------------------------------------
def _device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CommandError(f"--device {name}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


@contextmanager
def distributed(device_name: str | None):
    """:func:`toolkit.distributed.process_group` on the ``--device`` (set up only when
    the process was started by ``torchrun``); yields ``(rank, world, device)``."""
    from toolkit.distributed import process_group

    with process_group(_device(device_name)) as group:
        yield group


def _weights(value: str):
    return None if value.lower() in ("random", "none") else value


def _load_model(args, device=None, dtype=None):
    from toolkit.zoo import load_model

    weights = _weights(args.weights)
    if Path(args.model).suffix == ".safetensors" and Path(args.model).is_file():
        _check_safetensors("--model", args.model)
    weights_file = weights not in (None, "DEFAULT") and not weights.isupper()
    option, path = ("--weights", weights) if weights_file else ("--model", args.model)
    with reading(option, path):
        model = load_model(args.model, weights, model_args=args.model_args, download=not args.offline)
    return model.to(device=device, dtype=dtype)


def _load_model_first_on_rank_0(args, rank: int, world: int, device, dtype):
    """Load the model on rank 0 before the other processes, so that only rank 0
    downloads missing weights into torch's cache and the others read them from there.
    (If rank 0 fails, torchrun stops the processes waiting here.)"""
    if world == 1:
        return _load_model(args, device, dtype)
    import torch.distributed as dist

    model = _load_model(args, device, dtype) if rank == 0 else None
    dist.barrier()
    return model if model is not None else _load_model(args, device, dtype)


def _dtype(name: str):
    import torch

    return {"float32": torch.float32, "float64": torch.float64}[name]


def _preprocessing(args):
    """The images' preprocessing: the options given, the rest from the torchvision model
    (:func:`toolkit.zoo.input_preprocessing`), else ImageNet's (resize 256, crop 224)."""
    from toolkit.imagenet import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
    from toolkit.zoo import TORCHVISION_MODELS, input_preprocessing

    own = (input_preprocessing(args.model) if getattr(args, "model", None) in TORCHVISION_MODELS else
           {"resize": 256, "crop": 224, "mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    chosen = {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in own.items()}
    return Preprocessing(chosen["resize"], chosen["crop"], tuple(chosen["mean"]), tuple(chosen["std"]))


def _dataset(args, default_split: str):
    """The dataset named by --data, cut to --max-images."""
    from toolkit.imagenet import ImageFiles, image_dataset, tensor_dataset

    path = Path(args.data)
    if path.suffix in TENSOR_SUFFIXES and path.is_file():
        with reading("--data", path):
            dataset = tensor_dataset(path, args.split)
    elif path.is_dir():
        split = args.split
        if split is None and any((path / s).is_dir() for s in ("train", "val")):
            split = default_split if (path / default_split).is_dir() else None
        dataset = image_dataset(path, split=split, labels=args.labels, preprocessing=_preprocessing(args))
    elif not path.exists():
        raise FileNotFoundError(f"--data {path}: no such file or folder")
    else:
        raise CommandError(f"--data {path}: expected an image folder or a {'/'.join(TENSOR_SUFFIXES)} tensor file")
    if args.max_images is not None:
        if isinstance(dataset, ImageFiles):
            dataset = dataset.subset(args.max_images)
        else:
            from torch.utils.data import TensorDataset

            step = max(1, len(dataset) // args.max_images)
            dataset = TensorDataset(*(t[::step][: args.max_images] for t in dataset.tensors))
    if len(dataset) == 0:
        raise CommandError(f"--data {path} holds no images")
    return dataset


class Batches:
    """The batches of a loader with the inputs cast to ``dtype``; ``sampler`` and ``len``
    are the loader's, so :func:`toolkit.fit_patterns` still sees how the data is sharded."""

    def __init__(self, loader, dtype):
        self.loader, self.dtype = loader, dtype

    @property
    def sampler(self):
        return getattr(self.loader, "sampler", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for inputs, labels in self.loader:
            yield inputs.to(self.dtype), labels


def _loader(args, dataset, dtype, distributed_: bool, device=None):
    """Batches of ``dataset``: sharded over the processes if ``distributed_``, decoded on
    ``--decode-device`` (a bare ``cuda`` means this process's GPU, ``device``)."""
    from toolkit.imagenet import ImageFiles, make_loader

    decode = args.decode_device if isinstance(dataset, ImageFiles) else None
    if decode == "cuda" and device is not None and device.type == "cuda":
        decode = device
    loader = make_loader(dataset, args.batch_size, workers=args.workers, distributed=distributed_,
                         decode_device=decode)
    return Batches(loader, dtype)


def _read_patterns(path, model):
    from toolkit.patterns import Patterns

    if path is None:
        return None
    with reading("--patterns", path):
        return Patterns.load(path, model)


def _check_model(model, data, dtype, device) -> None:
    """Trace the model on the first input before the work starts: a module, a setting or
    an operation in its forward that the rules do not cover is refused here
    (:func:`toolkit.layers.trace`), and so is an input the model cannot take."""
    import torch

    from toolkit.layers import trace

    example = data[:1] if isinstance(data, torch.Tensor) else data[0][0][None]
    if not torch.is_tensor(example) or not example.is_floating_point():
        return  # undecoded image bytes: the fit's first batch is traced instead
    example = example.to(device=device, dtype=dtype)
    try:
        trace(model, example)
    except RuntimeError as error:
        raise CommandError(f"the model cannot run on inputs of shape {tuple(example.shape)}: "
                           f"{_message(error)}") from error


def _explainer(method: str, model, patterns, kind: str):
    """The explanation object for a --method name."""
    from toolkit.methods import get_method

    registered = get_method(method)
    if registered.needs_patterns and patterns is None:
        raise CommandError(f"--method {method} needs the model's patterns: fit them with "
                           "'toolkit fit' and pass --patterns FILE")
    return registered.make(model, patterns, kind=kind)


def _write_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


# ----------------------------------------------------------------------------------
# the commands
# ----------------------------------------------------------------------------------
def _fit(args: argparse.Namespace) -> int:
    from toolkit.patterns import fit_patterns

    out = check_writable("--out", args.out)
    with distributed(args.device) as (rank, world, device):
        if args.checkpoint:  # under torchrun each rank has <stem>.rank<r><suffix> (fit_patterns)
            checkpoint = Path(args.checkpoint)
            if world > 1:
                checkpoint = checkpoint.with_name(f"{checkpoint.stem}.rank{rank}{checkpoint.suffix}")
            check_writable("--checkpoint", checkpoint)
            if checkpoint.is_file():
                _check_safetensors("--checkpoint", checkpoint)
        dtype = _dtype(args.dtype)
        model = _load_model_first_on_rank_0(args, rank, world, device, dtype)
        dataset = _dataset(args, default_split="train")
        _check_model(model, dataset, dtype, device)
        data = _loader(args, dataset, dtype, distributed_=world > 1, device=device)
        if rank == 0:
            print(f"fitting patterns of {args.model} on {len(dataset):,} images"
                  + (f" in {world} processes" if world > 1 else "") + f" ({device})", file=sys.stderr)
        patterns = fit_patterns(
            model, data, device=device, progress=not args.quiet, checkpoint=args.checkpoint,
            checkpoint_every=args.checkpoint_every, mean_y=args.mean_y,
            compute_dtype=None if args.compute_dtype == "model" else
            args.compute_dtype if args.compute_dtype == "tf32" else _dtype(args.compute_dtype),
            kinds=tuple(args.kinds), keep_statistics=args.statistics, **_mask(args),
        )
        if rank == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            patterns.save(out, statistics=args.statistics)
            print(patterns.report())
            print(f"wrote {out}")
    return 0


def _quality(args: argparse.Namespace) -> int:
    from toolkit.quality import layer_quality

    if args.figure:
        check_writable("--figure", args.figure)
    with distributed(args.device) as (rank, world, device):
        model = _load_model_first_on_rank_0(args, rank, world, device, None)
        patterns = _read_patterns(args.patterns, model)
        dataset = _dataset(args, default_split="val")
        _check_model(model, dataset, next(model.parameters()).dtype, device)
        data = _loader(args, dataset, next(model.parameters()).dtype, distributed_=world > 1, device=device)
        kwargs = {"estimators": tuple(args.estimators)} if args.estimators else {}
        result = layer_quality(model, patterns, data, ridge=args.ridge, progress=not args.quiet,
                               **kwargs, **_mask(args))
        if rank == 0:
            print(result.table())
            if args.figure:
                from toolkit.plotting import evaluation

                ax = evaluation.plot_layer_quality(result, title=f"signal estimators of {Path(args.model).name}")
                print(f"wrote {_write_figure(ax.figure, Path(args.figure))}")
    return 0


def _mask(args: argparse.Namespace) -> dict:
    """``{"mask": ...}`` when ``--mask`` was given (else the library's default applies)."""
    return {"mask": args.mask} if args.mask is not None else {}


def _single_process(command: str) -> None:
    """Refuse to run a command that does not sum its statistics over processes under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CommandError(f"'toolkit {command}' runs in one process; start it without torchrun")


def _explain(args: argparse.Namespace) -> int:
    import torch

    from toolkit.imagenet import read_images
    from toolkit.plotting.images import explanation_grid

    out = check_writable("--out", args.out, folder=True)
    device = _device(args.device)
    model = _load_model(args, device)
    patterns = _read_patterns(args.patterns, model)
    methods = _method_list(args.method or ["patternattribution"])
    explainers = {m: _explainer(m, model, patterns, args.kind) for m in methods}
    preprocessing = _preprocessing(args)
    images, names = read_images(args.images, preprocessing, device=device)
    _check_model(model, images, images.dtype, device)
    with torch.no_grad():
        logits = torch.cat([model(images[i:i + args.batch_size]) for i in range(0, len(images), args.batch_size)])
    target = logits.argmax(1) if args.target is None else torch.full_like(logits[:, 0], args.target, dtype=torch.long)
    categories = _categories(args.model, logits.shape[1])
    probabilities = logits.softmax(1)

    from toolkit.methods import get_method

    kinds = {m: get_method(m).output for m in methods}
    for start in range(0, len(images), args.batch_size):
        batch = slice(start, start + args.batch_size)
        results = {m: e.attribute(images[batch], target[batch]).cpu() for m, e in explainers.items()}
        shown = preprocessing.denormalize(images[batch]).cpu()
        for i, name in enumerate(names[batch]):
            k = start + i
            label = f"{categories[int(target[k])]} (p={probabilities[k, target[k]]:.3g})"
            fig = explanation_grid(shown[i:i + 1], {m: r[i:i + 1] for m, r in results.items()}, kinds,
                                   row_labels=[label])
            path = _write_figure(fig, out / f"{Path(name).stem}.png")
            print(f"{name}: {label} -> {path}")
    return 0


def _categories(model_spec: str, classes: int) -> list[str]:
    from toolkit.zoo import TORCHVISION_MODELS, imagenet_categories

    if model_spec in TORCHVISION_MODELS and classes == 1000:
        return imagenet_categories()
    return [f"class {i}" for i in range(classes)]


def _method_list(values: list[str], extra: tuple[str, ...] = ()) -> list[str]:
    """Method names from repeated and/or comma-separated values, checked, without repeats."""
    methods = [m.strip().lower() for value in values for m in value.split(",") if m.strip()]
    registered = _methods()
    spellings = {*registered, *(a for m in registered.values() for a in m.aliases), *extra}
    unknown = [m for m in methods if m not in spellings]
    if unknown:
        raise CommandError(f"unknown method '{unknown[0]}'; choose from {', '.join((*registered, *extra))}")
    return list(dict.fromkeys(methods))


def _perturbation(args: argparse.Namespace) -> int:
    from toolkit.compare import perturbation_table
    from toolkit.perturbation import region_perturbation
    from toolkit.plotting.evaluation import plot_perturbation

    _single_process("perturbation")
    out = check_writable("--out", args.out, folder=True)
    device = _device(args.device)
    model = _load_model(args, device)
    patterns = _read_patterns(args.patterns, model)
    methods = _method_list(args.methods, extra=("random",))
    explainers = {m: _explainer(m, model, patterns, args.kind) for m in methods if m != "random"}
    dataset = _dataset(args, default_split="val")
    _check_model(model, dataset, next(model.parameters()).dtype, device)
    data = _loader(args, dataset, next(model.parameters()).dtype, distributed_=False, device=device)
    settings = dict(patch=args.patch, steps=args.steps, replace=args.replace, batch_size=args.batch_size,
                    progress=not args.quiet)
    results = {}
    for method in methods:
        if method == "random":
            results[method] = region_perturbation(model, None, data, order="random",
                                                  random_repeats=args.random_repeats, seed=args.seed, **settings)
        else:
            results[method] = region_perturbation(model, explainers[method], data, **settings)

    out.mkdir(parents=True, exist_ok=True)
    last = next(iter(results.values())).steps
    print(f"{next(iter(results.values())).images} images")
    print(perturbation_table(results, at=(0, last), titles={m: m for m in results}, decimals=4,
                             best_first=False))
    (out / "aopc.csv").write_text("method,aopc,images\n" + "".join(
        f"{m},{r.aopc:.6f},{r.images}\n" for m, r in results.items()))
    ax = plot_perturbation(results, title=f"region perturbation, {args.patch}x{args.patch} regions")
    print(f"wrote {_write_figure(ax.figure, out / 'perturbation.png')} and {out / 'aopc.csv'}")
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from toolkit.reproduce import reproduce

    check_writable("--out", args.out, folder=True)
    reproduce(args.out, args.notebooks or None, timeout=args.timeout)
    return 0


def _course_student(args: argparse.Namespace) -> int:
    from toolkit.course import write_student_course

    check_writable("DIR", args.dir, folder=True)
    written = write_student_course(args.dir, args.notebooks or None, overwrite=args.force)
    for path in written:
        print(path)
    return 0


# ----------------------------------------------------------------------------------
# the parser
# ----------------------------------------------------------------------------------
MODEL_HELP = ("a torchvision classifier (alexnet, vgg11 ... vgg19_bn, resnet18 ... resnet152, wide_resnet50_2, "
              "resnext50_32x4d, regnet_x_400mf ... regnet_x_32gf, densenet121 ... densenet201, googlenet, "
              "inception_v3, mobilenet_v2, mnasnet0_5 ... mnasnet1_3, shufflenet_v2_x0_5 ... shufflenet_v2_x2_0, "
              "squeezenet1_0, squeezenet1_1: toolkit.zoo.TORCHVISION_MODELS), a factory "
              "'package.module:function' (e.g. toolkit.models:SmallVGG), or a model file saved by "
              "toolkit.models.save_model")
WEIGHTS_HELP = ("torchvision models: DEFAULT (pretrained, from torch's cache or downloaded once), "
                "another weight name (IMAGENET1K_V1), 'random', or a FILE (torch.save state dict or "
                "safetensors); factories and model files: a FILE to load into the model "
                "(default: DEFAULT)")
MASK_CHOICES = ("output", "relu_input")  # toolkit.layers.MASKS, without importing torch here
MASK_HELP = ("activity mask of a layer not followed directly by its ReLU (residual blocks, "
             "concatenations): its own output > 0, or the ReLU's rule on its input after the "
             "addition or concatenation (relu_input, the default: toolkit.layers.DEFAULT_MASK)")
DATA_HELP = ("an image folder (ImageNet root with train/ and val/, one folder per class, or a flat "
             "folder of JPEG/PNG with an optional label file) or a tensor file (.pt, .npz) of model inputs")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _model_arguments(parser: argparse.ArgumentParser, patterns: str | None = None) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True, metavar="SPEC", help=MODEL_HELP)
    group.add_argument("--weights", default="DEFAULT", metavar="WEIGHTS", help=WEIGHTS_HELP)
    group.add_argument("--model-args", metavar="JSON", help="keyword arguments of a factory, as a JSON object")
    group.add_argument("--offline", action="store_true",
                       help="never download pretrained weights; fail with instructions if they are not cached")
    group.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    if patterns == "required":
        group.add_argument("--patterns", required=True, metavar="FILE", help="patterns written by 'toolkit fit'")
    elif patterns == "optional":
        group.add_argument("--patterns", metavar="FILE",
                           help="patterns written by 'toolkit fit' (needed by the pattern methods: "
                                "{pattern_methods})")


def _image_arguments(group) -> None:
    group.add_argument("--resize", type=positive_int, help="shorter image side after resizing (default: the "
                       "torchvision model's, else 256)")
    group.add_argument("--crop", type=positive_int, help="side of the central crop (default: the torchvision "
                       "model's, 299 for inception_v3, else 224)")
    group.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                       help="per-channel mean subtracted after scaling to [0, 1] (default: the torchvision "
                            "model's: ImageNet's, 0.5 for googlenet and inception_v3)")
    group.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                       help="per-channel standard deviation (default: as --mean)")


def _data_arguments(parser: argparse.ArgumentParser, default_split: str) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, metavar="PATH", help=DATA_HELP)
    group.add_argument("--split", help=f"train or val of an ImageNet root (default: {default_split}); "
                                       "NAME selects NAME_images of an .npz file")
    group.add_argument("--labels", metavar="FILE", help="label file of a flat image folder (LOC_val_solution.csv, "
                                                         "a 'file,label' CSV, or ILSVRC2012_validation_ground_truth.txt)")
    group.add_argument("--max-images", type=positive_int, metavar="N",
                       help="use N images spread evenly over the data (every class contributes)")
    group.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default: 32)")
    group.add_argument("--workers", type=int, default=4, help="data loading processes (default: 4; 0 = in-process)")
    group.add_argument("--decode-device", metavar="DEVICE",
                       help="decode JPEGs and resize on this device (e.g. cuda) instead of in the workers")
    _image_arguments(group)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolkit",
        description="PatternNet and PatternAttribution: fit patterns, explain, measure, reproduce the course.",
        epilog="Run 'toolkit COMMAND --help' for the options of a command. Errors are one line; "
               "set TOOLKIT_TRACEBACK=1 for the full traceback.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fit = commands.add_parser(
        "fit", help="fit the patterns of every Conv2d/Linear layer of a model on images",
        description="Stream the images through the model once, collect float64 statistics per layer and "
                    "write the linear and two-component patterns (safetensors): by default the patterns "
                    "alone, in float32 for a float32 model (VGG16: 1.7 GB for all three kinds, 0.55 GB "
                    "for --kinds positive); with --statistics also the statistics. Under torchrun every "
                    "process fits its shard and rank 0 writes the result.",
        epilog="examples:\n  toolkit fit --model vgg16 --data ~/imagenet --max-images 50000 --out vgg16.patterns.safetensors\n"
               "  torchrun --nproc-per-node=8 -m toolkit.cli fit --model vgg16 --data ~/imagenet --out vgg16.patterns.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(fit)
    _data_arguments(fit, "train")
    group = fit.add_argument_group("fitting")
    group.add_argument("--out", required=True, metavar="FILE", help="where to write the patterns (.safetensors)")
    group.add_argument("--statistics", action="store_true",
                       help="also write the float64 statistics the patterns are computed from (VGG16: "
                            "+3.3 GB, and as much more memory while fitting): needed to recompute the "
                            "patterns with the other --mean-y convention (toolkit.compare.with_mean_y) or "
                            "to add them to another fit's; to resume an interrupted fit use --checkpoint")
    group.add_argument("--checkpoint", metavar="FILE",
                       help="save the statistics here every --checkpoint-every batches and resume from it "
                            "(under torchrun one file per process: ck.safetensors -> ck.rank0.safetensors, ...)")
    group.add_argument("--checkpoint-every", type=positive_int, default=100, metavar="N", help="batches between checkpoints (default: 100)")
    group.add_argument("--mean-y", choices=("masked", "global"), default="masked",
                       help="E[y] of the two-component patterns: over the component's own samples (the "
                            "default; unchanged by a constant input shift) or over all samples (the "
                            "paper's formula and the authors' code)")
    group.add_argument("--mask", choices=MASK_CHOICES, default=None, help=MASK_HELP)
    group.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                       help="dtype of the model's forward pass (default: float32; float64 is exact and slower)")
    group.add_argument("--compute-dtype", choices=("model", "float32", "float64", "tf32"), default="model",
                       help="dtype of the per-batch products (default: the model's, see --dtype; the sums "
                            "are always float64 and exact by construction; tf32 only on CUDA)")
    group.add_argument("--kinds", nargs="+", choices=("linear", "positive", "negative"),
                       default=["linear", "positive", "negative"],
                       help="which patterns to fit (default: all three; 'positive' is all PatternNet and "
                            "PatternAttribution with the two-component estimator need, and is faster)")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(run=_fit)

    quality = commands.add_parser(
        "quality", help="measure the signal estimators layer by layer (rho of the paper)",
        description="Compute rho(S) = 1 - max corr(v^T (x - S(x)), w^T x) for every layer on held-out images "
                    "and print the table.", formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(quality, patterns="required")
    _data_arguments(quality, "val")
    group = quality.add_argument_group("quality")
    group.add_argument("--estimators", nargs="+", metavar="NAME",
                       help="estimators to compare (default: those of toolkit.quality.layer_quality)")
    group.add_argument("--figure", metavar="PNG", help="also draw the per-layer curves into this file")
    group.add_argument("--ridge", type=float, default=0.0,
                       help="relative Tikhonov term for layers with few samples (default: 0, the exact measure)")
    group.add_argument("--mask", choices=MASK_CHOICES, default=None,
                       help=MASK_HELP + "; give the one the patterns were fitted with")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    quality.set_defaults(run=_quality)

    explain = commands.add_parser(
        "explain", help="explain the predictions for image files: one PNG per image",
        description="Classify every image and draw the explanation of the predicted class (or --target) "
                    "by each --method next to the input.",
        epilog="example:\n  toolkit explain --model vgg16 --patterns vgg16.patterns.safetensors "
               "--method gradient,patternnet,patternattribution data/images/*.jpg --out explanations",
        formatter_class=HelpFormatter)
    _model_arguments(explain, patterns="optional")
    explain.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    group = explain.add_argument_group("explanation")
    group.add_argument("--method", action="append", metavar="METHOD",
                       help="one of {methods}; repeat it or give a comma-separated list "
                            "for several (default: patternattribution)")
    group.add_argument("--kind", choices=("two_component", "linear"), default="two_component",
                       help="which patterns patternnet/patternattribution use (default: two_component; "
                            "the *_linear methods always use the linear ones)")
    group.add_argument("--target", type=int, metavar="CLASS", help="explain this class (default: the predicted one)")
    group.add_argument("--out", required=True, metavar="DIR", help="folder for the figures (IMAGE-STEM.png)")
    group.add_argument("--batch-size", type=positive_int, default=8, help="images per batch (default: 8)")
    _image_arguments(explain.add_argument_group("preprocessing"))
    explain.set_defaults(run=_explain)

    perturbation = commands.add_parser(
        "perturbation", help="region perturbation: how fast does the output fall when relevant patches go",
        description="Replace the most relevant regions of each image first (by each method's "
                    "explanation of the predicted class), record the probability of that class after "
                    "every step, and print the AOPC (area over the perturbation curve) of every method; "
                    "write the curves to OUT/perturbation.png and the AOPCs to OUT/aopc.csv.", formatter_class=HelpFormatter)
    _model_arguments(perturbation, patterns="optional")
    _data_arguments(perturbation, "val")
    group = perturbation.add_argument_group("perturbation")
    group.add_argument("--methods", nargs="+", default=["gradient", "patternnet", "patternattribution", "random"],
                       metavar="METHOD", help="methods to compare, of {methods}, and random (the "
                            "baseline: regions in random order) (default: gradient patternnet patternattribution random)")
    group.add_argument("--kind", choices=("two_component", "linear"), default="two_component",
                       help="patterns used by patternnet/patternattribution (default: two_component; "
                            "the *_linear methods always use the linear ones)")
    group.add_argument("--patch", type=positive_int, default=9, help="side of the square patches in pixels (default: 9)")
    group.add_argument("--steps", type=positive_int, help="number of regions perturbed, one per step "
                                                          "(default: every region of the image)")
    group.add_argument("--replace", choices=("mean", "zero"), default="mean",
                       help="replace a region by its own per-channel mean (the paper) or by 0 (default: mean)")
    group.add_argument("--random-repeats", type=positive_int, default=10,
                       help="random orderings per image for the random baseline (default: 10)")
    group.add_argument("--seed", type=int, default=0, help="seed of the random orderings (default: 0)")
    group.add_argument("--out", required=True, metavar="DIR",
                       help="folder for the figure perturbation.png and the table aopc.csv")
    group.add_argument("--quiet", action="store_true", help="no progress bar")
    perturbation.set_defaults(run=_perturbation)

    rep = commands.add_parser("reproduce", help="execute the course's notebooks headless and save their figures",
                              description="Execute the notebooks in order; write the executed notebooks and "
                                          "every figure as PNG into --out.")
    rep.add_argument("--out", default="results", help="output folder (default: results)")
    rep.add_argument("--notebooks", nargs="*", help="notebooks to run (default: all of notebooks/)")
    rep.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell (default: 900)")
    rep.set_defaults(run=_reproduce)

    course = commands.add_parser("course", help="the course for a class: the student version",
                                 description="Prepare the course's notebooks for teaching.")
    course_commands = course.add_subparsers(dest="course_command", metavar="WHAT", required=True)
    student = course_commands.add_parser(
        "student", help="write every notebook without its solutions, outputs cleared",
        description="Write the student version of the course into DIR: the solution cells (tagged "
                    "'solution') and the folded <details> solutions are removed and the outputs "
                    "cleared; the notebooks run top to bottom, the unanswered checks saying so.")
    student.add_argument("dir", metavar="DIR", help="folder to write the notebooks into (created if missing)")
    student.add_argument("--notebooks", nargs="*", help="notebooks to write (default: the whole course)")
    student.add_argument("--force", action="store_true", help="overwrite notebooks already in DIR")
    student.set_defaults(run=_course_student)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean 'fix the command line or the files', not a bug: the
    file and argument errors (OSError, ValueError, TypeError, KeyError, safetensors'
    errors) and the toolkit's own (CommandError, PatternMismatchError and
    NeverActiveOutputError are ValueErrors, UnsupportedLayerError a TypeError)."""
    errors: list[type[BaseException]] = [OSError, ValueError, TypeError, KeyError, ImportError]
    try:
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:  # pragma: no cover - safetensors is a dependency
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Run the ``toolkit`` command; return its exit status."""
    args = build_parser().parse_args(argv)

    def show_warning(message, category, filename, lineno, file=None, line=None):
        print(f"toolkit {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show_warning
            return args.run(args)
    except KeyboardInterrupt:
        print(f"toolkit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if not isinstance(error, _user_errors()) or os.environ.get("TOOLKIT_TRACEBACK"):
            raise
        print(f"toolkit {args.command}: error: {_message(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
