"""Stand-in for ``modules/deepbooru.py``: the DeepDanbooru tagger (``deepbooru.model``), with fixed tags."""

from __future__ import annotations

#: what ``model.tag`` returns for any image.
FIXED_TAGS = "1girl, solo, smile"


class DeepDanbooru:
    """Mirrors ``modules/deepbooru.py`` ``DeepDanbooru``: ``start()``/``stop()`` load and unload the model,
    ``tag(pil_image) -> str`` is comma-separated tags (here always :data:`FIXED_TAGS`)."""

    def __init__(self):
        self.model = None
        self.calls = 0

    def load(self):
        self.model = object()

    def start(self):
        self.load()

    def stop(self):
        self.model = None

    def tag(self, pil_image):
        self.start()
        try:
            return self.tag_multi(pil_image)
        finally:
            self.stop()

    def tag_multi(self, pil_image, force_disable_ranks=False):
        self.calls += 1
        return FIXED_TAGS


model = DeepDanbooru()
