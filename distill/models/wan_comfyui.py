"""A ComfyUI workflow (API format) that samples an exported text-to-video Wan student
with core nodes only, written from the run's own numbers.

The student's sigmas go in by hand (`ManualSigmas`), the `lcm` sampler is DMD's step
(predict x0, re-noise with fresh noise to the next sigma, x0 at the last), `euler` a
deterministic student's (the flow ODE's step), guidance 1.
The network is the `--single-file` export (original Wan keys) placed in ComfyUI's
models/diffusion_models/; the text encoder and VAE are the usual repackaged Wan files.
"""

from typing import Dict, List

TEXT_ENCODER_FILE = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
VAE_FILES = {16: "wan_2.1_vae.safetensors", 48: "wan2.2_vae.safetensors"}  # by latent channels


def workflow(sigmas: List[float], latent_shape: List[int], network_file: str, fps: int = 16,
             prompt: str = "a corgi running on a beach", deterministic: bool = False) -> Dict:
    """Node id -> {class_type, inputs}; a link is [node id, output index]."""
    channels, frames, height, width = latent_shape
    spatial = 16 if channels == 48 else 8  # the Wan2.2 VAE compresses 16x16, Wan2.1's 8x8
    listed = ", ".join(f"{s:.6g}" for s in [*sigmas, 0.0])
    nodes = {
        "1": ("UNETLoader", {"unet_name": network_file, "weight_dtype": "default"}),
        "2": ("CLIPLoader", {"clip_name": TEXT_ENCODER_FILE, "type": "wan"}),
        "3": ("VAELoader", {"vae_name": VAE_FILES.get(channels, VAE_FILES[16])}),
        "4": ("CLIPTextEncode", {"text": prompt, "clip": ["2", 0]}),
        "5": ("CLIPTextEncode", {"text": "", "clip": ["2", 0]}),
        "6": ("EmptyHunyuanLatentVideo", {"width": width * spatial, "height": height * spatial,
                                          "length": (frames - 1) * 4 + 1, "batch_size": 1}),
        "7": ("ManualSigmas", {"sigmas": listed}),
        "8": ("KSamplerSelect", {"sampler_name": "euler" if deterministic else "lcm"}),
        "9": ("RandomNoise", {"noise_seed": 0}),
        "10": ("CFGGuider", {"model": ["1", 0], "positive": ["4", 0], "negative": ["5", 0], "cfg": 1.0}),
        "11": ("SamplerCustomAdvanced", {"noise": ["9", 0], "guider": ["10", 0], "sampler": ["8", 0],
                                         "sigmas": ["7", 0], "latent_image": ["6", 0]}),
        "12": ("VAEDecode", {"samples": ["11", 0], "vae": ["3", 0]}),
        "13": ("SaveAnimatedWEBP", {"images": ["12", 0], "filename_prefix": "student", "fps": float(fps),
                                    "lossless": False, "quality": 90, "method": "default"}),
    }
    return {k: {"class_type": cls, "inputs": inputs} for k, (cls, inputs) in nodes.items()}


