"""Embedding models (--output-activation embedding): Predict answers the output vector, Explain
the cosine similarity of an image's output to a concept (TARGET_KIND_SIMILARITY, pytorch-grad-
cam's tutorial's SimilarityToConceptTarget), given as a vector or as another image of the
request."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import references as ref
from conftest import resized, running

LAYER = "layer4"


class SimilarityToConceptTarget:
    """pytorch-grad-cam's target for embeddings, as its tutorial "Pixel attribution for
    embeddings" defines it (the package does not ship it): the cosine similarity of one
    image's output to the concept's features."""

    def __init__(self, features: torch.Tensor) -> None:
        self.features = features

    def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
        return torch.nn.CosineSimilarity(dim=0)(model_output, self.features)


def embedder() -> torch.nn.Module:
    """A seeded resnet18 without its head (served as python:test_embeddings:embedder): its
    output is a 512-value embedding."""
    import torchvision

    torch.manual_seed(7)
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    return model.eval()


@pytest.fixture(scope="module")
def served():
    with running(model="python:test_embeddings:embedder", output_activation="embedding",
                 max_delay_ms=20, layers=(LAYER,)) as pair:
        yield pair


@pytest.fixture(scope="module")
def images(cat, coffee):
    return [resized(cat, (224, 224)), resized(coffee, (224, 224))]


def _inputs(client, images) -> torch.Tensor:
    info = client.model_info()
    return ref.normalise(np.stack(images), info.mean, info.std)


def test_predict_answers_the_embedding(served, images):
    _, client = served
    info = client.model_info()
    assert info.output_activation == "embedding"
    with torch.no_grad():
        expected = embedder()(_inputs(client, images)).numpy()
    for prediction, want in zip(client.predict_many(images), expected):
        assert prediction.top == () and prediction.embedding.shape == (512,)
        np.testing.assert_allclose(prediction.embedding, want, rtol=0,
                                   atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("method, theirs", [("gradcam", "GradCAM"), ("layercam", "LayerCAM"),
                                            ("hirescam", "HiResCAM")])
def test_similarity_equals_pytorch_grad_cams_similarity_to_concept(served, images, method,
                                                                   theirs):
    pytest.importorskip("pytorch_grad_cam")
    _, client = served
    coffee = client.predict(images[1]).embedding
    explained = client.explain(images[0], method=method, similar_to=coffee, signed=True)
    m = explained.map()
    assert m.target_kind == "similarity" and m.target.label == "similarity"
    model = embedder()
    x = _inputs(client, images[:1])
    with torch.no_grad():
        output = model(x)[0].numpy()
    cosine = output @ coffee / (np.linalg.norm(output) * np.linalg.norm(coffee))
    assert m.similarity == pytest.approx(float(cosine), abs=1e-4)
    want = ref.pytorch_grad_cam_called(
        theirs, model, LAYER, x, [SimilarityToConceptTarget(torch.from_numpy(coffee))])[0]
    np.testing.assert_allclose(m.raw, want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_another_image_of_the_request_as_the_concept(served, images):
    """similar_to_image=2 is the second image's embedding; each image's map is the same
    alone as in a batch."""
    _, client = served
    coffee = client.predict(images[1]).embedding
    by_image = client.explain_many(images, similar_to_image=2)
    by_vector = client.explain_many(images, similar_to=coffee)
    alone = [client.explain(image, similar_to=coffee) for image in images]
    for a, b, c in zip(by_image, by_vector, alone):
        np.testing.assert_allclose(a.map().raw, b.map().raw, rtol=0, atol=1e-5)
        np.testing.assert_allclose(b.map().raw, c.map().raw, rtol=0, atol=1e-5)
        assert a.map().similarity == pytest.approx(b.map().similarity, abs=1e-5)
    assert by_image[1].map().similarity == pytest.approx(1.0, abs=1e-5)  # itself


@pytest.mark.parametrize("options, reason, says", [
    ({}, "NO_CONCEPT", "similar_to"),
    ({"target_kind": "logit"}, "NO_CONCEPT", "TARGET_KIND_LOGIT"),
    ({"similar_to": [1.0, 2.0]}, "CONCEPT_LENGTH", "has 2 values"),
    ({"similar_to": [0.0] * 512}, "CONCEPT_LENGTH", "not all zero"),
    ({"similar_to_image": 3}, "INVALID_OPTION", "the request has 1 images"),
    ({"similar_to": [1.0] * 512, "similar_to_image": 1}, "INVALID_OPTION", "not both"),
    ({"similar_to": [1.0] * 512, "faithfulness_steps": 4}, "NOT_APPLICABLE",
     "faithfulness_steps"),
    ({"similar_to": [1.0] * 512, "target": 3}, "NOT_APPLICABLE", "one score"),
    ({"similar_to": [1.0] * 512, "method": "finercam"}, "NOT_APPLICABLE", "FINER"),
])
def test_bad_similarity_requests(served, images, options, reason, says):
    from camserve import CamserveError

    _, client = served
    with pytest.raises(CamserveError) as caught:
        client.explain(images[0], **options)
    assert caught.value.code.name == "INVALID_ARGUMENT"
    assert caught.value.reason == reason and says in caught.value.details


def test_a_classifiers_outputs_as_the_embedding(tiny_server, images):
    """TARGET_KIND_SIMILARITY on a classifier: its logits are the vector; a concept for
    another kind is refused."""
    pytest.importorskip("pytorch_grad_cam")
    from camserve import CamserveError

    from tiny_models import tiny_cnn

    _, client = tiny_server
    info = client.model_info()
    concept = np.linspace(-1.0, 1.0, len(info.labels)).astype(np.float32)
    m = client.explain(images[0], similar_to=concept, signed=True).map()
    assert m.target_kind == "similarity"
    x = ref.normalise(np.stack(images[:1]), info.mean, info.std)
    want = ref.pytorch_grad_cam_called("GradCAM", tiny_cnn().eval(), info.default_layer, x,
                                       [SimilarityToConceptTarget(torch.from_numpy(concept))])
    np.testing.assert_allclose(m.raw, want[0], rtol=0, atol=1e-4 * np.abs(want).max())
    with pytest.raises(CamserveError) as caught:
        client.explain(images[0], similar_to=concept, target_kind="softmax")
    assert caught.value.reason == "NOT_APPLICABLE"
    assert client.predict(images[0]).embedding is None


def test_the_cli_explains_the_similarity_to_an_image(served, cat_path, coffee_path, tmp_path,
                                                     capsys):
    from camserve import cli

    server, _ = served
    target = f"127.0.0.1:{server.port}"
    assert cli.main(["--target", target, "predict", str(coffee_path)]) == 0
    assert "embedding of 512 values" in capsys.readouterr().out
    assert cli.main(["--target", target, "explain", str(cat_path), "-o", str(tmp_path),
                     "--similar-to", str(coffee_path)]) == 0
    assert "explained the similarity (" in capsys.readouterr().out
    np.save(tmp_path / "concept.npy", np.ones(512, np.float32))
    assert cli.main(["--target", target, "explain", str(cat_path), "-o", str(tmp_path),
                     "--similar-to", str(tmp_path / "concept.npy")]) == 0
