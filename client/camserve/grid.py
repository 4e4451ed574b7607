"""A comparison grid: one tile per (method, class), each the heatmap over the image."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from . import maps
from .results import Comparison, Explanation

TILE_HEIGHT = 224
HEADER = 22


def comparison_grid(explanation: Explanation, image: np.ndarray) -> np.ndarray:
    """uint8 RGB: methods down, classes across, a labelled overlay tile for each (combined
    over layers when several were explained)."""
    methods = list(dict.fromkeys(m.method for m in explanation.maps))
    classes = list(dict.fromkeys((m.target.index, m.target.label) for m in explanation.maps))
    height, width = image.shape[:2]
    tile_w = max(1, round(width * TILE_HEIGHT / height))
    small = np.asarray(Image.fromarray(image).resize((tile_w, TILE_HEIGHT), Image.BILINEAR))
    sheet = Image.new("RGB", (HEADER * 6 + tile_w * len(classes),
                              HEADER + (TILE_HEIGHT + HEADER) * len(methods)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, (_, label) in enumerate(classes):
        draw.text((HEADER * 6 + col * tile_w + 4, 4), _fit(label, tile_w), fill="black")
    for row, method in enumerate(methods):
        top = HEADER + row * (TILE_HEIGHT + HEADER)
        draw.text((4, top + TILE_HEIGHT // 2), method, fill="black")
        for col, (index, _) in enumerate(classes):
            heat = explanation.combined_heatmap(method, index)
            heat = maps.resize_bilinear(heat, (TILE_HEIGHT, tile_w))
            tile = maps.overlay(small, np.clip(heat, 0, 1))
            sheet.paste(Image.fromarray(tile), (HEADER * 6 + col * tile_w, top))
    return np.asarray(sheet)


def _fit(text: str, width: int) -> str:
    limit = max(4, width // 7)
    return text if len(text) <= limit else text[: limit - 1] + "…"



def models_grid(comparison: Comparison, names: Sequence[str], image: np.ndarray) -> np.ndarray:
    """uint8 RGB: one comparison_grid per model, stacked, each under its name and, after the
    first, its maps' Spearman correlation with the first model's."""
    sheets = []
    for i, (name, explanation) in enumerate(zip(names, comparison.explanations)):
        grid = comparison_grid(explanation, image)
        similar = ", ".join(f"{s.method} {s.spearman:.2f}" for s in comparison.similarities
                            if s.first == 0 and s.second == i)
        title = Image.new("RGB", (grid.shape[1], HEADER), "white")
        ImageDraw.Draw(title).text((4, 4), _fit(name + (f" (Spearman vs {names[0]}: "
                                                        f"{similar})" if similar else ""),
                                                grid.shape[1]), fill="black")
        sheets += [np.asarray(title), grid]
    width = max(s.shape[1] for s in sheets)
    return np.concatenate([np.pad(s, ((0, 0), (0, width - s.shape[1]), (0, 0)),
                                  constant_values=255) for s in sheets])
