"""Stand-in for ``modules/shared_init.py``: fills ``shared.opts``, ``shared.state`` and the ``devices`` fields."""

from __future__ import annotations

import torch


def initialize():
    """Mirrors ``modules/shared_init.py`` ``initialize``: new ``Options`` from the templates, devices and dtypes
    from ``cmd_opts`` (``--use-cpu``, ``--no-half``, ``--precision``), a new ``State``, and the interrogator."""
    from modules import devices, interrogate, options, shared, shared_options, shared_state

    cmd_opts = shared.cmd_opts
    shared.options_templates = shared_options.make_templates()
    shared.opts = options.Options(shared.options_templates, shared_options.restricted_opts)
    shared.restricted_opts = shared_options.restricted_opts

    use_cpu = cmd_opts.use_cpu or []
    devices.device = devices.cpu if any(x in use_cpu for x in ("sd", "all")) else devices.get_optimal_device()
    devices.device_interrogate = devices.device
    devices.dtype = torch.float32 if cmd_opts.no_half else torch.float16
    devices.dtype_vae = torch.float32 if cmd_opts.no_half or cmd_opts.no_half_vae else torch.float16
    devices.dtype_unet = devices.dtype
    devices.dtype_inference = torch.float32 if cmd_opts.precision == "full" else devices.dtype
    shared.device = devices.device

    shared.state = shared_state.State()
    shared.interrogator = interrogate.InterrogateModels("interrogate")
