"""lib_lora: Kohya-compatible LoRA networks, training and file I/O for Stable Diffusion models.

Usable without the AUTOMATIC1111 WebUI; never imports the WebUI's ``modules`` package. Importing this package has
no side effects (no files written, no CUDA touched).
"""

__version__ = "0.1.0"
