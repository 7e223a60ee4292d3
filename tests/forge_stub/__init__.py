"""A stand-in for lllyasviel's Forge (stable-diffusion-webui-forge, main of 2025-06-26, "f2.0.1v1.10.1").

Forge is a fork of the WebUI v1.10.1: the stand-in's `modules` package is the WebUI stand-in's (tests/webui_stub)
with Forge's own modules in front of it (sd_models, processing), plus Forge's `modules_forge.main_entry` (the
checkpoint and "VAE / Text Encoder" selection) and a `backend` that builds its loaded model the way Forge's does
(`forge_objects` of unet / clip / vae patchers over modules with Forge's keys), re-implemented from its source.
Where it departs from Forge it says so: it recognises the tiny test models (Forge's huggingface_guess knows only
full-size ones), and its LoRA merge knows only the "diff" patch format.
"""
