"""A run is defined by its config: TOML sections mapped onto dataclasses.

    cfg = load("configs/sparsyfed-digits.toml", overrides=["sparsity.sparsity=0.95"])

Unknown sections or keys and values of the wrong type or range raise ConfigError naming
the key (`client.lr: must be > 0, got -1`).  `dumps(cfg)` writes the resolved config back
as TOML; loading that file gives the same config.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsefl.errors import UserError


class ConfigError(UserError):
    """A config key that does not exist or a value that is not allowed."""


@dataclass
class RunSection:
    name: str = "sparsyfed-digits"
    seed: int = 0
    rounds: int = 40
    eval_every: int = 1
    keep_checkpoints: int = 2
    threads: int = 0  # 0: torch's default
    device: str = "auto"  # auto: CUDA when torch sees a GPU, else cpu


@dataclass
class DataSection:
    name: str = "digits"
    dir: str = ""
    partition: str = "dirichlet"
    alpha: float = 0.5
    shards_per_client: int = 2
    clients: int = 20
    test_fraction: float = 0.2
    fraction: float = 1.0  # keep this seeded fraction of the training set
    label_noise: float = 0.0  # symmetric: this fraction of training labels -> another class


@dataclass
class ModelSection:
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [128, 128])  # mlp only
    width: int = 64  # resnet18 only
    # "lecun_normal": the SparsyFed authors' init, truncated normal with std 1/sqrt(fan_in)
    # drawn for theta (Powerprop layers then map it to omega), biases zero
    init: str = "default"


@dataclass
class ClientSection:
    optimizer: str = "sgd"
    lr: float = 0.3
    lr_schedule: str = "constant"
    lr_end: float = 0.01  # exponential: lr at the last round
    momentum: float = 0.0
    weight_decay: float = 1e-3
    epochs: int = 5
    batch_size: int = 16
    rho: float = 0.05
    eta: float = 0.0  # ASAM's eta
    rho2: float = 0.05  # Agnostic-SAM's descent radius
    val_fraction: float = 0.2  # Agnostic-SAM's validation split of the local data
    # Powerprop layers (SparsyFed, FLASH): compute on the weight support ("sparse"), the
    # dense path, or per layer whichever is faster here ("auto"; sparsefl.nn.set_compute)
    compute: str = "auto"
    # sparse compute: a BatchNorm after a sparse layer recomputes its input in backward
    # instead of keeping it (less memory, a little more time; the same numbers); "auto":
    # only when a batch's largest such output is >= 4 MiB (set_compute's recompute)
    recompute: bool | str = "auto"
    # a sparse Powerprop MLP under plain SGD trains all its steps in one kernel call
    # (sparsefl.nn.fused_sgd): the same batches and updates, without the per-step overhead
    fused: bool = True


@dataclass
class SparsitySection:
    method: str = "sparsyfed"
    sparsity: float = 0.9
    beta: float = 1.25
    activation_pruning: bool = True
    scope: str = "global"  # global top-k over all layers (the paper) or per "layer"
    # conv layers: top-k of every batch, or the threshold of the round's first batch
    act_threshold: str = "per_batch"


@dataclass
class ServerSection:
    optimizer: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    clients_per_round: int = 10
    min_clients: int = 1  # fewer usable updates: the round is retried with a fresh sample
    max_retries: int = 3
    max_update_norm: float = 0.0  # drop updates whose L2 distance to the model exceeds it
    client_timeout: float = 0.0  # seconds; in-process clients are dropped after the fact


@dataclass
class SWASection:
    enabled: bool = False
    start: int = 0  # first SWA round; 0 means 75% of the rounds
    cycle: int = 5
    lr: float = 1e-4


@dataclass
class PersonalizationSection:
    method: str = "none"
    epochs: int = 5
    lr: float = 1e-3
    momentum: float = 0.9
    batch_size: int = 50
    every: int = 0  # 0: only after the last round


@dataclass
class DecentralizedSection:
    strategy: str = "none"  # none: federated rounds; else one iteration per "round"
    topology: str = "ring"
    edge_prob: float = 0.3  # erdos_renyi only
    density: float = 1.0  # < 1: neighbours get the top-k of each change, error feedback


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    client: ClientSection = field(default_factory=ClientSection)
    sparsity: SparsitySection = field(default_factory=SparsitySection)
    server: ServerSection = field(default_factory=ServerSection)
    swa: SWASection = field(default_factory=SWASection)
    personalization: PersonalizationSection = field(default_factory=PersonalizationSection)
    decentralized: DecentralizedSection = field(default_factory=DecentralizedSection)

    @property
    def swa_start(self) -> int:
        return self.swa.start or max(1, math.ceil(0.75 * self.run.rounds))


CHOICES = {
    "run.device": ("auto", "cpu", "cuda"),
    "data.name": ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100"),
    "data.partition": ("iid", "dirichlet", "shards"),
    "model.name": ("mlp", "lenet5", "resnet18"),
    "model.init": ("default", "lecun_normal"),
    "client.optimizer": ("sgd", "sam", "asam", "agnostic_sam"),
    "client.lr_schedule": ("constant", "exponential", "step"),
    "client.compute": ("auto", "dense", "sparse"),
    "sparsity.method": ("none", "topk", "sparsyfed", "flash"),
    "sparsity.scope": ("global", "layer"),
    "sparsity.act_threshold": ("per_batch", "first_batch"),
    "server.optimizer": ("fedavg", "fedavgm", "fedadam"),
    "personalization.method": ("none", "finetune", "fedbabu"),
    "decentralized.strategy": ("none", "diffusion", "consensus", "centralized"),
    "decentralized.topology": ("ring", "grid", "erdos_renyi", "complete"),
}
POSITIVE = {"run.rounds", "run.eval_every", "run.keep_checkpoints", "data.alpha",
            "data.shards_per_client", "data.clients", "model.width", "client.lr",
            "client.epochs", "client.batch_size", "server.lr", "server.tau", "server.beta2",
            "server.clients_per_round", "server.min_clients", "swa.cycle", "swa.lr",
            "personalization.lr", "personalization.batch_size", "decentralized.edge_prob"}
NON_NEGATIVE = {"run.seed", "run.threads", "client.lr_end", "client.momentum",
                "client.weight_decay", "client.rho", "client.eta", "client.rho2",
                "server.momentum", "server.beta1", "server.max_retries",
                "server.max_update_norm", "server.client_timeout", "swa.start",
                "personalization.epochs", "personalization.momentum", "personalization.every"}
UNIT = {"data.test_fraction", "data.label_noise", "client.val_fraction", "sparsity.sparsity",
        "server.beta1", "server.beta2", "server.momentum"}


# keys that take true, false or "auto"
BOOL_OR_AUTO = {"client.recompute"}


def _positive_ints(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)


def _check_type(key: str, value: Any, default: Any) -> Any:
    if key in BOOL_OR_AUTO:
        if not (isinstance(value, bool) or value == "auto"):
            raise ConfigError(f"{key}: must be true, false or \"auto\", got {value!r}")
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
    elif isinstance(default, list) and not _positive_ints(value):
        raise ConfigError(f"{key}: must be a list of positive integers, got {value!r}")
    return value


def validate(cfg: Config) -> Config:
    for section in dataclasses.fields(cfg):
        sec = getattr(cfg, section.name)
        for f in dataclasses.fields(sec):
            key, value = f"{section.name}.{f.name}", getattr(sec, f.name)
            if key in CHOICES and value not in CHOICES[key]:
                raise ConfigError(f"{key}: must be one of {', '.join(CHOICES[key])}; "
                                  f"got {value!r}")
            if key in POSITIVE and not value > 0:
                raise ConfigError(f"{key}: must be > 0, got {value!r}")
            if key in NON_NEGATIVE and not value >= 0:
                raise ConfigError(f"{key}: must be >= 0, got {value!r}")
            if key in UNIT and not 0 <= value < 1:
                raise ConfigError(f"{key}: must be in [0, 1), got {value!r}")
    if not 0 < cfg.decentralized.density <= 1:
        raise ConfigError("decentralized.density: must be in (0, 1], got "
                          f"{cfg.decentralized.density}")
    if not 0 < cfg.data.fraction <= 1:
        raise ConfigError(f"data.fraction: must be in (0, 1], got {cfg.data.fraction}")
    if cfg.decentralized.strategy == "none" and cfg.server.clients_per_round > cfg.data.clients:
        raise ConfigError(f"server.clients_per_round: {cfg.server.clients_per_round} is more "
                          f"than data.clients = {cfg.data.clients}")
    if cfg.sparsity.method == "sparsyfed" and not cfg.sparsity.beta > 1:
        raise ConfigError(f"sparsity.beta: SparsyFed needs beta > 1, got {cfg.sparsity.beta}")
    if cfg.sparsity.beta < 1:
        raise ConfigError(f"sparsity.beta: must be >= 1, got {cfg.sparsity.beta}")
    if cfg.swa.enabled and cfg.swa_start > cfg.run.rounds:
        raise ConfigError(f"swa.start: round {cfg.swa.start} is after the last round "
                          f"{cfg.run.rounds}")
    return cfg


def from_dict(raw: dict[str, Any]) -> Config:
    cfg = Config()
    for sname, values in raw.items():
        if sname not in {f.name for f in dataclasses.fields(cfg)}:
            raise ConfigError(f"{sname}: unknown section; sections are "
                              f"{', '.join(f.name for f in dataclasses.fields(cfg))}")
        if not isinstance(values, dict):
            raise ConfigError(f"{sname}: must be a table ([{sname}])")
        sec = getattr(cfg, sname)
        known = {f.name: f for f in dataclasses.fields(sec)}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(f"{sname}.{key}: unknown key; {sname} has "
                                  f"{', '.join(known)}")
            setattr(sec, key, _check_type(f"{sname}.{key}", value, getattr(sec, key)))
    return validate(cfg)


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word: a string


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        raw.setdefault(parts[0], {})
        if not isinstance(raw[parts[0]], dict):
            raise ConfigError(f"{parts[0]}: must be a table")
        raw[parts[0]][parts[1]] = _parse_value(text.strip())
    return raw


def _read(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's tables; a top-level `base = "other.toml"` (relative to the file)
    is read first and this file's values override it, table by table."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: base files include each other")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a file name, got {base!r}")
    merged = _read(path.parent / base, (*seen, path))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    raw = _read(Path(path)) if path is not None else {}
    return from_dict(apply_overrides(raw, overrides or []))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


def dumps(cfg: Config) -> str:
    out = []
    for section in dataclasses.fields(cfg):
        out.append(f"[{section.name}]")
        sec = getattr(cfg, section.name)
        out += [f"{f.name} = {_toml_value(getattr(sec, f.name))}" for f in dataclasses.fields(sec)]
        out.append("")
    return "\n".join(out)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
