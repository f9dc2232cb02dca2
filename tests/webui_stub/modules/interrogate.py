"""Stand-in for ``modules/interrogate.py``: the CLIP/BLIP interrogator (``shared.interrogator``)."""

from __future__ import annotations

#: what ``InterrogateModels.interrogate`` returns for any image.
FIXED_CAPTION = "a photo of a dog sitting on grass"


class InterrogateModels:
    """Mirrors ``modules/interrogate.py`` ``InterrogateModels``: ``interrogate(pil_image) -> str`` is a BLIP
    caption plus CLIP terms (here always :data:`FIXED_CAPTION`)."""

    def __init__(self, content_dir=None):
        self.content_dir = content_dir
        self.calls = 0

    def load(self):
        pass

    def unload(self):
        pass

    def interrogate(self, pil_image):
        self.calls += 1
        return FIXED_CAPTION
