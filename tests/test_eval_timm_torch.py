"""Scoring any timm ImageNet model on IN-9: models that are not a bgjax family run in PyTorch
behind the same evaluator, pipeline and metrics (`bgjax.models.torch_timm`)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from fake_trees import write_in9_release
from parity_utils import randomize_torch_model, timm_model
from safetensors.torch import save_file

from bgjax import evaluate, models

pytestmark = pytest.mark.parity  # every test here runs a timm model in PyTorch

SIZE = 32
VARIANTS = ("original", "mixed_same", "mixed_rand")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return write_in9_release(tmp_path_factory.mktemp("in9"), per_class=2, size=SIZE)


def _score(name, weights, release, out, **kwargs):
    return evaluate.evaluate_pretrained(
        name, weights, "in9", out_dir=out, variant_names=VARIANTS, batch_size=8,
        overrides={"data.root": str(release), "data.image_size": SIZE}, **kwargs,
    )  # fmt: skip


def _records(out) -> dict:
    rows = pq.read_table(out / "records.parquet").to_pylist()
    return {(r["variant"], r["file"]): (r["pred"], r["prob_label"]) for r in rows}


def test_a_bgjax_family_scores_the_same_in_pytorch(release, tmp_path, monkeypatch):
    """ResNet-18's weights scored by JAX and, posing as a non-bgjax model, by PyTorch: the
    same predictions and probabilities of every image, the same metrics."""
    torch_model = randomize_torch_model(timm_model("resnet18", num_classes=1000), seed=2)
    weights = tmp_path / "resnet18.safetensors"
    save_file(torch_model.state_dict(), str(weights))
    jax_run = _score("resnet18", weights, release, tmp_path / "jax")
    monkeypatch.setattr(models, "names", lambda: ())  # no bgjax family: the PyTorch path
    torch_run = _score("resnet18", weights, release, tmp_path / "torch")

    assert (jax_run["framework"], torch_run["framework"]) == ("jax", "torch")
    saved = json.loads((tmp_path / "torch" / "results.json").read_text())
    assert saved["framework"] == "torch" and saved["imagenet_to_in9"] is True
    for key in ("variants", "per_class", "bg_gap"):
        assert torch_run[key] == jax_run[key], key
    ours, theirs = _records(tmp_path / "jax"), _records(tmp_path / "torch")
    assert len(ours) == 18 * len(VARIANTS) and ours.keys() == theirs.keys()
    preds = np.array([[ours[k][0], theirs[k][0]] for k in ours])
    assert len(set(preds[:, 0])) > 1  # not a constant prediction
    np.testing.assert_array_equal(preds[:, 0], preds[:, 1])
    probs = np.array([[ours[k][1], theirs[k][1]] for k in ours])
    np.testing.assert_allclose(probs[:, 0], probs[:, 1], atol=1e-5)


def test_any_timm_model_runs_in_pytorch_with_its_own_normalisation(release, tmp_path):
    """MobileNet-v3 (no bgjax family): scored in PyTorch, normalised with timm's pretrained
    config; a checkpoint of another architecture and an unknown name are refused clearly."""
    weights = tmp_path / "mnv3.safetensors"
    save_file(timm_model("mobilenetv3_small_050", num_classes=1000).state_dict(), str(weights))
    r = _score("mobilenetv3_small_050", weights, release, tmp_path / "out")
    assert r["framework"] == "torch" and r["model"] == "mobilenetv3_small_050"
    assert r["normalization"]["from"] == "timm pretrained_cfg of mobilenetv3_small_050"
    assert r["imagenet_to_in9"] is True
    assert {v: r["variants"][v]["count"] for v in VARIANTS} == dict.fromkeys(VARIANTS, 18)

    with pytest.raises(ValueError, match=r"does not match timm's mobilenetv3_small_100: .*"):
        _score("mobilenetv3_small_100", weights, release, tmp_path / "other")
    with pytest.raises(ValueError, match="neither a bgjax family nor a timm model"):
        _score("no_such_net", weights, release, tmp_path / "unknown")
