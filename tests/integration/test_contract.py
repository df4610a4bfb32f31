"""The public node contract (README, "Nodes"): ids, display names, input names, output types."""

from __future__ import annotations

from helpers import combo_options

QUANT = ["fp8_format", "scaling", "protect_preset", "compute"]
CONTRACT = {
    "SD35FP8CheckpointLoader": ("Load SD3.5 Checkpoint (FP8)", ["ckpt_name", *QUANT, "text_encoder_fp8"],
                                ["protect_patterns", "memory_budget"], ("MODEL", "CLIP", "VAE", "STRING")),
    "SD35FP8DiffusionModelLoader": ("Load SD3.5 Diffusion Model (FP8)", ["model_name", *QUANT],
                                    ["protect_patterns", "memory_budget"], ("MODEL", "STRING")),
    "SD35FP8QuantizeModel": ("Quantize Model to FP8", ["model", *QUANT], ["protect_patterns", "memory_budget"],
                             ("MODEL", "STRING")),
    "SD35FP8QuantizeCLIP": ("Quantize Text Encoders to FP8", ["clip", "encoders", "fp8_format", "scaling"], [],
                            ("CLIP", "STRING")),
    "SD35FP8Sampler": ("SD3.5 Sampler", ["model", "positive", "negative", "latent_image", "seed", "preset", "steps",
                                         "cfg", "sampler_name", "scheduler", "shift", "denoise"],
                       ["skip_layers", "skip_scale", "skip_start", "skip_end"], ("LATENT", "STRING")),
    "SD35FP8HardwareInfo": ("FP8 Hardware Capability", [], ["device"], ("STRING", "BOOLEAN", "STRING", "INT")),
    "SD35FP8CompareImages": ("Compare Images (SSIM/PSNR)", ["image_a", "image_b"], [],
                             ("FLOAT", "FLOAT", "IMAGE", "STRING")),
    "SD35FP8SaveModel": ("Save FP8 Model", ["model", "filename_prefix"], ["layout"], ()),
}
LOADERS = ("SD35FP8CheckpointLoader", "SD35FP8DiffusionModelLoader")  # compute: also comfyui_native
CHOICES = {
    "fp8_format": ["float8_e4m3fn", "float8_e5m2"],
    "scaling": ["per_channel", "per_tensor"],
    "protect_preset": ["auto", "sd35_large", "sd35_medium", "sd35_large_turbo", "none"],
    "compute": ["auto", "fp8_matmul", "weight_only"],
    "text_encoder_fp8": ["t5xxl_only", "none", "all"],
    "encoders": ["t5xxl", "t5xxl_and_clip_g", "all"],
    "preset": ["custom", "sd35_large", "sd35_medium", "sd35_large_turbo"],
    "layout": ["auto", "stock_compatible"],
}


def test_every_contract_node_matches(comfy_nodes):
    import nodes

    for node_id, (title, required, optional, outputs) in CONTRACT.items():
        cls = comfy_nodes[node_id]
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id] == title
        spec = cls.INPUT_TYPES()
        assert list(spec.get("required", {})) == required, node_id
        assert list(spec.get("optional", {})) == optional, node_id
        assert tuple(cls.RETURN_TYPES) == outputs, node_id
        assert cls.CATEGORY.startswith("SD3.5 FP8/"), node_id
        assert len(cls.DESCRIPTION) > 40, node_id
        for group in ("required", "optional"):
            for name, definition in spec.get(group, {}).items():
                assert definition[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
                if name in CHOICES:
                    expected = CHOICES[name] + (["disabled"] if node_id == "SD35FP8CheckpointLoader"
                                                and name == "fp8_format" else []) \
                        + (["comfyui_native"] if node_id in LOADERS and name == "compute" else [])
                    assert combo_options(definition) == expected, f"{node_id}.{name}"
    assert comfy_nodes["SD35FP8SaveModel"].OUTPUT_NODE is True


def test_nodes_are_v3_and_the_hardware_device_is_a_list_of_devices_present(comfy_nodes):
    import torch
    from comfy_api.latest import io

    assert all(issubclass(comfy_nodes[node_id], io.ComfyNode) for node_id in CONTRACT)
    device = comfy_nodes["SD35FP8HardwareInfo"].INPUT_TYPES()["optional"]["device"]
    expected = ["auto", "cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    assert combo_options(device)[: len(expected)] == expected and device[1]["default"] == "auto"

