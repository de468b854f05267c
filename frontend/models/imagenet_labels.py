"""ImageNet-1k class names (index order of the standard 1000-class models).

The list is the one pytorch/hub publishes (from the Keras class index); it ships in this
package because nothing installed here carries one."""

from __future__ import annotations

import functools
from importlib import resources


@functools.lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text()
    labels = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(labels) == 1000, "imagenet_classes.txt must hold 1000 names"
    return labels
