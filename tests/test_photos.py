"""Real photos through the real default model."""

from __future__ import annotations

import numpy as np

from conftest import encode, resized

CAT_CLASSES = {"tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"}


def test_cat_and_espresso(default_server, cat_path, coffee_path):
    _, client = default_server
    cat, coffee = client.predict_many([str(cat_path), str(coffee_path)])
    assert cat.best.label in CAT_CLASSES and cat.best.probability > 0.5
    assert coffee.best.label == "espresso" and coffee.best.probability > 0.5


def test_composite_maps_point_at_their_own_half(default_server, cat, coffee):
    """Cat on the left, cup on the right: each class's heatmap puts most of its mass on its
    own half."""
    _, client = default_server
    composite = np.concatenate([resized(cat, (300, 300)), resized(coffee, (300, 300))], axis=1)
    prediction = client.predict(composite, top_k=20)
    cat_class = next(c for c in prediction.top if c.label in CAT_CLASSES)
    left = {}
    for target in (cat_class.index, "espresso"):
        heat = client.explain(composite, target=target).heatmap
        assert heat.shape == (300, 600)
        left[target] = heat[:, :300].sum() / heat.sum()
    assert left[cat_class.index] > 0.7, left
    assert left["espresso"] < 0.4, left


def test_a_large_jpeg_gets_the_same_answer_whatever_is_asked(default_server, cat):
    """The model's input does not depend on the outputs asked for: a JPEG large enough for
    libjpeg's reduced-scale decode gets identical scores from Predict, Explain with raw maps,
    Explain with an overlay and a stream frame, and the same raw map from both Explains."""
    from PIL import Image

    _, client = default_server
    big = np.asarray(Image.fromarray(cat).resize((2400, 1800), Image.LANCZOS))
    jpeg = encode(big, quality=92)
    predicted = client.predict(jpeg, top_k=10).top
    raw = client.explain(jpeg, top_k=10, outputs=("raw",))
    overlaid = client.explain(jpeg, top_k=10, outputs=("raw", "overlay_jpeg"))
    assert overlaid.overlay_image and overlaid.rendered_size == (1800, 2400)
    streamed = next(iter(client.stream_predict([jpeg], top_k=10))).result.top
    for answer in (raw.prediction.top, overlaid.prediction.top, streamed):
        assert [(c.index, c.probability) for c in answer] == [
            (c.index, c.probability) for c in predicted]
    np.testing.assert_array_equal(raw.raw, overlaid.raw)
