"""LTX-2 through diffusers' LTX2VideoTransformer3DModel: a joint audio-video model.

Every forward denoises a video latent [C, T, H, W] and an audio latent [Ca, L, M]
(latent frames x mel bins) together, each attending to the other. Outside this
file a sample is one tensor: both latents flattened and laid side by side,
[C*T*H*W + Ca*L*M] (`sample_shape`), in model space (each VAE's normalisation
applied, as LTX2Pipeline samples). The methods' losses see the two as streams
(`streams`): each has its own mean and DMD normaliser, and the audio's terms
carry model.audio_weight. Both streams share the sigma schedule, as the pipeline
steps its two schedulers together.

The text input is the two outputs of the pipeline's text connectors side by side
on the feature axis, [L, 2 * caption_channels]: the video's, then the audio's; a
token is real where the zero padding is not (the mask).

Image-to-video (model.image_condition=first_frame) is LTX2ImageToVideoPipeline's:
the video's first latent frame is the image's clean latent, its tokens run at
timestep 0 while the other frames and the audio run at the sample's, and the
first frame's velocity takes it onto the image (distill/models/image_condition.py).
Preprocessing and prompt encoding: ltx2_encoders.py.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from distill.models import image_condition
from distill.models.diffusers_network import DiffusersNetworkAdapter
from distill.models.flow_matching import DynamicShiftConfig, Sound, StockPipeline, dynamic_shift_errors
from distill.registry import register_family

# the video and audio attention and feed-forward projections of every block (peft's names)
LTX2_LORA_TARGETS = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "audio_attn1.to_q", "audio_attn1.to_k", "audio_attn1.to_v",
                     "audio_attn1.to_out.0", "audio_attn2.to_q", "audio_attn2.to_k", "audio_attn2.to_v",
                     "audio_attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "audio_ff.net.0.proj", "audio_ff.net.2"]

# Lightricks/LTX-2's transformer/config.json as diffusers' LTX2VideoTransformer3DModel
# defaults give it (LTX-2.0: 48 blocks, video 32 heads x 128, audio 32 x 64, Gemma-3
# captions 3,840 wide), so that a memory plan can be made where the weights are not
PUBLIC_ARCHITECTURES = {"Lightricks/LTX-2": {}}

@dataclass
class LTX2Config(DynamicShiftConfig):
    family: str = "ltx2"
    # video latent: 121 frames at 512x768 (the pipeline's defaults) through the 32x spatial,
    # 8x temporal VAE: [128, (121 - 1) / 8 + 1, 512 / 32, 768 / 32]
    latent_shape: List[int] = field(default_factory=lambda: [128, 16, 16, 24])
    # audio latent [Ca, L, M]: 121 / 24 s at 16 kHz, hop 160, 4x in time -> 25 latent frames
    # a second, 126 of them; 64 mel bins / 4 = 16; 8 channels
    audio_shape: List[int] = field(default_factory=lambda: [8, 126, 16])
    text_len: int = 1024  # the pipeline's max_sequence_length
    text_dim: int = 7680  # the connectors' video and audio embeddings side by side: 2 x caption_channels 3,840
    vae: str = "ltx2"  # ltx2: AutoencoderKLLTX2Video from <model.path>/vae; identity: the latents as they are
    # family: Gemma-3 and the text connectors from <model.path> (ltx2_encoders.py); hash: the built-in one
    text_encoder: str = "family"
    fps: float = 24.0  # the frame rate the video RoPE's time coordinates use (the pipeline's frame_rate)
    audio_weight: float = 1.0  # the audio stream's weight in every loss (the video's is 1)
    # CFG of the audio stream (the pipeline's audio_guidance_scale, 7.0 by default); null:
    # the method's guidance_scale, which the video uses
    audio_guidance_scale: Optional[float] = None
    # The guidances LTX2Pipeline adds to CFG, in every guided prediction (the teacher's real
    # score, guided sampling), per stream (audio_*: null takes the video's): STG, the
    # prediction with the self-attention of `stg_blocks` skipped (a forward more); modality
    # isolation, the prediction with the cross-modal attention off (a forward more); and the
    # rescale of the guided x0 toward the conditional one's std. All off by default; the
    # pipeline's call uses stg 1 (block 29 for LTX-2.0, 28 for 2.3), modality 3, rescale 0.7.
    stg_scale: float = 0.0
    audio_stg_scale: Optional[float] = None
    stg_blocks: List[int] = field(default_factory=lambda: [29])
    modality_scale: float = 1.0
    audio_modality_scale: Optional[float] = None
    guidance_rescale: float = 0.0
    audio_guidance_rescale: Optional[float] = None
    # none: text-to-video (LTX2Pipeline); first_frame: image-to-video as LTX2ImageToVideoPipeline
    # does it: the first latent frame is the clean image latent, its tokens at timestep 0, the
    # audio and the other frames at the sample's (distill/models/image_condition.py)
    image_condition: str = "none"
    # the cross-modal attention's modulation reads the other stream's sigma (true: LTX-2.3 and
    # later) or its own stream's timesteps (false: LTX-2.0); only image-to-video tells them apart
    cross_timestep: bool = False
    # resolution-dependent shift as LTX2Pipeline samples, from the video's tokens (the
    # pipeline's defaults when the scheduler config names none)
    base_image_seq_len: int = 1024
    max_image_seq_len: int = 4096
    base_shift: float = 0.95
    max_shift: float = 2.05


@register_family
class LTX2Adapter(DiffusersNetworkAdapter):
    family = "ltx2"
    model_class_name = "LTX2VideoTransformer3DModel"
    lora_pipeline_name = "LTX2Pipeline"
    vae_class_name = "AutoencoderKLLTX2Video"
    public_architectures = PUBLIC_ARCHITECTURES
    tuple_keys = ("vae_scale_factors",)
    default_depth = 48
    # Activation memory of one audio-video block, forward + backward, per video token and
    # unit of video width, measured as live tensor bytes on the CPU by
    # benchmarks/family_activations.py (1,024 video tokens of width 512, 40 audio tokens
    # riding along): bytes by compute precision (element bytes); what stays for the
    # backward, and what a forward without gradient adds, as fractions of that peak
    block_bytes = {4: 179.8, 2: 126.9}
    stored_fraction = 0.855  # 0.841 fp32, 0.872 bf16
    no_grad_fraction = 0.27  # 0.313 fp32, 0.222 bf16
    # a checkpointed block keeps its input (one element per video token and width; the audio's
    # is small) and nothing more (measured: 0.00 bytes)
    checkpoint_extra_bytes = 0.0
    config_class = LTX2Config
    vaes = ("ltx2", "identity")
    folder_classes = ("LTX2VideoTransformer3DModel", "AutoencoderKLLTX2Video")
    sigma_grid = "inverse_steps"  # LTX2Pipeline passes linspace(1, 1/N, N) with its mu
    context_parallel_note = ("diffusers 0.42.1 declares a plan for LTX2VideoTransformer3DModel, but it splits the "
                             "4-D RoPE tables on their heads axis and the forward fails (tried on 2 ranks)")

    @staticmethod
    def video_tokens(model, patch: int = 1, patch_t: int = 1) -> int:
        _, t, h, w = model.latent_shape
        return (t // patch_t) * (h // patch) * (w // patch)

    @classmethod
    def shift_tokens(cls, model) -> int:
        return cls.video_tokens(model)

    # --- the joint sample ------------------------------------------------
    @classmethod
    def sample_shape(cls, model) -> Tuple[int, ...]:
        return (math.prod(model.latent_shape) + math.prod(model.audio_shape),)

    @staticmethod
    def video_of(model, x: torch.Tensor) -> torch.Tensor:
        """The video stream [B, C, T, H, W] of joint samples [B, N] (a view)."""
        return x[:, : math.prod(model.latent_shape)].reshape(x.shape[0], *model.latent_shape)

    def streams(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{video [B, C, T, H, W], audio [B, Ca, L, M]}: views of a joint sample [B, N]."""
        split = math.prod(self.cfg.latent_shape)
        return {"video": self.video_of(self.cfg, x), "audio": x[:, split:].reshape(x.shape[0], *self.cfg.audio_shape)}

    @classmethod
    def first_frame_of(cls, model, latents: torch.Tensor) -> torch.Tensor:
        """The video stream's first latent frame of joint samples [B, N] (or of video latents)."""
        return (cls.video_of(model, latents) if latents.dim() == 2 else latents)[:, :, :1]

    @classmethod
    def image_latent_shape(cls, model) -> Tuple[int, ...]:
        """The image's own latent [C, 1, H, W] (LTX2ImageToVideoPipeline encodes it alone)."""
        c, _, h, w = model.latent_shape
        return (c, 1, h, w)

    def join_streams(self, parts: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([parts["video"].flatten(1), parts["audio"].flatten(1)], dim=1)

    def stream_weights(self) -> Dict[str, float]:
        return {"video": 1.0, "audio": self.cfg.audio_weight}

    def guidance(self, sigma: torch.Tensor, scale: float, like: torch.Tensor):
        """`scale` on the video stream, model.audio_guidance_scale on the audio's."""
        audio = self.cfg.audio_guidance_scale
        if audio is None or audio == scale:
            return scale
        split = math.prod(self.cfg.latent_shape)
        per_element = torch.full(like.shape[1:], float(scale), dtype=like.dtype, device=like.device)
        per_element[split:] = audio
        return per_element

    def stream_guidance(self, scale: float) -> Dict[str, Tuple[float, float, float, float]]:
        """Each stream's (CFG, STG, modality, rescale) scales."""
        c = self.cfg

        def pick(audio, video):
            return video if audio is None else audio

        return {"video": (scale, c.stg_scale, c.modality_scale, c.guidance_rescale),
                "audio": (pick(c.audio_guidance_scale, scale), pick(c.audio_stg_scale, c.stg_scale),
                          pick(c.audio_modality_scale, c.modality_scale),
                          pick(c.audio_guidance_rescale, c.guidance_rescale))}

    def predict_x0_cfg(self, role, x_t: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
                       scale: float, **cond) -> torch.Tensor:
        """CFG, and where model.* asks for them the pipeline's other guidances, per stream in x0
        as LTX2Pipeline combines them: g = pos + (cfg - 1)(pos - neg) + stg (pos - skipped)
        + (modality - 1)(pos - isolated), then g <- r g std(pos) / std(g) + (1 - r) g."""
        scales = self.stream_guidance(scale)
        stg = any(s[1] > 0 for s in scales.values())
        isolate = any(s[2] != 1 for s in scales.values())
        rescale = any(s[3] > 0 for s in scales.values())
        if not (stg or isolate or rescale):
            return super().predict_x0_cfg(role, x_t, sigma, text, uncond, scale, **cond)
        pos, neg = self.predict_x0_pair(role, x_t, sigma, text, uncond, **cond)
        preds = {"pos": pos, "neg": neg}
        if stg:
            preds["stg"] = self.predict_x0(role, x_t, sigma, text, stg_blocks=list(self.cfg.stg_blocks), **cond)
        if isolate:
            preds["iso"] = self.predict_x0(role, x_t, sigma, text, isolate_modalities=True, **cond)
        parts = {name: self.streams(x) for name, x in preds.items()}
        guided = {}
        for stream, (cfg, stg_scale, modality, r) in scales.items():
            p = parts["pos"][stream]
            g = p + (cfg - 1) * (p - parts["neg"][stream])
            if stg:
                g = g + stg_scale * (p - parts["stg"][stream])
            if isolate:
                g = g + (modality - 1) * (p - parts["iso"][stream])
            if r > 0:
                dims = list(range(1, g.dim()))
                g = r * g * (p.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True)) + (1 - r) * g
            guided[stream] = g
        if image_condition.KEY in cond:  # the rescale moves every frame; the held one stays the image
            guided["video"] = image_condition.hold_first_frame(guided["video"], cond[image_condition.KEY])
        return self.join_streams(guided)

    # --- image conditioning ----------------------------------------------
    @classmethod
    def batch_condition(cls, model) -> str:
        return model.image_condition

    @classmethod
    def task(cls, model) -> str:
        return "image-to-video" if model.image_condition == "first_frame" else "text-to-video"

    def conditioning(self, batch):
        """The image's latent [B, C, 1, H, W] for image-to-video."""
        if self.cfg.image_condition == "first_frame":
            return {image_condition.KEY: batch[image_condition.KEY]}
        return {}

    def conditioning_image(self, cond):
        return cond.get(image_condition.KEY)

    def held_velocity(self, v: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor, cond) -> torch.Tensor:
        """Image-to-video: the video's first frame moves onto the image latent (its x0)."""
        if image_condition.KEY not in cond:
            return v
        parts = self.streams(v)
        parts["video"] = image_condition.first_frame_velocity(parts["video"], self.streams(x_t)["video"],
                                                              cond[image_condition.KEY], sigma)
        return self.join_streams(parts)

    # --- the network -----------------------------------------------------
    def forward(self, module: nn.Module, x_t: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                **cond) -> torch.Tensor:
        c = module.config
        dtype = module.proj_in.weight.dtype
        parts = self.streams(x_t)
        video, audio = parts["video"], parts["audio"]
        _, _, t, h, w = video.shape
        video_timestep = timestep
        stg_blocks, isolate = cond.pop("stg_blocks", None), cond.pop("isolate_modalities", False)  # guidance forwards
        first_frame = cond.pop(image_condition.KEY, None)
        if first_frame is not None:  # as LTX2ImageToVideoPipeline: the clean image, its tokens at timestep 0
            video = image_condition.hold_first_frame(video, first_frame)
            per_frame = image_condition.first_frame_timesteps(timestep, t)
            video_timestep = per_frame[:, :, None].expand(-1, -1, (h // c.patch_size) * (w // c.patch_size)).flatten(1)
        width = text.shape[-1] // 2
        video_text, audio_text = text[..., :width], text[..., width:]
        mask = video_text.ne(0).any(dim=-1).to(dtype)  # the connectors' tokens before the zero padding
        out_video, out_audio = module(
            hidden_states=pack_video(video, c.patch_size, c.patch_size_t).to(dtype),
            audio_hidden_states=pack_audio(audio).to(dtype),
            encoder_hidden_states=video_text.to(dtype),
            audio_encoder_hidden_states=audio_text.to(dtype),
            timestep=video_timestep.to(dtype),  # 1000 sigma, as LTX2Pipeline passes its scheduler's timesteps
            audio_timestep=timestep.to(dtype),
            sigma=timestep.to(dtype),
            use_cross_timestep=self.cfg.cross_timestep,
            spatio_temporal_guidance_blocks=stg_blocks,
            isolate_modalities=isolate,
            encoder_attention_mask=mask,
            audio_encoder_attention_mask=mask,
            num_frames=t // c.patch_size_t, height=h // c.patch_size, width=w // c.patch_size, fps=self.cfg.fps,
            audio_num_frames=audio.shape[2],
            return_dict=False,
        )
        return self.join_streams({
            "video": unpack_video(out_video, t, h, w, c.patch_size, c.patch_size_t),
            "audio": unpack_audio(out_audio, audio.shape[3]),
        })

    def blocks(self, module: nn.Module) -> list:
        return list(module.transformer_blocks)

    def block_tokens(self, output) -> torch.Tensor:
        """A block returns (video, audio) states: the video stream's tokens."""
        return output[0]

    # --- memory plan -----------------------------------------------------
    def tokens_per_sample(self, module: nn.Module) -> int:
        c = module.config
        return self.video_tokens(self.cfg, c.patch_size, c.patch_size_t)

    # --- LoRA ------------------------------------------------------------
    def lora_targets(self) -> List[str]:
        return list(LTX2_LORA_TARGETS)

    # --- checks ----------------------------------------------------------
    @classmethod
    def check(cls, config) -> List[str]:
        model = config.model
        errors = []
        if len(model.latent_shape) != 4:
            errors.append(f"model.latent_shape={list(model.latent_shape)}: the video latent, [C, T, H, W]")
        if len(model.audio_shape) != 3 or any(n < 1 for n in model.audio_shape):
            errors.append(f"model.audio_shape={list(model.audio_shape)}: the audio latent, [channels, frames, mel bins]")
        if model.text_dim % 2:
            errors.append(f"model.text_dim={model.text_dim}: the video and audio text embeddings side by side "
                          "(2 x caption_channels), an even width")
        if model.latents_mean is not None:
            errors.append("model.latents_mean: model.family=ltx2 keeps its joint samples in model space "
                          "(each VAE's normalisation applied when the data is written); leave it null")
        if model.chunk_frames is not None or any(role.causal for role in config.roles.values()):
            errors.append("model.family=ltx2 has no block-causal variant (roles.<r>.causal, model.chunk_frames)")
        if model.audio_weight < 0:
            errors.append(f"model.audio_weight={model.audio_weight}: must be >= 0")
        scales = [model.stg_scale, model.audio_stg_scale, model.guidance_rescale, model.audio_guidance_rescale]
        if any(v is not None and v < 0 for v in scales):
            errors.append("model.stg_scale, audio_stg_scale, guidance_rescale, audio_guidance_rescale: must be >= 0")
        if model.image_condition not in ("none", "first_frame"):
            errors.append(f"model.image_condition={model.image_condition}: model.family=ltx2 conditions on an image "
                          "as LTX2ImageToVideoPipeline does (first_frame), or not at all (none)")
        elif model.image_condition == "first_frame" and model.latent_shape[1] < 2:
            errors.append(f"model.image_condition=first_frame with model.latent_shape={list(model.latent_shape)}: "
                          "the image is the first latent frame, so the video needs at least 2")
        errors += dynamic_shift_errors(model)
        if errors:
            return errors
        for name in config.roles:
            arch, source, error = cls.role_architecture(config, name)
            errors += [error] if error else cls.check_arch(arch, model, source)
        return list(dict.fromkeys(errors))

    @classmethod
    def check_arch(cls, arch: dict, model, key: str) -> List[str]:
        errors = []
        channels, patch, patch_t = model.latent_shape[0], arch.get("patch_size", 1), arch.get("patch_size_t", 1)
        if arch.get("in_channels", 128) != channels * patch * patch * patch_t:
            errors.append(f"in_channels={arch.get('in_channels', 128)} of {key} does not fit model.latent_shape[0]="
                          f"{channels} (patch {patch}x{patch}x{patch_t})")
        audio = model.audio_shape[0] * model.audio_shape[2]
        if arch.get("audio_in_channels", 128) != audio:
            errors.append(f"audio_in_channels={arch.get('audio_in_channels', 128)} of {key} does not fit "
                          f"model.audio_shape={list(model.audio_shape)} (channels x mel bins = {audio})")
        if 2 * arch.get("caption_channels", 3840) != model.text_dim:
            errors.append(f"model.text_dim={model.text_dim} does not match caption_channels="
                          f"{arch.get('caption_channels', 3840)} of {key} (the video's and the audio's side by side)")
        depth = arch.get("num_layers", 48)
        if (model.stg_scale > 0 or (model.audio_stg_scale or 0) > 0) and any(
                not 0 <= b < depth for b in model.stg_blocks):
            errors.append(f"model.stg_blocks={list(model.stg_blocks)}: {key} has blocks 0-{depth - 1}")
        _, t, h, w = model.latent_shape
        if t % patch_t or h % patch or w % patch:
            errors.append(f"model.latent_shape={list(model.latent_shape)} does not divide into the patches of {key}")
        return errors

    # --- encoders, decoding, export --------------------------------------
    def encoders(self, folder: Path, text_only: bool, max_text_len: int, device: torch.device, image: bool = False):
        from distill.models.ltx2_encoders import LTX2Encoders

        return LTX2Encoders(Path(folder), text_only, max_text_len, device)

    def text_encoder(self, device: torch.device):
        from distill.models.ltx2_encoders import LTX2Encoders

        return LTX2Encoders(self.part_folder("text_encoder"), text_only=True, max_text_len=self.cfg.text_len,
                            device=device)

    def stock_pipeline(self) -> Optional[StockPipeline]:
        """LTX2Pipeline (LTX2ImageToVideoPipeline for first_frame): it passes linspace(1, 1/N, N)
        with its mu to the scheduler. A guidance-free student samples with every guidance of
        the pipeline off, for both streams: by default the audio's CFG is 7, and STG and
        modality isolation (a forward each) are on."""
        if self.cfg.vae != "ltx2" or self.cfg.text_encoder != "family":
            return None
        image = self.cfg.image_condition == "first_frame"
        return StockPipeline(
            class_name="LTX2ImageToVideoPipeline" if image else "LTX2Pipeline", transformers=(self.cfg.subfolder,),
            parts=("tokenizer", "text_encoder", "connectors", "vae", "audio_vae", "vocoder"),
            few_step_kwargs={"audio_guidance_scale": 1.0, "stg_scale": 0.0, "audio_stg_scale": 0.0,
                             "modality_scale": 1.0, "audio_modality_scale": 1.0, "guidance_rescale": 0.0,
                             "audio_guidance_rescale": 0.0, "use_cross_timestep": self.cfg.cross_timestep,
                             "frame_rate": self.cfg.fps},
            output="video, audio = pipe({call}" + (", image=image" if image else "") + ").to_tuple()")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The video stream of joint samples (or video latents [N, C, F, H, W], e.g. the
        conditioning image's) as pixels [N, 3, F, H, W] (identity: the video latent itself),
        as LTX2Pipeline decodes it; the audio stream: `decode_audio`."""
        video = (latents if latents.dim() == 5 else self.video_of(self.cfg, latents)).float()
        if self.cfg.vae == "identity":
            return video
        from diffusers import AutoencoderKLLTX2Video, LTX2Pipeline

        if getattr(self, "_vae", None) is None:
            self._vae = AutoencoderKLLTX2Video.from_pretrained(self.part_folder("vae"), subfolder="vae").to(
                video.device).eval()
        vae = self._vae
        latents = LTX2Pipeline._denormalize_latents(video, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        # a timestep-conditioned decoder at the pipeline's decode_timestep, 0 (no decode noise)
        timestep = video.new_zeros(video.shape[0]) if vae.config.timestep_conditioning else None
        pixels = vae.decode(latents, timestep, return_dict=False)[0]
        return pixels.float().clamp(-1, 1)

    @torch.no_grad()
    def decode_audio(self, latents: torch.Tensor) -> Optional[Sound]:
        """The audio stream as LTX2Pipeline renders it: de-normalised by the audio VAE's
        statistics, decoded to a mel spectrogram, through the vocoder (with model.vae=ltx2)."""
        if self.cfg.vae != "ltx2":
            return None
        from diffusers import AutoencoderKLLTX2Audio, LTX2Pipeline
        from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

        if getattr(self, "_sound", None) is None:
            self._sound = tuple(m.to(latents.device).eval() for m in (
                AutoencoderKLLTX2Audio.from_pretrained(self.part_folder("audio_vae"), subfolder="audio_vae"),
                LTX2Vocoder.from_pretrained(self.part_folder("vocoder"), subfolder="vocoder")))
        audio_vae, vocoder = self._sound
        audio = self.streams(latents.float())["audio"]
        tokens = LTX2Pipeline._denormalize_audio_latents(pack_audio(audio), audio_vae.latents_mean, audio_vae.latents_std)
        mel = audio_vae.decode(unpack_audio(tokens, audio.shape[3]), return_dict=False)[0]
        return Sound(vocoder(mel).float().clamp(-1, 1), vocoder.config.output_sampling_rate, self.cfg.fps)


def pack_video(latents: torch.Tensor, patch: int = 1, patch_t: int = 1) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, tokens, C * pt * p * p], LTX2Pipeline's `_pack_latents` order."""
    b, c, t, h, w = latents.shape
    x = latents.reshape(b, c, t // patch_t, patch_t, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).flatten(4, 7).flatten(1, 3)


def unpack_video(tokens: torch.Tensor, frames: int, height: int, width: int, patch: int = 1,
                 patch_t: int = 1) -> torch.Tensor:
    """The inverse of `pack_video`, for the latent's own frames, height and width."""
    b = tokens.shape[0]
    x = tokens.reshape(b, frames // patch_t, height // patch, width // patch, -1, patch_t, patch, patch)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def pack_audio(latents: torch.Tensor) -> torch.Tensor:
    """[B, Ca, L, M] -> [B, L, Ca * M], LTX2Pipeline's `_pack_audio_latents` without patches."""
    return latents.transpose(1, 2).flatten(2, 3)


def unpack_audio(tokens: torch.Tensor, mel_bins: int) -> torch.Tensor:
    """[B, L, Ca * M] -> [B, Ca, L, M]."""
    return tokens.unflatten(2, (-1, mel_bins)).transpose(1, 2)
