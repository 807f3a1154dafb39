"""LTX-2's encoders from a diffusers LTX-2 folder, for preprocessing and sampling.

- Text: Gemma-3 through LTX2Pipeline's own `encode_prompt` (left padding, every
  hidden state stacked), then the pipeline's text connectors; a caption is the
  connectors' video and audio embeddings side by side, [L, 2 * caption_channels],
  the tokens the connectors keep (with learnable registers, as LTX-2.0 has, all
  of max_sequence_length: the padding became registers).
- Video: the VAE posterior mean, normalised as LTX2Pipeline normalises latents
  (per-channel mean and std, scaling factor).
- Audio: the waveform's log-mel spectrogram (LTX-2's audio preprocessing: 16 kHz,
  a 1,024-point Hann STFT with hop 160, magnitude, Slaney mel filters over
  0-8 kHz, natural log floored at 1e-5), the audio VAE's posterior mean cut to the
  latent frames the pipeline gives that duration, normalised by the audio VAE's
  statistics on the packed [L, C * M] tokens as the pipeline does.

A row's latent is the joint sample of ltx2.py: both latents flattened side by side,
in model space.
"""

import json
from pathlib import Path
from typing import List

import torch

from distill.models.ltx2 import pack_audio, unpack_audio

MEL_FFT = 1024  # the STFT size of LTX-2's mel spectrograms (window = FFT size)
MEL_FLOOR = 1e-5


def log_mel(waveform: torch.Tensor, rate: int, hop: int, mel_bins: int, n_fft: int = MEL_FFT) -> torch.Tensor:
    """[N, channels, samples] -> [N, channels, samples // hop + 1, mel_bins]: the log of the
    magnitude STFT through Slaney-normalised Slaney-scale mel filters (0 to rate / 2)."""
    from transformers.audio_utils import mel_filter_bank

    n, channels, _ = waveform.shape
    window = torch.hann_window(n_fft, dtype=waveform.dtype, device=waveform.device)
    spec = torch.stft(waveform.flatten(0, 1), n_fft, hop_length=hop, win_length=n_fft, window=window, center=True,
                      pad_mode="reflect", return_complex=True).abs()  # [N * channels, n_fft / 2 + 1, frames]
    filters = torch.from_numpy(mel_filter_bank(n_fft // 2 + 1, mel_bins, 0.0, rate / 2, rate, norm="slaney",
                                               mel_scale="slaney")).to(spec)
    mel = torch.einsum("bft,fm->btm", spec, filters)
    return mel.clamp_min(MEL_FLOOR).log().unflatten(0, (n, channels))


def audio_latent_frames(samples: int, hop: int, compression: int) -> int:
    """The audio latent frames LTX2Pipeline gives a clip of `samples`: round(seconds x
    rate / hop / compression), 25 a second for LTX-2 (16 kHz, hop 160, 4x)."""
    return round(samples / (hop * compression))


class LTX2Encoders:
    image_encoder = None  # image-to-video conditions on the first frame's latent, not on image features

    def __init__(self, model: Path, text_only: bool, max_text_len: int, device: torch.device):
        import transformers
        from diffusers import AutoencoderKLLTX2Audio, AutoencoderKLLTX2Video, LTX2Pipeline
        from diffusers.pipelines.ltx2 import LTX2TextConnectors

        self.device = device
        self.max_text_len = max_text_len
        tokenizer = transformers.AutoTokenizer.from_pretrained(model / "tokenizer")
        architecture = json.loads((model / "text_encoder" / "config.json").read_text())["architectures"][0]
        encoder = getattr(transformers, architecture).from_pretrained(model / "text_encoder").to(device).eval()
        connectors = LTX2TextConnectors.from_pretrained(model / "connectors").to(device).eval()
        self.vae = self.audio_vae = None
        if not text_only:
            self.vae = AutoencoderKLLTX2Video.from_pretrained(model / "vae").to(device).eval()
            self.audio_vae = AutoencoderKLLTX2Audio.from_pretrained(model / "audio_vae").to(device).eval()
        self.pipeline = LTX2Pipeline(scheduler=None, vae=self.vae, audio_vae=self.audio_vae, text_encoder=encoder,
                                     tokenizer=tokenizer, connectors=connectors, transformer=None, vocoder=None)

    # what preprocessing reads beside the frames: the clip's sound at this rate and channel count
    @property
    def audio_rate(self) -> int:
        return self.audio_vae.config.sample_rate

    @property
    def audio_channels(self) -> int:
        return self.audio_vae.config.in_channels

    @torch.no_grad()
    def text(self, captions: List[str]) -> List[torch.Tensor]:
        """Each caption's [L, 2 * caption_channels]: the video connector's tokens, then the audio's."""
        embeds, mask, _, _ = self.pipeline.encode_prompt(captions, do_classifier_free_guidance=False,
                                                         max_sequence_length=self.max_text_len, device=self.device)
        video, audio, kept = self.pipeline.connectors(embeds, mask, padding_side=self.pipeline.tokenizer.padding_side)
        joined = torch.cat([video, audio], dim=-1)
        return [rows[keep.bool()].float().cpu() for rows, keep in zip(joined, kept)]

    @torch.no_grad()
    def image_latents(self, images: torch.Tensor) -> torch.Tensor:
        """Images as one-frame clips [N, 3, 1, H, W] -> their latents [N, C, 1, H, W] in model
        space, each encoded alone and normalised as LTX2ImageToVideoPipeline does (the causal
        VAE makes it the clip's own first latent frame)."""
        from diffusers import LTX2Pipeline

        latent = self.vae.encode(images.to(self.device)).latent_dist.mean
        return LTX2Pipeline._normalize_latents(latent, self.vae.latents_mean, self.vae.latents_std).float().cpu()

    @torch.no_grad()
    def video(self, clips: torch.Tensor, audio: torch.Tensor = None) -> torch.Tensor:
        """Clips [N, 3, F, H, W] in [-1, 1] and their sound [N, channels, samples] at
        `audio_rate` -> joint samples [N, C*T*H*W + Ca*L*M] in model space."""
        from diffusers import LTX2Pipeline

        if audio is None:
            raise ValueError("LTX-2 encodes each clip's video and audio together: no waveform was given")
        vae, audio_vae = self.vae, self.audio_vae
        latent = vae.encode(clips.to(self.device)).latent_dist.mean
        video = LTX2Pipeline._normalize_latents(latent, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        c = audio_vae.config
        frames = audio_latent_frames(audio.shape[-1], c.mel_hop_length, audio_vae.temporal_compression_ratio)
        mel = log_mel(audio.float().to(self.device), c.sample_rate, c.mel_hop_length, c.mel_bins)
        sound = audio_vae.encode(mel).latent_dist.mean
        if sound.shape[2] < frames:
            raise ValueError(f"the audio VAE gave {sound.shape[2]} latent frames for {audio.shape[-1]} samples, "
                             f"fewer than the pipeline's {frames}")
        tokens = pack_audio(sound[:, :, :frames])
        tokens = LTX2Pipeline._normalize_audio_latents(tokens, audio_vae.latents_mean, audio_vae.latents_std)
        sound = unpack_audio(tokens, sound.shape[3])
        return torch.cat([video.flatten(1), sound.flatten(1)], dim=1).float().cpu()
