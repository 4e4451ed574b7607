"""CompareExplain's figures: how alike several models' maps of the same images are.

For each image and each pair of models, every map of the first model is paired with the second
model's map of the same method and class (and layer, where both serve one of that name), and the
pair's similarity is Spearman's rank correlation of the raw maps (``camserve.maps.spearman``),
the coarser grid resized to the finer one: a rank statistic, so that two versions whose maps
differ only in scale compare as equal.
"""

from __future__ import annotations

from itertools import combinations
from typing import List, Sequence

from camserve import maps
from camserve.methods import method_value
from camserve.v1 import camserve_pb2 as pb

from ..batching.tickets import Outcome


def similarities(results: Sequence[Sequence[Outcome]]) -> List[pb.ImageSimilarities]:
    """``results[m][i]``: model m's outcome for image i. One entry per image."""
    answer = []
    for i in range(len(results[0])):
        image = pb.ImageSimilarities()
        for a, b in combinations(range(len(results)), 2):
            theirs = results[b][i].result.maps
            for mine in results[a][i].result.maps:
                same = [m for m in theirs if m.method == mine.method and m.target == mine.target]
                match = next((m for m in same if m.layer == mine.layer), same[0] if same else None)
                if match is not None:
                    image.pairs.add(first=a, second=b, method=method_value(mine.method),
                                    target=mine.target,
                                    spearman=maps.spearman(mine.raw, match.raw))
        answer.append(image)
    return answer
