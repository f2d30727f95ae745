"""The exported backbone as an MLflow model: logged on its pre-training run (the UI's Models
column), registered as ``<method>-r18-ep<epochs>`` (``-<profile>`` off the paper profile), and
read back from a ``models:/`` URI by ``finetune --weights``.

The model is a torchvision ResNet-18 whose ``fc`` is ``Identity``, holding exactly the tensors
of ``backbone.pth`` (which stays the file the stages read): ``load_model(...).state_dict()``
is that file's state_dict. It is pickled (MLflow's ``pickle`` serialisation: torchvision's
own classes, no tracing) with its requirements pinned to this process's torch and
torchvision, so logging never runs MLflow's requirement inference (a subprocess that imports
the model, tens of seconds).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
import torchvision
from mlflow.environment_variables import MLFLOW_TRACKING_URI
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec
from torch import nn

from benchmark.core.errors import UserError
from benchmark.core.schema import BACKBONE
from benchmark.training.checkpoints import save_torch
from benchmark.transfer.weights import read_torch_state_dict

MODEL_NAME = "backbone"  # the logged model's name on its run
MODELS_SCHEME = "models:/"
#: How a user turns the registered model back into the file every stage reads.
RECIPE = (
    "A torchvision ResNet-18 (`fc` = `Identity`) holding the pre-trained backbone: "
    "`model = mlflow.pytorch.load_model('models:/{name}/<version>')`; "
    "`torch.save(model.state_dict(), 'backbone.pth')` gives the torchvision-format state_dict "
    "(conv1, bn1, layer1-4) that `concl-bench finetune --weights backbone.pth` and "
    "`torchvision.models.resnet18().load_state_dict(..., strict=False)` read; "
    "`concl-bench finetune --weights models:/{name}/<version>` scores it directly. "
    "The forward pass maps (N, 3, H, W) float images, normalised as in pre-training, to "
    "(N, 512) pooled features."
)
_SIGNATURE = ModelSignature(
    inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1), "images")]),
    outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 512), "features")]),
)


class RegistryError(UserError):
    """A ``models:/`` URI that cannot be read; the message says what to do."""


def registered_name(method: str, epochs: int, profile: str) -> str:
    """``concl-r18-ep400`` (``concl-r18-ep3-demo`` off the paper profile)."""
    name = f"{method}-{BACKBONE}-ep{epochs}"
    return name if profile == "paper" else f"{name}-{profile}"


def backbone_module(state: dict[str, torch.Tensor]) -> nn.Module:
    """A torchvision ResNet-18 without its classifier, holding ``state`` (strict)."""
    model = torchvision.models.resnet18(weights=None)
    model.fc = nn.Identity()
    model.load_state_dict(state, strict=True)
    return model.eval()


@contextlib.contextmanager
def _store(uri: str) -> Iterator[None]:
    """MLflow's model API reads the process-wide tracking URI: point it at ``uri`` for the
    call, then leave it unset again with ``MLFLOW_TRACKING_URI`` as it was. Setting the old
    value back instead would pin it (``set_tracking_uri`` wins over the environment from then
    on), and a later change of ``MLFLOW_TRACKING_URI`` in this process would go unseen. The
    project never sets the URI elsewhere, so "unset" is the state to return to."""
    env_before = MLFLOW_TRACKING_URI.get()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # also unsets MLFLOW_TRACKING_URI
        if env_before is not None:
            MLFLOW_TRACKING_URI.set(env_before)


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def _requirements() -> list[str]:
    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
    ]


def register_backbone(
    uri: str, run_id: str, backbone: Path, name: str, tags: dict[str, Any]
) -> str | None:
    """Log ``backbone`` as the model of pre-training run ``run_id`` and register it as
    ``name``; returns the version. A run whose backbone is already registered (a re-run that
    exported it again) registers nothing new."""
    with _store(uri):
        client = mlflow.MlflowClient()
        with contextlib.suppress(MlflowException):
            client.create_registered_model(name, description=RECIPE.format(name=name))
        found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        if found:
            return str(found[0].version)
        model = backbone_module(read_torch_state_dict(backbone))
        str_tags = {k: str(v) for k, v in tags.items()}
        # made here in the run's experiment (MLflow would use the process's active one,
        # experiment 0, and write the files under ./mlruns/0)
        logged = client.create_logged_model(
            client.get_run(run_id).info.experiment_id,
            name=MODEL_NAME,
            source_run_id=run_id,
            tags=str_tags,
        )
        with _quiet("mlflow.pytorch"):  # its pickle warning: the file is our own backbone
            info = mlflow.pytorch.log_model(
                model,
                name=MODEL_NAME,
                signature=_SIGNATURE,
                pip_requirements=_requirements(),
                serialization_format="pickle",
                run_id=run_id,
                model_id=logged.model_id,
            )
        version = client.create_model_version(
            name,
            source=info.model_uri,
            run_id=run_id,
            tags=str_tags,
            description=RECIPE.format(name=name),
            model_id=info.model_id,
        )
        return str(version.version)


def is_model_uri(text: str) -> bool:
    return str(text).startswith(MODELS_SCHEME)


def fetch_backbone(uri: str, model_uri: str, out_root: Path) -> Path:
    """The ``backbone.pth`` of registered model ``model_uri`` (``models:/name/version`` or
    ``models:/name@alias``), written once under ``out_root/registry/`` and then reused."""
    ref = model_uri.removeprefix(MODELS_SCHEME).strip("/")
    with _store(uri):
        client = mlflow.MlflowClient()
        try:
            if "@" in ref:
                name, alias = ref.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, _, version = ref.partition("/")
                if not version:
                    raise RegistryError(
                        f"{model_uri} names no version: use models:/{name}/<version> or "
                        f"models:/{name}@<alias>"
                    )
                mv = client.get_model_version(name, version)
        except MlflowException as exc:
            raise RegistryError(
                f"{model_uri} is not a registered model version in {uri} "
                f"({str(exc).splitlines()[0][:200]}); check the name and version in the "
                "MLflow UI's Models page"
            ) from None
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", f"{mv.name}-v{mv.version}")
        path = Path(out_root) / "registry" / safe / "backbone.pth"
        if not path.is_file():
            model = mlflow.pytorch.load_model(f"{MODELS_SCHEME}{mv.name}/{mv.version}")
            path.parent.mkdir(parents=True, exist_ok=True)
            save_torch(model.state_dict(), path)
    return path
