"""Stand-in for ``extensions-builtin/Lora/networks.py`` (importable as the top-level module ``networks``, as in
the WebUI): the list of LoRA files, the loaded networks and the weight backups of merged LoRAs.

The stand-in never merges anything itself; tests simulate a merged LoRA with :func:`merge_for_test`, which writes
the same bookkeeping attributes the real ``network_apply_weights`` writes (``network_weights_backup``,
``network_bias_backup``, ``network_current_names``) and changes the weight in place.
"""

from __future__ import annotations

import os

import network
import torch
from modules import devices, errors, shared

available_networks = {}
available_network_aliases = {}
loaded_networks = []
loaded_bundle_embeddings = {}
networks_in_memory = {}
available_network_hash_lookup = {}
forbidden_network_aliases = {}

#: how many times list_available_networks() ran (tests read it; not in the real module).
list_calls = 0


def store_weights_backup(weight):
    """Mirrors ``networks.store_weights_backup``: a CPU copy (None stays None)."""
    if weight is None:
        return None
    return weight.to(devices.cpu, copy=True)


def restore_weights_backup(obj, field, weight):
    """Mirrors ``networks.restore_weights_backup``: copies ``weight`` back in place (None clears the field)."""
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self):
    """Mirrors ``networks.network_restore_weights_from_backup(module)``: puts back the weight (and bias) saved
    before a LoRA was merged; MultiheadAttention keeps (in_proj_weight, out_proj.weight). No backup = no-op.
    Like the real one it does not clear the backup or ``network_current_names``, and it runs no ``no_grad`` of
    its own (``copy_`` into a parameter that requires grad raises unless the caller turned grad off)."""
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if weights_backup is not None:
        if isinstance(self, torch.nn.MultiheadAttention):
            restore_weights_backup(self, 'in_proj_weight', weights_backup[0])
            restore_weights_backup(self.out_proj, 'weight', weights_backup[1])
        else:
            restore_weights_backup(self, 'weight', weights_backup)
    if isinstance(self, torch.nn.MultiheadAttention):
        restore_weights_backup(self.out_proj, 'bias', bias_backup)
    else:
        restore_weights_backup(self, 'bias', bias_backup)


def network_reset_cached_weight(self):
    """Mirrors ``networks.network_reset_cached_weight``: forgets the merged names and the backups."""
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


class _LoadedNetwork:
    """The fields of the real ``network.Network`` that ``network_apply_weights`` compares (name, multipliers, dyn)."""

    def __init__(self, name, te_multiplier=1.0, unet_multiplier=1.0, dyn_dim=None, delta_scale=0.01):
        self.name, self.te_multiplier, self.unet_multiplier = name, te_multiplier, unet_multiplier
        self.dyn_dim = dyn_dim
        self.delta_scale = delta_scale


def _delta(module, scale):
    pattern = torch.linspace(-1, 1, module.weight.numel(), dtype=torch.float32).reshape(module.weight.shape)
    return (pattern * scale).to(module.weight.dtype)


def network_apply_weights(self):
    """Mirrors ``networks.network_apply_weights(self)``, which the real extension's class-level patches of
    ``Linear.forward`` etc. call on every forward: when the names of ``loaded_networks`` differ from
    ``network_current_names``, back up the weights (once), restore them, add every loaded network's delta (here a
    fixed pattern, see :func:`merge_for_test`) and record the new names."""
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    current_names = getattr(self, "network_current_names", ())
    if current_names == wanted_names:
        return
    if getattr(self, "network_weights_backup", None) is None and wanted_names != ():
        self.network_weights_backup = store_weights_backup(self.weight)
        self.network_bias_backup = store_weights_backup(getattr(self, "bias", None))
    if current_names != ():
        network_restore_weights_from_backup(self)
    for net in loaded_networks:
        with torch.no_grad():
            self.weight.add_(_delta(self, net.delta_scale))
    self.network_current_names = wanted_names


def merge_for_test(module, delta_scale=0.01, names=(("test_lora", 1.0, 1.0, None),)):
    """Not in the real module (tests only): what a generation with ``<lora:test_lora:1>`` leaves behind on
    ``module`` (Linear/Conv2d): ``loaded_networks`` holds the network, and the module's forward runs
    :func:`network_apply_weights` first (a forward pre-hook standing in for the real class-level patch), which
    backs up weight and bias, adds a deterministic delta (``delta_scale`` x a fixed pattern) in place and records
    the names. So a later forward re-merges the LoRA unless ``loaded_networks`` was cleared, as in the WebUI."""
    loaded_networks[:] = [_LoadedNetwork(*n, delta_scale=delta_scale) for n in names]
    if not getattr(module, "_stub_lora_hook", False):
        module.register_forward_pre_hook(lambda m, args: network_apply_weights(m))
        module._stub_lora_hook = True
    with torch.no_grad():
        network_apply_weights(module)


def process_network_files(names: list[str] | None = None):
    """Mirrors ``networks.process_network_files``: scans ``--lora-dir`` and ``--lyco-dir-backcompat`` for
    .pt/.ckpt/.safetensors (``shared.walk_files``), name = file stem (the last duplicate wins)."""
    candidates = list(shared.walk_files(shared.cmd_opts.lora_dir, allowed_extensions=[".pt", ".ckpt", ".safetensors"]))
    candidates += list(shared.walk_files(shared.cmd_opts.lyco_dir_backcompat,
                                         allowed_extensions=[".pt", ".ckpt", ".safetensors"]))
    for filename in candidates:
        if os.path.isdir(filename):
            continue
        name = os.path.splitext(os.path.basename(filename))[0]
        if names and name not in names:
            continue
        try:
            entry = network.NetworkOnDisk(name, filename)
        except OSError:
            errors.report(f"Failed to load network {name} from {filename}", exc_info=True)
            continue
        available_networks[name] = entry
        if entry.alias in available_network_aliases:
            forbidden_network_aliases[entry.alias.lower()] = 1
        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


def update_available_networks_by_names(names: list[str]):
    """Mirrors ``networks.update_available_networks_by_names``."""
    process_network_files(names)


def list_available_networks():
    """Mirrors ``networks.list_available_networks``: clears the maps, creates ``--lora-dir`` and re-scans."""
    global list_calls
    list_calls += 1
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    process_network_files()
