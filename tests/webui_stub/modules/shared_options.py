"""Stand-in for ``modules/shared_options.py``: the built-in settings the extension and the stand-ins read.

Only a handful of the WebUI's several hundred settings, with their real keys and defaults.
"""

from __future__ import annotations

from modules.options import OptionInfo, categories, options_section

categories.register_category("training", "Training")
categories.register_category("system", "System")

restricted_opts = {"samples_filename_pattern", "directories_filename_pattern", "outdir_samples"}


def make_templates() -> dict:
    """Returns fresh OptionInfo objects for the built-in settings (a new dict on every call)."""
    templates = {}
    templates.update(options_section(("saving-images", "Saving images/grids"), {
        "samples_format": OptionInfo("png", "File format for images"),
        "grid_format": OptionInfo("png", "File format for grids"),
        "grid_save": OptionInfo(True, "Always save all generated image grids"),
        "img_max_size_mp": OptionInfo(200, "Maximum image size"),
    }))
    templates.update(options_section(("system", "System", "system"), {
        "list_hidden_files": OptionInfo(True, "Load models/files in hidden directories"),
        "memmon_poll_rate": OptionInfo(8, "VRAM usage polls per second during generation."),
    }))
    templates.update(options_section(("training", "Training", "training"), {
        "unload_models_when_training": OptionInfo(False, "Move VAE and CLIP to RAM when training if possible."),
        "training_xattention_optimizations": OptionInfo(False, "Use cross attention optimizations while training"),
    }))
    templates.update(options_section(("sd", "Stable Diffusion"), {
        "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
        "CLIP_stop_at_last_layers": OptionInfo(1, "Clip skip"),
    }))
    templates.update(options_section(("optimizations", "Optimizations"), {
        "cross_attention_optimization": OptionInfo("Automatic", "Cross attention optimization"),
    }))
    templates.update(options_section(("ui", "Live previews"), {
        "live_previews_enable": OptionInfo(True, "Show live previews of the created image"),
        "live_previews_image_format": OptionInfo("png", "Live preview file format"),
        "show_progress_every_n_steps": OptionInfo(10, "Live preview display period"),
        "show_progress_grid": OptionInfo(True, "Show previews of all images generated in a batch as a grid"),
    }))
    templates.update(options_section(("extra_networks", "Extra Networks"), {
        "sd_lora": OptionInfo("None", "Add network to prompt"),
        "lora_show_all": OptionInfo(False, "Always show all networks on the Lora page"),
        "lora_preferred_name": OptionInfo("Alias from file", "When adding to prompt, refer to Lora by"),
        "lora_add_hashes_to_infotext": OptionInfo(True, "Add Lora hashes to infotext"),
        "lora_in_memory_limit": OptionInfo(0, "Number of Lora networks to keep cached in memory"),
        "lora_functional": OptionInfo(False, "Lora/Networks: use old method"),
        "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks"),
    }))
    templates.update(options_section(("profiler", "Profiler"), {
        "profiling_enable": OptionInfo(False, "Enable profiling"),
        "profiling_filename": OptionInfo("trace.json", "Profile filename"),
    }))
    return templates


options_templates = make_templates()
