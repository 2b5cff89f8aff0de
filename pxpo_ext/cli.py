"""The command line: ``python/train.py`` (:func:`train_main`) and ``python/sample.py`` (:func:`sample_main`).

Training options are generated from a config dataclass (:class:`pxpo_ext.trainer.PXPOConfig`):
every field becomes ``--field-name`` (``--field_name`` works too), its ``metadata["help"]`` and
default make up ``--help``. Values come from, lowest precedence first: the dataclass defaults,
a YAML file (``--config``, whose keys are field names), then the command line.

Field types map to options as follows: ``bool`` -> ``--flag`` / ``--no-flag``; ``int``, ``float``,
``str`` -> one value; ``X | None`` -> also accepts ``none``; ``Literal[...]`` -> a choice;
``list[X]`` -> one or more values (``metadata["choices"]`` on a plain field also makes a choice);
``dict`` -> a JSON object (replaces the dict) or ``key=value``
pairs (each value read as YAML, merged into the dict from the YAML file or the default).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

from . import plots
from .user_code import UserCodeError

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_TRAIN_CONFIG = REPO_CONFIGS / "default.yaml"
_GROUPS = (("sample_", "sampling"), ("train_", "training"))
_NONE_WORDS = ("none", "null")


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message says which and why."""


# --- field types -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _FieldType:
    kind: str  # "bool", "scalar", "choice", "list", "dict" or "yaml" (anything else, read as YAML)
    base: type | None = None  # int, float or str for "scalar"; the element type for "list"
    nullable: bool = False
    choices: tuple = ()


def _field_type(annotation) -> _FieldType:
    nullable = False
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        nullable = True
        annotation = rest[0] if len(rest) == 1 else typing.Any
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return _FieldType("bool", bool, nullable)
    if annotation in (int, float, str):
        return _FieldType("scalar", annotation, nullable)
    if origin is typing.Literal:
        return _FieldType("choice", None, nullable, tuple(args))
    if annotation is dict or origin is dict:
        return _FieldType("dict", None, nullable)
    if annotation in (list, tuple) or origin in (list, tuple, Sequence):
        element = args[0] if args and args[0] in (int, float, str) else str
        return _FieldType("list", element, nullable)
    return _FieldType("yaml", None, nullable)


def _type_word(ft: _FieldType) -> str:
    word = {
        "bool": "true or false",
        "choice": "one of " + ", ".join(map(repr, ft.choices)),
        "dict": "a mapping (JSON object or key=value pairs)",
        "yaml": "a YAML value",
    }.get(ft.kind)
    if word is None:
        names = {int: "an integer", float: "a number", str: "a string"}
        word = names[ft.base] if ft.kind == "scalar" else f"a list of {names[ft.base].split(' ', 1)[1]}s"
    return word + (" or none" if ft.nullable else "")


def _scalar(value, base: type):
    """``value`` (from YAML or the command line) as ``base``; raises ValueError if it is not one."""
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise ValueError
    if base is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    if base is float:
        return float(value)  # also YAML 1.1's "1e-4", which PyYAML reads as a string
    if isinstance(value, (int, float)):  # e.g. a folder named 2024, which YAML reads as a number
        return str(value)
    if not isinstance(value, str):
        raise ValueError
    return value


def _coerce(value, ft: _FieldType, name: str):
    """Check and convert a value for field ``name``; raises ConfigError naming the field."""
    if value is None or (ft.nullable and isinstance(value, str) and value.strip().lower() in _NONE_WORDS):
        if ft.nullable:
            return None
        raise ConfigError(f"{name} cannot be none; it expects {_type_word(ft)}")
    try:
        if ft.kind == "bool":
            if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.strip().lower() in ("true", "yes", "1")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if ft.kind == "scalar":
            return _scalar(value, ft.base)
        if ft.kind == "choice":
            matches = [c for c in ft.choices if c == value or str(c) == str(value)]
            if not matches:
                raise ValueError
            return matches[0]
        if ft.kind == "list":
            items = value if isinstance(value, (list, tuple)) else [value]
            return [_scalar(v, ft.base) for v in items]
        if ft.kind == "dict":
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        return yaml.safe_load(value) if isinstance(value, str) else value
    except (ValueError, TypeError, yaml.YAMLError):
        raise ConfigError(f"{name} expects {_type_word(ft)}, got {value!r}") from None


def _pairs_to_dict(tokens: list[str], name: str, forms: str = "a JSON object or key=value pairs",
                   example: str = "channel=blue scale=2") -> dict:
    """``KEY=VALUE`` tokens of option ``--name`` as a dict, each value read as YAML."""
    out = {}
    for token in tokens:
        key, sep, text = token.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--{_option(name)} takes {forms}, got {token!r} (example: --{_option(name)} {example})")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:  # not YAML (e.g. "a: b: c"): keep the text as written
            out[key.strip()] = text
    return out


# --- parser ------------------------------------------------------------------------------------------------


def _option(name: str) -> str:
    return name.replace("_", "-")


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _show(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if value is None:
        return "none"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


class _CollectTokens(argparse.Action):
    """Keeps every group of tokens given to a dict option, so repeated options all count."""

    def __call__(self, parser, namespace, values, option_string=None):
        groups = list(getattr(namespace, self.dest, None) or [])
        groups.append(list(values))
        setattr(namespace, self.dest, groups)


def _config_fields(config_cls) -> list[tuple[dataclasses.Field, _FieldType]]:
    if not (isinstance(config_cls, type) and dataclasses.is_dataclass(config_cls)):
        raise TypeError(f"expected a dataclass type, got {config_cls!r}")
    hints = typing.get_type_hints(config_cls)
    out = []
    for f in dataclasses.fields(config_cls):
        if not f.init:
            continue
        ft = _field_type(hints[f.name])
        if ft.kind == "scalar" and f.metadata.get("choices"):  # a str field with metadata={"choices": (...)}
            ft = _FieldType("choice", None, ft.nullable, tuple(f.metadata["choices"]))
        out.append((f, ft))
    return out


def build_parser(config_cls, prog: str | None = None, description: str | None = None,
                 default_config: Path | None = None, epilog: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one option per field of ``config_cls`` plus ``--config`` and ``--print-config``.

    Options default to "not given" so that :func:`parse_config` can tell a command-line value from
    a YAML one; ``--help`` shows each field's real default.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                     usage="%(prog)s [--config FILE.yaml] [--OPTION VALUE ...] (see --help)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_note = f" (default: {default_config})" if default_config is not None else " (default: none)"
    parser.add_argument("--config", metavar="FILE.yaml", default=None,
                        help="YAML file whose keys are option names (with underscores); "
                             "command-line options override it" + default_note)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved configuration as YAML and exit")
    general = parser.add_argument_group("run options")
    groups = {prefix: parser.add_argument_group(f"{title} options") for prefix, title in _GROUPS}
    for f, ft in _config_fields(config_cls):
        text = f.metadata.get("help", "").strip() or "(no description)"
        text = f"{text} (default: {_show(_default(f))})".replace("%", "%%")
        group = next((g for prefix, g in groups.items() if f.name.startswith(prefix)), general)
        flags = [f"--{_option(f.name)}"]
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=text)
        if ft.kind == "bool":
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        elif ft.kind == "dict":
            group.add_argument(*flags, nargs="+", action=_CollectTokens, metavar="KEY=VALUE", **common)
        elif ft.kind == "list":
            group.add_argument(*flags, nargs="+", metavar=f.name.upper(), **common)
        elif ft.kind == "choice":
            shown = "{" + ",".join(map(str, ft.choices)) + "}"
            group.add_argument(*flags, metavar=shown, **common)
        else:
            group.add_argument(*flags, metavar=f.name.upper(), **common)
    return parser


def _normalise_argv(argv: Sequence[str], names: set[str]) -> list[str]:
    """Accept ``--field_name`` (TRL / HfArgumentParser spelling) for ``--field-name``."""
    out = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + list(argv[i:])
        if token.startswith("--") and "_" in token:
            flag, sep, value = token[2:].partition("=")
            bare = flag[3:] if flag.startswith("no_") else flag
            if bare in names or flag in ("print_config",):
                token = "--" + _option(flag) + sep + value
        out.append(token)
    return out


def load_yaml_config(path, config_cls) -> dict:
    """The values of a YAML config file, checked against ``config_cls``'s fields and types."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option names to values, not a {type(data).__name__}")
    return check_config_values(data, config_cls, str(path))


def check_config_values(data: dict, config_cls, where: str) -> dict:
    """``data`` checked against ``config_cls``'s field names (with a hint for a near miss) and
    converted to their types; errors start with ``where``."""
    specs = {f.name: ft for f, ft in _config_fields(config_cls)}
    unknown = [str(k) for k in data if k not in specs]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("-", "_"), list(specs), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(hints)}. "
            f"Valid keys: {', '.join(specs)}"
        )
    values = {}
    for key, value in data.items():
        try:
            values[key] = _coerce(value, specs[key], key)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
    return values


def parse_config_pairs(tokens: list[str], config_cls, option: str) -> dict:
    """``KEY=VALUE`` tokens of a command-line option (``option``, e.g. ``"--set"``), checked as
    :func:`check_config_values` checks a config file's keys."""
    pairs = _pairs_to_dict(tokens, option.lstrip("-"), "key=value pairs", "sample_guidance_scale=3")
    return check_config_values({key.replace("-", "_"): value for key, value in pairs.items()}, config_cls, option)


def parse_config(config_cls, argv: Sequence[str] | None = None, prog: str | None = None,
                 description: str | None = None, default_config: Path | None = None, epilog: str | None = None):
    """Parse ``argv`` into a ``config_cls`` instance: defaults < YAML (``--config`` or
    ``default_config``) < command line. Errors exit with status 2 and say what to fix."""
    parser = build_parser(config_cls, prog, description, default_config, epilog)
    fields = {f.name: (f, ft) for f, ft in _config_fields(config_cls)}
    specs = {name: ft for name, (_, ft) in fields.items()}
    argv = _normalise_argv(sys.argv[1:] if argv is None else list(argv), set(specs))
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config") or default_config
    print_config = args.pop("print_config")
    try:
        values = load_yaml_config(config_path, config_cls) if config_path is not None else {}
        for name, given in args.items():
            ft = specs[name]
            if ft.kind == "dict":
                for tokens in given:
                    if len(tokens) == 1 and tokens[0].lstrip().startswith("{"):
                        values[name] = _coerce(tokens[0], ft, f"--{_option(name)}")
                    else:
                        start = values[name] if name in values else _default(fields[name][0])
                        start = start if isinstance(start, dict) else {}
                        values[name] = {**start, **_pairs_to_dict(tokens, name)}
            else:
                values[name] = _coerce(given, ft, f"--{_option(name)}")
        missing = [name for name, (f, _) in fields.items()
                   if name not in values and _default(f) is dataclasses.MISSING]
        if missing:
            raise ConfigError("missing required option(s): " + ", ".join(f"--{_option(n)}" for n in missing))
        config = config_cls(**values)
    except (ConfigError, ValueError, TypeError) as err:  # includes the dataclass's own checks
        parser.error(str(err))
    if print_config:
        print(config_to_yaml(config), end="")
        raise SystemExit(0)
    return config


def config_to_yaml(config) -> str:
    """A YAML file that :func:`parse_config` reads back to an equal config."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False, allow_unicode=True)


# --- entry points ------------------------------------------------------------------------------------------


class _TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' warning that its image processors fall back to PIL without torchvision.

    diffusers imports those processors and pxpo never uses them; the warning's advice, installing
    torchvision, can replace a CPU build of torch with a CUDA one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_torchvision_fallback() -> None:
    """Installs :class:`_TorchvisionFallbackFilter` (once); every program in ``python/`` calls it first."""
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _TorchvisionFallbackFilter) for f in logger.filters):
        logger.addFilter(_TorchvisionFallbackFilter())


def _load_model(load_pipeline, prog: str, model: str | None, **kwargs):
    """``load_pipeline(model, **kwargs)``, with a missing or unloadable model as a one-line error."""
    try:
        return load_pipeline(model, **kwargs)
    except OSError as err:  # FileNotFoundError (embedded weights not trained) and diffusers' load errors
        what = "the embedded model" if model is None else f"model {model!r}"
        raise SystemExit(f"{prog}: error: could not load {what}: {err}") from None
    except ValueError as err:  # a pipeline of a kind pxpo does not train
        raise SystemExit(f"{prog}: error: {err}") from None


def _missing_model_folder(model: str | None) -> str | None:
    """An error message when ``model`` is meant as a local folder (not a hub id) and is not there."""
    if model is None or Path(model).expanduser().exists():
        return None
    if model.startswith((".", "/", "~")) or model.count("/") != 1:  # a hub id is exactly "owner/name"
        return (f"model folder {model!r} does not exist; pass a diffusers folder (with model_index.json), "
                "a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5, or nothing for the embedded model")
    return None


TRAIN_EPILOG = """examples:
  python python/train.py                                    # configs/default.yaml: embedded model, colour reward
  python python/train.py --config configs/colour_ddpo.yaml  # the DDPO baseline on the same task
  python python/train.py --num-epochs 5 --reward-kwargs channel=red --output-dir runs/less_red
  accelerate launch python/train.py --config configs/sd15_colour.yaml
"""


def train_main(argv: Sequence[str] | None = None):
    """Parse options, build the pipeline, reward and prompts, train, save the LoRA, print the summary.

    Returns the trainer (handy from Python; the script ignores it)."""
    quiet_torchvision_fallback()
    from accelerate import PartialState

    from .rewards import UnknownRewardError, get_reward
    from .trainer import PXPOConfig, PXPOTrainer, load_pipeline
    from .trainer.trainer import cpu_distributed
    from .trainer.prompts import get_prompt_fn

    default = DEFAULT_TRAIN_CONFIG if DEFAULT_TRAIN_CONFIG.is_file() else None
    config = parse_config(PXPOConfig, argv, prog="train.py", default_config=default, epilog=TRAIN_EPILOG,
                          description="Fine-tune a text-to-image diffusion model with per-pixel (PXPO) or "
                                      "per-image (DDPO) rewards.")
    # Everything that can fail fast does so before the (slow) model load.
    if (problem := _missing_model_folder(config.model)) is not None:
        raise SystemExit(f"train.py: error: {problem}")
    try:
        reward_fn = get_reward(config.reward, **config.reward_kwargs)
    except (UnknownRewardError, UserCodeError) as err:  # the message lists the names, or says what to write
        raise SystemExit(f"train.py: error: {err.args[0]}") from None
    except (TypeError, ValueError) as err:
        raise SystemExit(f"train.py: error: reward {config.reward!r} rejected --reward-kwargs "
                         f"{json.dumps(config.reward_kwargs)}: {err}") from None
    state = PartialState(cpu=cpu_distributed())  # the same mode the trainer's Accelerator will ask for
    try:  # each process draws its own prompt stream, as the trainer's own default does
        prompt_fn = get_prompt_fn(config.prompts, seed=config.seed + state.process_index)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"train.py: error: {err}") from None

    pipeline = _load_model(load_pipeline, "train.py", config.model)
    if state.is_main_process:  # the resolved options, re-runnable with --config
        plots.atomic_write(Path(config.output_dir) / "config.yaml", config_to_yaml(config))
    trainer = PXPOTrainer(config, reward_fn, prompt_fn, pipeline)
    try:
        trainer.train()  # saves the final weights to trainer.weights_dir and prints the run summary
    finally:
        trainer.close()  # reward threads and tensorboard
    if state.is_main_process:
        weights_dir = trainer.weights_dir
        if config.use_lora:
            print(f"LoRA weights: {weights_dir} (pipe.load_lora_weights({str(weights_dir)!r}), "
                  f"or: python python/sample.py --lora {weights_dir} --prompt ...)")
        else:
            print(f"fine-tuned UNet: {weights_dir / 'unet'} (UNet2DConditionModel.from_pretrained)")
    return trainer


SAMPLE_EPILOG = """examples:
  python python/sample.py --prompt "a red circle on a blue background" --out grid.png
  python python/sample.py --prompts-file prompts.txt --lora runs/pxpo/lora --reward colour --out after.png
  python python/sample.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --num-steps 50 \
      --prompt "a cat" --device cuda
"""


def build_sample_parser() -> argparse.ArgumentParser:
    from .trainer import PXPOConfig

    defaults = {f.name: f.default for f in dataclasses.fields(PXPOConfig)}
    parser = argparse.ArgumentParser(
        prog="sample.py", epilog=SAMPLE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render prompts with a model (optionally with trained LoRA weights) into one PNG grid.")
    parser.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                        help="a prompt to render; repeat for several")
    parser.add_argument("--prompts-file", metavar="FILE", help="a text file with one prompt per non-empty line")
    parser.add_argument("--model", default=None,
                        help="diffusers folder or hub id (default: the embedded model)")
    parser.add_argument("--lora", metavar="FOLDER", help="LoRA weights to load, e.g. a run's lora/ folder")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the first image; image k uses seed + k (default: 0)")
    parser.add_argument("--images-per-prompt", type=int, default=1, help="images per prompt (default: 1)")
    parser.add_argument("--num-steps", type=int, default=defaults["sample_num_steps"],
                        help="DDIM steps (default: %(default)s, as in training)")
    parser.add_argument("--guidance-scale", type=float, default=defaults["sample_guidance_scale"],
                        help="classifier-free guidance scale (default: %(default)s, as in training)")
    parser.add_argument("--negative-prompt", default=defaults["sample_negative_prompt"],
                        help="the prompt guidance steers away from (default: '', as in training)")
    parser.add_argument("--eta", type=float, default=defaults["sample_eta"],
                        help="DDIM eta; 0 is deterministic DDIM (default: %(default)s, as in training)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels (default: the model's native size)")
    add_reward_arguments(parser, None, "overlay its heatmap and print each image's mean reward")
    parser.add_argument("--batch-size", type=int, default=8, help="images rendered at once (default: 8)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="model dtype (default: float32)")
    parser.add_argument("--out", default="samples.png", metavar="FILE.png", help="output grid (default: %(default)s)")
    return parser


def _read_prompts(args, parser) -> list[str]:
    prompts = [p for p in args.prompt if p.strip()]
    if args.prompts_file:
        path = Path(args.prompts_file).expanduser()
        if not path.is_file():
            parser.error(f"--prompts-file {str(path)!r} does not exist")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        parser.error('give at least one prompt: --prompt "a red circle on a blue background" or --prompts-file FILE')
    return prompts


def add_reward_arguments(parser: argparse.ArgumentParser, default: str | None, purpose: str) -> None:
    """``--reward`` (a registered name or an import path) and ``--reward-kwargs``, read by :func:`build_reward`."""
    parser.add_argument("--reward", default=default,
                        help=f"a registered reward, or your own as package.module:name or file.py:name: {purpose}"
                             + (" (default: %(default)s)" if default else ""))
    parser.add_argument("--reward-kwargs", nargs="+", default=[], metavar="KEY=VALUE",
                        help="options for --reward, as key=value pairs or one JSON object")


def build_reward(args, parser) -> tuple[Callable, dict]:
    """``(reward function, options)`` from ``--reward`` and ``--reward-kwargs``; an unknown name, a bad
    import path or options the reward rejects end the program with a one-line error."""
    from .rewards import UnknownRewardError, get_reward

    tokens = args.reward_kwargs
    try:
        if len(tokens) == 1 and tokens[0].lstrip().startswith("{"):
            options = _coerce(tokens[0], _FieldType("dict"), "--reward-kwargs")
        else:
            options = _pairs_to_dict(tokens, "reward_kwargs")
        return get_reward(args.reward, **options), options
    except (UnknownRewardError, UserCodeError) as err:  # the message lists the names, or says what to write
        parser.error(err.args[0])
    except (TypeError, ValueError) as err:  # ConfigError and the reward's own RewardError are ValueErrors
        parser.error(f"reward {args.reward!r}: {err}")


def _sample_reward(args, parser):
    if args.reward is None:
        if args.reward_kwargs:
            parser.error("--reward-kwargs needs --reward")
        return None
    return build_reward(args, parser)[0]


def sample_main(argv: Sequence[str] | None = None):
    """Render prompts into a grid PNG (``--out``); returns the images ``(N, 3, H, W)`` in ``[0, 1]``."""
    quiet_torchvision_fallback()
    import torch

    from .rewards import normalize_output
    from .rewards.base import reward_name
    from .trainer import load_pipeline
    from .trainer.lora import load_lora, read_lora

    parser = build_sample_parser()
    args = parser.parse_args(argv)
    prompts = _read_prompts(args, parser)
    for name in ("images_per_prompt", "num_steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{_option(name)} must be at least 1, got {getattr(args, name)}")
    if args.eta < 0:
        parser.error(f"--eta must be >= 0, got {args.eta}")
    if (problem := _missing_model_folder(args.model)) is not None:
        parser.error(problem)
    if args.lora and not Path(args.lora).exists():
        parser.error(f"--lora {args.lora!r} does not exist; pass the folder that train.py wrote (e.g. runs/pxpo/lora)")
    if args.lora:  # a missing or corrupt file fails before the (slow) model load; whether it fits, after
        try:
            read_lora(args.lora)
        except (FileNotFoundError, ValueError) as err:
            parser.error(str(err))
    reward_fn = _sample_reward(args, parser)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = _load_model(load_pipeline, "sample.py", args.model, device=device, dtype=getattr(torch, args.dtype))
    if args.lora:
        try:
            load_lora(pipe, args.lora)
        except ValueError as err:  # a LoRA made for another model
            raise SystemExit(f"sample.py: error: {err}") from None
    jobs = [(p, args.seed + k) for k, p in enumerate(p for p in prompts for _ in range(args.images_per_prompt))]
    size = {} if args.resolution is None else {"height": args.resolution, "width": args.resolution}
    chunks = []
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start:start + args.batch_size]
        out = pipe(
            prompt=[p for p, _ in chunk],
            num_inference_steps=args.num_steps,
            guidance_scale=args.guidance_scale,
            negative_prompt=[args.negative_prompt] * len(chunk) if args.negative_prompt else None,
            eta=args.eta,
            generator=[torch.Generator().manual_seed(s) for _, s in chunk],  # per image: batch-independent
            output_type="pt",
            **size,
        )
        chunks.append(out.images.float().cpu())
    images = torch.cat(chunks)

    reward_maps = weight_maps = None
    if reward_fn is not None:
        result = normalize_output(
            reward_fn(images, [p for p, _ in jobs], [{"seed": s} for _, s in jobs]),
            reward_name(reward_fn), len(jobs), tuple(images.shape[-2:]),
        )
        reward_maps, weight_maps = result.reward, result.weight
    captions = [f"{p} (seed {s})" for p, s in jobs]
    fig = plots.sample_grid_figure(images, captions, reward_maps=reward_maps, weight_maps=weight_maps)
    path = plots.atomic_write(args.out, plots.figure_png(fig, dpi=plots.grid_dpi(images)))
    print(f"wrote {path} ({len(jobs)} images, {images.shape[-1]}x{images.shape[-2]})")
    if reward_maps is not None:
        for (prompt, seed), value in zip(jobs, _mean_rewards(reward_maps, weight_maps), strict=True):
            print(f"  reward {value:+.4f}  seed {seed}  {prompt}")
    return images


def _mean_rewards(reward_maps, weight_maps) -> list[float]:
    flat = reward_maps.reshape(reward_maps.shape[0], -1)
    if weight_maps is None:
        return flat.mean(dim=1).tolist()
    weights = weight_maps.reshape(weight_maps.shape[0], -1)
    return ((flat * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-12)).tolist()
