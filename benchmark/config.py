"""Typed experiment configs: schema, YAML layering, ``key=value`` overrides and the config hash.

Layering, later wins (every layer is validated against the schema on its own, so an error
names the file or the override that caused it):

1. the schema defaults below and the method's ``config_class`` (paper values);
2. ``experiments/paper/<method>.yaml``: the method's paper config (the values of
   ``configs/NCT_pretraining/<method>/`` in ``TencentAILabHealthcare/ConCL``), the base of
   every profile;
3. ``experiments/<profile>.yaml``: the profile (``paper``, ``demo`` or ``cpu``);
4. ``experiments/<profile>/<method>.yaml``: the profile's overrides for that method, if any
   (for ``paper`` this is layer 2 itself). A profile built on another (``cpu`` on ``demo``,
   ``PROFILE_BASES``) takes the base's layers 3 and 4 first, then its own;
5. ``--config FILE`` files, in order;
6. ``key=value`` overrides from the command line or the Makefile.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from benchmark.core.contracts import MethodConfig
from benchmark.core.errors import UserError
from benchmark.core.registry import get_method
from benchmark.core.schema import DATASETS, OPTIMIZERS, PROBES, PROFILE_BASES, PROFILES

#: ResNet stages the dense probe can read.
STAGE_NAMES = ("layer1", "layer2", "layer3", "layer4")
#: Probe names ``probe.probes`` accepts.
PROBE_NAMES = tuple(dict.fromkeys(probe for _, probe in PROBES))
#: Real pre-training data whose presence makes ``PROFILE=auto`` pick ``paper``.
REAL_PRETRAIN_ROOT = Path("datasets/NCT-CRC-HE-100K")


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema; the message is one line."""


@dataclass
class DataConfig:
    """Pre-training images: NCT-CRC-HE-100K's layout or any folder of images."""

    root: str = str(REAL_PRETRAIN_ROOT)
    #: One relative path per line (the original's ``train.txt``); null = every image under root.
    list_file: str | None = None
    image_size: int = 224
    num_workers: int = 4
    #: Generate the synthetic H&E set into ``root`` when it is absent (demo profile).
    synthetic: bool = False
    synthetic_images: int = 1024
    synthetic_size: int = 224
    synthetic_seed: int = 0


@dataclass
class OptimConfig:
    """SGD or LARS and the per-epoch LR schedule of the original (mmcv ``by_epoch=True``)."""

    #: ``sgd`` (MoCo family) or ``lars`` (SimCLR, BYOL; see ``benchmark/training/optim.py``).
    name: str = "sgd"
    #: LR at ``reference_batch`` images; scaled linearly to the actual global batch.
    lr: float = 0.03
    reference_batch: int = 256
    scale_lr: bool = True
    momentum: float = 0.9
    weight_decay: float = 1e-4
    #: LARS trust coefficient η (OpenSelfSup's ``eta``); unused by SGD.
    trust_coefficient: float = 0.001
    #: ``cosine`` (to 0, stepped once per epoch) or ``step`` (MoCo-v1).
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=lambda: [120, 160])
    gamma: float = 0.1
    #: Linear warm-up per iteration over this many epochs, from ``warmup_ratio`` × LR.
    warmup_epochs: int = 0
    warmup_ratio: float = 1e-4


@dataclass
class PretrainConfig:
    epochs: int = 200
    #: Global batch over all processes (256 = 8 GPUs × 32 in the paper).
    batch_size: int = 256
    #: Images per BatchNorm group: the per-GPU batch of the original 8-GPU layout.
    bn_batch_size: int = 32
    seed: int = 0
    #: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    device: str = "auto"
    amp_bf16: bool = False
    channels_last: bool = False
    checkpoint_every: int = 25
    #: Progress lines (and loss host syncs) every this many steps.
    log_every: int = 20


@dataclass
class TrackingConfig:
    experiment: str = "concl-bench"
    #: null = ``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlruns/mlflow.db``.
    uri: str | None = None
    artifact_root: str = "mlruns/artifacts"
    #: CPU/GPU utilisation and memory on training runs (``system/*``): null = on CUDA only.
    system_metrics: bool | None = None
    #: Seconds between two system-metric samples (MLflow's default).
    system_metrics_interval_s: float = 10.0


@dataclass
class DetectionDataConfig:
    """One transfer dataset and its detectron2 schedule.

    The values are those of ``TencentAILabHealthcare/ConCL``
    ``benchmarks/detection/configs/{GlaS,CRAG}/*_R_18_FPN_1x.yaml`` (on its
    ``configs/Base-RCNN-FPN.yaml``) and, for keys they leave unset,
    ``facebookresearch/detectron2 detectron2/config/defaults.py``.
    """

    #: The release as downloaded (GlaS/CRAG layout) or an already-converted COCO folder.
    raw_root: str = MISSING
    #: Where the COCO conversion is written (ignored when raw_root is already COCO).
    root: str = MISSING
    #: Generate synthetic raw data into raw_root when it is absent (demo profile).
    synthetic: bool = False
    synthetic_train: int = 24
    synthetic_test: int = 12
    synthetic_height: int = 192
    synthetic_width: int = 256
    iterations: int = 5000
    steps: list[int] = field(default_factory=lambda: [4000])
    #: Shortest edge sampled uniformly in [lo, hi] for training (``range`` sampling).
    min_size_train: list[int] = field(default_factory=lambda: [400, 522])
    min_size_test: int = 522
    max_size: int = 1333


def _glas() -> DetectionDataConfig:
    return DetectionDataConfig(raw_root="datasets/GlaS", root="datasets/prepared/GlaS")


def _crag() -> DetectionDataConfig:
    return DetectionDataConfig(
        raw_root="datasets/CRAG",
        root="datasets/prepared/CRAG",
        iterations=15000,
        steps=[10000, 13000],
        min_size_train=[768, 1024],
        min_size_test=768,
    )


@dataclass
class FinetuneConfig:
    """Mask R-CNN R18-FPN fine-tuning, detectron2's "1x" recipe of the ConCL benchmark."""

    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    seeds: int = 5
    #: Images per iteration over all processes (IMS_PER_BATCH).
    batch_size: int = 16
    #: LR at ``reference_batch`` images; scaled linearly to ``batch_size``.
    lr: float = 0.02
    reference_batch: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4
    gamma: float = 0.1
    warmup_iters: int = 1000
    warmup_factor: float = 1e-3
    precise_bn_iters: int = 200
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512
    amp_bf16: bool = False
    num_workers: int = 4
    eval_batch_size: int = 2
    checkpoint_every: int = 1000
    log_every: int = 20
    glas: DetectionDataConfig = field(default_factory=_glas)
    crag: DetectionDataConfig = field(default_factory=_crag)


@dataclass
class TissueProbeConfig:
    """Patch classification on frozen pooled features, on images the pre-training never saw.

    Real data: probes train on ``train_root`` (NCT-CRC-HE-100K's class folders, as eva and
    the NCT papers do) and are tested on ``test_root`` (CRC-VAL-HE-7K: other patients,
    never in pre-training). Synthetic: two labelled sets made with their own generator seeds.
    """

    train_root: str = "datasets/NCT-CRC-HE-100K"
    test_root: str = "datasets/CRC-VAL-HE-7K"
    #: Generate both sets when absent (demo profile).
    synthetic: bool = False
    synthetic_train: int = 1024
    synthetic_test: int = 512
    synthetic_size: int = 224
    #: Generator seeds of the two sets; the pre-training set uses ``data.synthetic_seed``.
    synthetic_seed_train: int = 101
    synthetic_seed_test: int = 102
    #: Training patches per class drawn for each probe seed (null: all): the seed spread.
    train_per_class: int | None = 1000
    #: k-NN: cosine similarity, the k nearest vote with weight exp(sim / temperature).
    knn_k: int = 20
    knn_temperature: float = 0.07
    #: Logistic regression on standardised features: inverse L2 strength, L-BFGS budget.
    linear_c: float = 1.0
    linear_max_iter: int = 1000


@dataclass
class DenseProbeConfig:
    """A 1 x 1 conv gland/background head on frozen, upsampled layer3 + layer4 features."""

    layers: list[str] = field(default_factory=lambda: ["layer3", "layer4"])
    #: Shortest image edge the backbone sees (the long edge is capped at ``max_size``).
    size: int = 512
    max_size: int = 768
    iterations: int = 500
    batch_size: int = 8
    lr: float = 0.01
    weight_decay: float = 1e-4


@dataclass
class ProbeConfig:
    """The probe tier: frozen-backbone evaluations that run before the detector."""

    #: Which probes run: ``knn``, ``linear`` (tissue), ``dense`` (finetune.datasets).
    probes: list[str] = field(default_factory=lambda: ["knn", "linear", "dense"])
    #: Probe seeds; null = ``finetune.seeds``.
    seeds: int | None = None
    batch_size: int = 64
    num_workers: int = 4
    tissue: TissueProbeConfig = field(default_factory=TissueProbeConfig)
    dense: DenseProbeConfig = field(default_factory=DenseProbeConfig)


@dataclass
class ExperimentConfig:
    profile: str = "paper"
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    #: Checkpoints and exported backbones: ``<output_root>/<method>-<pretrain hash>/``.
    output_root: str = "mlruns/checkpoints"


#: Keys that change how a run is executed or logged, not what it computes.
UNHASHED_KEYS = (
    "profile",
    "data.num_workers",
    "pretrain.device",
    "pretrain.channels_last",
    "pretrain.checkpoint_every",
    "pretrain.log_every",
    "finetune.num_workers",
    "finetune.eval_batch_size",
    "finetune.checkpoint_every",
    "finetune.log_every",
    "finetune.glas.raw_root",
    "finetune.glas.root",
    "finetune.crag.raw_root",
    "finetune.crag.root",
    "probe.batch_size",
    "probe.num_workers",
    "probe.tissue.train_root",
    "probe.tissue.test_root",
    "tracking",
    "output_root",
)
#: What pre-training computes does not depend on the transfer stage.
PRETRAIN_SECTIONS = ("method", "data", "optim", "pretrain")


def experiments_dir() -> Path:
    return Path("experiments")


def _schema(method: str) -> DictConfig:
    schema = OmegaConf.structured(ExperimentConfig)
    schema.method = OmegaConf.structured(get_method(method).config_class)
    return schema


def _did_you_mean(leaf: str, known: list[str], parent: str, qualified: bool) -> str:
    hint = difflib.get_close_matches(leaf, known, n=1)
    if not hint:
        return ""
    return f"; did you mean '{parent + '.' if parent and qualified else ''}{hint[0]}'?"


def explain(
    exc: OmegaConfBaseException, node: DictConfig, source: str, qualified: bool = True
) -> ConfigError:
    """One line naming ``source``, the dotted key and, for an unknown key, the closest known
    one (the full dotted key, or only its last part when ``qualified`` is False)."""
    key = getattr(exc, "full_key", None) or "?"
    if isinstance(exc, ConfigKeyError):
        parent, _, leaf = key.rpartition(".")
        siblings = OmegaConf.select(node, parent) if parent else node
        if not isinstance(siblings, DictConfig):  # a key holding dots, or a layer's new entry
            siblings = exc.parent_node
        known = [str(k) for k in siblings] if isinstance(siblings, DictConfig) else []
        suggestion = _did_you_mean(leaf, known, parent, qualified)
        return ConfigError(f"{source}: unknown config key '{key}'{suggestion}")
    if isinstance(exc, ValidationError):
        detail = str(exc).splitlines()[0]
        return ConfigError(f"{source}: wrong type for config key '{key}': {detail}")
    return ConfigError(f"{source}: invalid config at '{key}': {str(exc).splitlines()[0]}")


def merge(
    base: DictConfig, layer: DictConfig | dict[str, Any], source: str, qualified: bool = True
) -> DictConfig:
    """``layer`` merged onto ``base`` (a structured config); a misfit raises ``explain``'s
    one-line ConfigError naming ``source``."""
    try:
        return OmegaConf.merge(base, layer)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise explain(exc, base, source, qualified) from None


def load_yaml(path: Path) -> DictConfig:
    """A YAML mapping, read by OmegaConf (whose YAML reads ``1e-3`` as a float; PyYAML does
    not); a missing file, bad YAML or a non-mapping is a one-line ConfigError."""
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: name a YAML file in it")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # yaml.YAMLError and friends: one line with the file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML: {first}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping of keys")
    return loaded


def select_leaf(cfg: DictConfig, key: str, source: str) -> Any:
    """The value at dotted ``key`` of ``cfg``; an unknown key is worded like ``explain``'s
    (with the closest known key), and a key naming a section is refused."""
    node: Any = cfg
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, DictConfig) or part not in node:
            known = [str(k) for k in node] if isinstance(node, DictConfig) else []
            suggestion = _did_you_mean(part, known, ".".join(parts[:i]), qualified=True)
            raise ConfigError(f"{source}: unknown config key '{key}'{suggestion}")
        node = node[part]
    if isinstance(node, DictConfig):
        raise ConfigError(f"{source}: '{key}' is a config section; name one of its keys")
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, ListConfig) else node


def resolve_profile(profile: str) -> tuple[str, str]:
    """The concrete profile for ``profile`` and why it was chosen."""
    if profile in PROFILES:
        return profile, f"PROFILE={profile} was asked for"
    if profile != "auto":
        raise ConfigError(f"unknown profile '{profile}'; use one of: auto, {', '.join(PROFILES)}")
    if real_data_ready():
        return "paper", f"real pre-training data found in {REAL_PRETRAIN_ROOT}/"
    return "demo", (
        f"no real pre-training data in {REAL_PRETRAIN_ROOT}/ (see datasets/README.md); "
        "using synthetic data"
    )


def profile_chain(profile: str) -> list[str]:
    """``profile`` after the profiles it builds on: ``cpu`` -> ``[demo, cpu]``."""
    chain = [profile]
    while chain[0] in PROFILE_BASES:
        chain.insert(0, PROFILE_BASES[chain[0]])
    return chain


def real_data_ready() -> bool:
    root = REAL_PRETRAIN_ROOT
    return root.is_dir() and any(p.suffix.lower() in (".tif", ".tiff") for p in root.glob("*/*"))


def load_config(
    method: str,
    profile: str = "auto",
    config_files: tuple[str | Path, ...] = (),
    overrides: tuple[str, ...] = (),
    announce: bool = True,
    extra_layers: Sequence[tuple[str, Mapping[str, Any]]] = (),
) -> DictConfig:
    """The resolved, validated config for ``method`` (see the module docstring for layering);
    ``announce`` prints the profile line once it is valid.

    ``extra_layers`` are ``(source, nested mapping)`` pairs merged after the ``--config`` files and
    before the overrides (a tuning study's fixed budget); their errors name ``source``.
    """
    cfg = _schema(method)
    concrete, why = resolve_profile(profile)
    root = experiments_dir()
    layers = [root / "paper" / f"{method}.yaml"]
    for name in profile_chain(concrete):
        layers.append(root / f"{name}.yaml")
        if name != "paper":
            layers.append(root / name / f"{method}.yaml")
    for path in layers:
        if path.is_file():
            cfg = merge(cfg, load_yaml(path), str(path))
    for path in config_files:
        cfg = merge(cfg, load_yaml(Path(path)), str(path))
    for source, layer in extra_layers:
        cfg = merge(cfg, dict(layer), source)
    if overrides:
        malformed = [o for o in overrides if "=" not in o or o.startswith("=")]
        if malformed:
            raise ConfigError(f"override '{malformed[0]}' is not of the form key=value")
        for override in overrides:
            key, _, value = override.partition("=")
            try:
                node = OmegaConf.select(cfg, key.strip(), default=None)
            except OmegaConfBaseException:
                node = None  # a malformed key: from_dotlist below words the error
            if isinstance(node, DictConfig) and not value.lstrip().startswith("{"):
                first = next(iter(node), "key")
                raise ConfigError(
                    f"command line: '{key}' is a config section, not a value; name one of its "
                    f"keys, e.g. {key}.{first}=..."
                )
        try:
            dotlist = OmegaConf.from_dotlist(list(overrides))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"command line: cannot parse overrides: {exc}") from None
        cfg = merge(cfg, dotlist, "command line")
    cfg.profile = concrete
    if cfg.method.name != method:
        raise ConfigError(
            f"method.name is '{cfg.method.name}' but the method asked for is '{method}'; "
            "choose the method with METHOD= (or --method), not method.name"
        )
    validate(cfg)
    if announce:  # after the checks: a refused config is one line, not a banner and a line
        announce_profile(concrete, why)
    return cfg


def announce_profile(profile: str, why: str | None = None) -> None:
    """The ``==> profile: ...`` line (which profile ``auto`` chose, and why). The CLI prints
    it once a command's checks passed, so that a refused input is its one error line."""
    concrete, reason = (profile, why) if why is not None else resolve_profile(profile)
    print(f"==> profile: {concrete} ({reason})", file=sys.stderr, flush=True)


def validate(cfg: DictConfig) -> None:
    """Checks of values that types alone cannot express."""
    p, o = cfg.pretrain, cfg.optim
    checks = [
        (p.epochs >= 1, "pretrain.epochs must be >= 1"),
        (p.batch_size >= 1, "pretrain.batch_size must be >= 1"),
        (p.bn_batch_size >= 1, "pretrain.bn_batch_size must be >= 1"),
        (p.checkpoint_every >= 1, "pretrain.checkpoint_every must be >= 1"),
        (p.log_every >= 1, "pretrain.log_every must be >= 1"),
        (p.device in ("auto", "cpu", "cuda"), "pretrain.device must be auto, cpu or cuda"),
        (o.name in OPTIMIZERS, f"optim.name '{o.name}' is not supported; use sgd or lars"),
        (o.trust_coefficient > 0, "optim.trust_coefficient must be > 0"),
        (o.schedule in ("cosine", "step"), "optim.schedule must be cosine or step"),
        (o.lr > 0, "optim.lr must be > 0"),
        (o.reference_batch >= 1, "optim.reference_batch must be >= 1"),
        (o.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
        (cfg.data.image_size >= 32, "data.image_size must be >= 32"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.data.synthetic_images >= 1, "data.synthetic_images must be >= 1"),
        (cfg.data.synthetic_seed >= 0, "data.synthetic_seed must be >= 0"),
        (p.seed >= 0, "pretrain.seed must be >= 0"),
        (
            cfg.probe.tissue.synthetic_seed_train >= 0,
            "probe.tissue.synthetic_seed_train must be >= 0",
        ),
        (
            cfg.probe.tissue.synthetic_seed_test >= 0,
            "probe.tissue.synthetic_seed_test must be >= 0",
        ),
        (cfg.data.synthetic_size >= 8, "data.synthetic_size must be >= 8"),
        (
            not (cfg.data.synthetic and get_method(cfg.method.name).pretrains)
            or p.batch_size <= cfg.data.synthetic_images,
            f"pretrain.batch_size={p.batch_size} is larger than the pre-training set "
            f"(data.synthetic_images={cfg.data.synthetic_images}): lower pretrain.batch_size to "
            f"at most {cfg.data.synthetic_images} or raise data.synthetic_images",
        ),
        (cfg.finetune.seeds >= 1, "finetune.seeds must be >= 1"),
        (cfg.finetune.batch_size >= 1, "finetune.batch_size must be >= 1"),
        (cfg.finetune.num_workers >= 0, "finetune.num_workers must be >= 0"),
        (cfg.finetune.eval_batch_size >= 1, "finetune.eval_batch_size must be >= 1"),
        (cfg.finetune.checkpoint_every >= 1, "finetune.checkpoint_every must be >= 1"),
        (cfg.finetune.log_every >= 1, "finetune.log_every must be >= 1"),
        (cfg.finetune.lr > 0, "finetune.lr must be > 0"),
        (cfg.finetune.reference_batch >= 1, "finetune.reference_batch must be >= 1"),
        (cfg.finetune.precise_bn_iters >= 0, "finetune.precise_bn_iters must be >= 0"),
        (cfg.probe.num_workers >= 0, "probe.num_workers must be >= 0"),
        (cfg.probe.tissue.synthetic_size >= 8, "probe.tissue.synthetic_size must be >= 8"),
        (
            all(p in PROBE_NAMES for p in cfg.probe.probes),
            f"probe.probes must name knn, linear and/or dense, got {list(cfg.probe.probes)}",
        ),
        (cfg.probe.seeds is None or cfg.probe.seeds >= 1, "probe.seeds must be >= 1 or null"),
        (cfg.probe.batch_size >= 1, "probe.batch_size must be >= 1"),
        (cfg.probe.tissue.knn_k >= 1, "probe.tissue.knn_k must be >= 1"),
        (cfg.probe.tissue.knn_temperature > 0, "probe.tissue.knn_temperature must be > 0"),
        (cfg.probe.tissue.linear_c > 0, "probe.tissue.linear_c must be > 0"),
        (
            cfg.probe.tissue.train_per_class is None or cfg.probe.tissue.train_per_class >= 1,
            "probe.tissue.train_per_class must be >= 1 or null",
        ),
        (
            cfg.probe.tissue.synthetic_train >= 2 and cfg.probe.tissue.synthetic_test >= 1,
            "probe.tissue.synthetic_train must be >= 2 and synthetic_test >= 1",
        ),
        (
            all(
                layer in ("layer1", "layer2", "layer3", "layer4")
                for layer in cfg.probe.dense.layers
            )
            and len(cfg.probe.dense.layers) >= 1,
            "probe.dense.layers must name one or more of layer1..layer4",
        ),
        (cfg.probe.dense.size >= 32, "probe.dense.size must be >= 32"),
        (cfg.probe.dense.max_size >= cfg.probe.dense.size, "probe.dense.max_size must be >= size"),
        (cfg.probe.dense.iterations >= 1, "probe.dense.iterations must be >= 1"),
        (cfg.probe.dense.batch_size >= 1, "probe.dense.batch_size must be >= 1"),
        (cfg.probe.dense.lr > 0, "probe.dense.lr must be > 0"),
        (
            all(d in DATASETS for d in cfg.finetune.datasets),
            f"finetune.datasets must name glas and/or crag, got {list(cfg.finetune.datasets)}",
        ),
    ]
    for name in DATASETS:
        d = cfg.finetune[name]
        prefix = f"finetune.{name}"
        checks += [
            (d.iterations >= 1, f"{prefix}.iterations must be >= 1"),
            (d.synthetic_train >= 1, f"{prefix}.synthetic_train must be >= 1"),
            (d.synthetic_test >= 1, f"{prefix}.synthetic_test must be >= 1"),
            (
                d.synthetic_height >= 16 and d.synthetic_width >= 16,
                f"{prefix}.synthetic_height and synthetic_width must be >= 16",
            ),
            (
                not d.synthetic
                or name not in cfg.finetune.datasets
                or cfg.finetune.batch_size <= d.synthetic_train,
                f"finetune.batch_size={cfg.finetune.batch_size} is larger than the "
                f"{d.synthetic_train} training images of the synthetic {name} "
                f"({prefix}.synthetic_train): lower finetune.batch_size to at most "
                f"{d.synthetic_train} or raise {prefix}.synthetic_train",
            ),
            (len(d.min_size_train) == 2, f"{prefix}.min_size_train must be [lo, hi]"),
            (
                len(d.min_size_train) != 2 or d.min_size_train[0] <= d.min_size_train[1],
                f"{prefix}.min_size_train must be [lo, hi] with lo <= hi",
            ),
            (
                list(d.steps) == sorted(d.steps) and all(0 < s < d.iterations for s in d.steps),
                f"{prefix}.steps must be increasing and inside (0, {prefix}.iterations)",
            ),
        ]
    checks += [(False, f"method.{problem}") for problem in method_config(cfg).problems()]
    for ok, message in checks:
        if not ok:
            raise ConfigError(_with_value(cfg, message))


def _with_value(cfg: DictConfig, message: str) -> str:
    """``message`` with the offending value when it starts with a key and does not quote it
    (``pretrain.epochs must be >= 1 (got 0)``): the user sees what they set, and where a
    shorthand (EPOCHS, SEEDS) set it."""
    key = message.split(" ", 1)[0]
    if "got" in message or "=" in key or "." not in key:
        return message
    try:
        value = OmegaConf.select(cfg, key, throw_on_missing=False)
    except OmegaConfBaseException:
        return message
    if value is None or isinstance(value, DictConfig):
        return message
    shorthand = _SHORTHANDS.get(key)
    via = f"; {shorthand} sets it" if shorthand else ""
    return f"{message} (got {value}{via})"


#: The command-line shorthands of config keys, named in their errors.
_SHORTHANDS = {
    "pretrain.epochs": "EPOCHS= / --epochs",
    "finetune.seeds": "SEEDS= / --seeds",
}


def method_config(cfg: DictConfig) -> MethodConfig:
    """The method's typed config (its ``config_class``) from the resolved ``cfg.method``."""
    return get_method(cfg.method.name).config_class(**to_container(cfg.method))


def check_layout(cfg: DictConfig, world_size: int) -> None:
    """The global batch must split evenly over processes, and each share into BN groups."""
    batch, bn = cfg.pretrain.batch_size, cfg.pretrain.bn_batch_size
    if batch % world_size:
        raise ConfigError(
            f"pretrain.batch_size={batch} does not split over {world_size} processes: "
            "change the batch size or GPUS"
        )
    local = batch // world_size
    if local % min(bn, local):
        raise ConfigError(
            f"the per-process batch {local} is not a multiple of pretrain.bn_batch_size={bn}: "
            "change pretrain.batch_size, GPUS or pretrain.bn_batch_size"
        )


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def _drop(tree: dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head not in tree:
        return
    if rest:
        if isinstance(tree[head], dict):
            _drop(tree[head], rest)
    else:
        del tree[head]


def config_hash(cfg: DictConfig, sections: tuple[str, ...] | None = None) -> str:
    """12 hex digits of SHA-256 over what the run computes; stable under key order.

    ``sections`` restricts the hash to those top-level keys (see ``pretrain_hash``).
    """
    tree = to_container(cfg)
    for key in UNHASHED_KEYS:
        _drop(tree, key)
    revision = method_config(cfg).revision()
    if revision:  # absent at 0, so the hashes of unrevised configs stay as they were
        tree["method_revision"] = revision
        if sections is not None:
            sections = (*sections, "method_revision")
    if sections is not None:
        tree = {k: v for k, v in tree.items() if k in sections}
    return digest(tree)


def pretrain_hash(cfg: DictConfig) -> str:
    """The hash that keys a pre-training run: changing fine-tuning keys reuses it."""
    return config_hash(cfg, PRETRAIN_SECTIONS)


def finetune_hash(cfg: DictConfig) -> str:
    """What the transfer stage computes: the ``finetune`` section without execution keys."""
    return config_hash(cfg, ("finetune",))


def probe_hash(cfg: DictConfig) -> str:
    """What the probe tier computes: the ``probe`` section, the view size it resizes patches
    to, and the gland datasets' sources (the dense probe trains on them). The number of
    seeds is left out: results live per seed, so more seeds add to the fewer ones."""
    tree = to_container(cfg)
    for key in (*UNHASHED_KEYS, "probe.seeds"):
        _drop(tree, key)
    glands = {
        name: {k: v for k, v in tree["finetune"][name].items() if k.startswith("synthetic")}
        for name in tree["finetune"]["datasets"]
    }
    return digest({"probe": tree["probe"], "image_size": tree["data"]["image_size"], **glands})


def probe_seeds(cfg: DictConfig) -> int:
    return cfg.probe.seeds if cfg.probe.seeds is not None else cfg.finetune.seeds


def digest(tree: Any) -> str:
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
