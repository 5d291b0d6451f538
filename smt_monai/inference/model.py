"""A trained SMT as a file that says what it is, loaded back with its path alone.

``model.pt`` holds, beside the weights (``"model"``), a model card under ``"smt_monai"``
(:class:`ModelCard`): the network config (preset and every ``SMTConfig`` field, the geometry included:
``geometry`` and ``layer3_mpp``), the class names, the input normalisation, the inference settings it was
trained and validated with (K, aggregation, decision threshold), the package version, and a summary of its
training data; :class:`~smt_monai.handlers.BestModelCheckpoint` adds the best validation score, its epoch and
the validation metrics. Everything is plain data, so the file loads with ``torch.load(weights_only=True)``
and a crafted file cannot run code. :func:`load_model` rebuilds the network from the card and keeps the card
on it as JSON (``network.card``, a string a TorchScript export carries too), so evaluation, inference,
``ckpt_export`` and the Deploy app all read the model's own settings.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from smt_monai import __version__
from smt_monai.cascade.prediction import check_aggregation
from smt_monai.data.datalist import numbered_class_names
from smt_monai.data.errors import UserError
from smt_monai.networks.normalization import HE_OD_MEAN, HE_OD_STD
from smt_monai.networks.smt import CARD_KEY, SMT, SMTConfig
from smt_monai.utils import torch_load_problem, usable_device

STRUCTURE = ("preset", *(f.name for f in dataclasses.fields(SMTConfig)))
"""What a user may state when loading a model, checked against its card (``load_model``'s ``expect``)."""


class ModelFileError(UserError, ValueError):
    """A model file that cannot be used as given; the message names the file and says what to do."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {' '.join(problem.split())}")


def normalisation() -> dict[str, Any]:
    """The input normalisation this version applies (``normalize_he``), recorded with every model."""
    return {"name": "normalize_he", "od_mean": list(HE_OD_MEAN), "od_std": HE_OD_STD}


@dataclass
class ModelCard:
    """What a trained SMT is and how it is meant to be used.

    Attributes:
        preset: the preset the network was built from (``paper`` or ``tiny``).
        network: every ``SMTConfig`` field (the geometry included).
        class_names: one name per class (class 0 negative).
        num_focus: ``K`` it was trained and validated with.
        aggregation: ``max`` or ``mean`` over the layer-3 regions.
        threshold: decision threshold on P(positive) of a binary model: the one its validation split gave
            at the best epoch (the ``decision_threshold`` metric), 0.5 without one.
        normalization: the input normalisation (``normalisation()``).
        version: the smt-monai version that trained it.
        training: what it was trained on and how (datalist, slide counts, schedule).
        validation: best validation score, its epoch and the validation metrics then.
    """

    preset: str
    network: dict[str, Any]
    class_names: list[str]
    num_focus: int = 4
    aggregation: str = "max"
    threshold: float = 0.5
    normalization: dict[str, Any] = field(default_factory=normalisation)
    version: str = __version__
    training: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_training(
        cls,
        network: SMT,
        preset: str,
        class_names: Sequence[str] | None = None,
        num_focus: int = 4,
        aggregation: str = "max",
        threshold: float = 0.5,
        training: Mapping[str, Any] | None = None,
    ) -> ModelCard:
        """The card of a network about to be trained (``train.yaml``'s ``model_card``)."""
        check_aggregation(network, aggregation)
        config = dataclasses.asdict(network.config)
        names = list(class_names) if class_names else numbered_class_names(config["num_classes"])
        if len(names) != config["num_classes"]:
            raise ValueError(f"{len(names)} class names for {config['num_classes']} classes: {names}")
        return cls(preset, _plain(config), names, int(num_focus), aggregation, float(threshold),
                   training=_plain(dict(training or {})))  # fmt: skip

    @classmethod
    def of(cls, network: Any, path: str | os.PathLike = "model") -> ModelCard:
        """The card a loaded network carries (``network.card``, eager or TorchScript); ``path`` names its
        file in errors.

        Raises:
            ValueError: the network carries none (it was not made by ``load_model``).
            ModelFileError: the card is not valid JSON, or its entries are missing or unknown.
        """
        text = str(getattr(network, "card", "") or "")
        if not text:
            raise ValueError(
                "this network carries no model card: load it with smt_monai.inference.load_model"
            )
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            raise ModelFileError(path, "its model card is not valid JSON (an edited file?)") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: str | os.PathLike = "model") -> ModelCard:
        """A card from its ``to_dict`` form.

        Raises:
            ModelFileError: keys are missing or unknown.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        required -= {f.name for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}
        if missing := sorted(required - set(data)):
            raise ModelFileError(path, f"the model card lacks {missing}")
        if unknown := sorted(set(data) - names):
            raise ModelFileError(path, f"the model card has unknown entries {unknown} (a newer smt-monai?)")
        settings = {f.name for f in dataclasses.fields(SMTConfig)}
        network = data["network"]
        if not isinstance(network, Mapping):
            raise ModelFileError(path, f"the model card's network is {type(network).__name__}, not settings")
        if unknown := sorted(set(network) - settings):
            raise ModelFileError(
                path,
                f"the model card's network has settings {unknown} this smt-monai lacks (a newer smt-monai?)",
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def metadata(self) -> dict[str, Any]:
        """The entry of ``model.pt`` that holds the card (``BestModelCheckpoint``'s ``metadata``)."""
        return {CARD_KEY: self.to_dict()}

    def config(self) -> SMTConfig:
        return SMTConfig(**self.network)

    def describe(self) -> str:
        """One paragraph a user reads before running the model."""
        net = self.network
        lines = [
            f"SMT, preset {self.preset}: grid {net['grid']}, patch {net['patch_size']} px, "
            f"{net['num_classes']} classes ({', '.join(self.class_names)})",
            f"geometry {net['geometry']}"
            + (f", layer 3 reads at {net['layer3_mpp']:g} um/px" if net["geometry"] == "physical" else ""),
            f"K = {self.num_focus}"
            + (" (layer 1's picks apart)" if net.get("spread_focus") else "")
            + f", aggregation {self.aggregation}, threshold {self.threshold:g}",
            f"trained with smt-monai {self.version}",
        ]
        heads = [name for key, name in HEADS.items() if net.get(key)]
        if heads:
            lines.insert(3, f"slide-level heads: {', '.join(heads)}")
        if self.validation:
            best = self.validation.get("best_metric")
            lines.append(f"best validation score {best} at epoch {self.validation.get('best_epoch')}")
        return "\n".join(lines)


HEADS = {"slide_head": "slide head (aggregation learned)", "risk_head": "risk head (Cox; a risk column)"}
"""The optional heads after layer 3 (``SMTConfig``'s fields), as :meth:`ModelCard.describe` names them."""


def _plain(value: Any) -> Any:
    """``value`` as JSON-like plain data (tuples to lists, tensors to lists, NaN to None)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _plain(value.tolist())
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def save_model(network: SMT, card: ModelCard, path: str | os.PathLike) -> Path:
    """Write ``network``'s weights with ``card`` to ``path`` (atomically), as training's best model is."""
    from smt_monai.utils import atomic_path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({"model": network.state_dict(), **card.metadata()}, tmp)
    return path


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu", **expect: Any) -> torch.nn.Module:
    """The trained network at ``path`` (``model.pt`` or its TorchScript export), in eval mode on ``device``,
    with its card as ``network.card``.

    Args:
        path: the model file.
        device: where the network runs.
        **expect: settings the caller states (``preset``, ``grid``, ``patch_size``, any ``SMTConfig`` field);
            ``None`` values are ignored, others must equal the card's.

    Raises:
        ModelFileError: the file is missing, not a model, a bare state dict without card, or contradicts
            ``expect``; the message names the file and the values.
    """
    path = Path(path)
    device = usable_device(device)
    if not path.is_file():
        raise ModelFileError(path, "model file does not exist (train first, or pass --ckpt_path)")
    if _is_torchscript(path):
        try:
            network = torch.jit.load(str(path), map_location=device)
        except Exception as exc:  # a damaged archive: torch's own reason, in one line
            raise ModelFileError(path, torch_load_problem(path, exc)) from None
        if not getattr(network, "card", ""):
            raise ModelFileError(
                path,
                "is a TorchScript module without an smt-monai model card: export the trained model.pt with "
                "the bundle's ckpt_export (python -m monai.bundle ckpt_export network_def ...; see "
                "bundle/docs/README.md)",
            )
        card = ModelCard.of(network, path)
    else:
        content = _load(path)
        if isinstance(content, dict) and CARD_KEY not in content and {"network", "trainer"} <= set(content):
            beside = path.with_name("model.pt")
            raise ModelFileError(
                path,
                "is a training checkpoint (network, optimizer and trainer state to resume training), not a "
                f"model: use {beside if beside.is_file() else 'the model.pt training wrote beside it'}",
            )
        if not isinstance(content, dict) or CARD_KEY not in content:
            raise ModelFileError(
                path,
                "holds weights without a model card (a state dict saved by an older smt-monai or another "
                "tool): retrain with this version, or build the network yourself (SMT(preset=..., grid=..., "
                "patch_size=..., geometry='tissue')) and load_state_dict the weights",
            )
        card = ModelCard.from_dict(content[CARD_KEY], path)
        card.validation = _plain(
            {k: content[k] for k in ("best_metric", "best_epoch", "metrics") if k in content}
        )
        card.threshold = float(card.validation.get("metrics", {}).get("decision_threshold", card.threshold))
        try:
            network = SMT(config=card.config())
        except (TypeError, ValueError) as exc:
            problem = " ".join(str(exc).split())
            raise ModelFileError(
                path, f"the model card's network settings build no network ({problem})"
            ) from None
        try:
            network.load_state_dict(content["model"])
        except RuntimeError as exc:
            problem = str(exc).split("\n")[0]
            raise ModelFileError(
                path, f"weights do not fit the network its card describes ({problem})"
            ) from None
        network.card = card.to_json()
    _check(path, card, expect)
    return network.to(device).eval()


def _is_torchscript(path: Path) -> bool:
    """TorchScript exports are zip archives holding ``constants.pkl`` and code; checkpoints are not."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/code/__torch__.py") or "/code/" in name for name in archive.namelist())


def _load(path: Path) -> Any:
    """The file's content on the CPU (whatever device saved it), only tensors and plain data."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a crafted pickle, a truncated or foreign file: never unpickle code
        raise ModelFileError(path, torch_load_problem(path, exc)) from None


def _check(path: Path, card: ModelCard, expect: Mapping[str, Any]) -> None:
    """Every stated value equals the card's; the normalisation is this version's."""
    if unknown := sorted(set(expect) - set(STRUCTURE)):
        raise ValueError(f"cannot check {unknown} against a model card; known: {STRUCTURE}")
    recorded = {"preset": card.preset, **card.network}
    for key, value in expect.items():
        if value is None:
            continue
        have = recorded[key]
        same = math.isclose(float(value), float(have)) if isinstance(have, float) else _plain(value) == have
        if not same:
            raise ModelFileError(
                path,
                f"{key} {value!r} was given, but the model was trained with {key} {have!r}; leave it out "
                "(the model file says it)",
            )
    if card.normalization != normalisation():
        raise ModelFileError(
            path,
            f"was trained with input normalisation {card.normalization}, this smt-monai applies "
            f"{normalisation()}: use the version that trained it ({card.version})",
        )
