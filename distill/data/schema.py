"""The parquet row layout: FastVideo's text-to-video schema, unchanged.

A tensor is stored as three columns: raw bytes (C order), its shape and its
dtype name. Latents are the VAE posterior mean, un-normalised, [C, T, H, W];
text embeddings are [L, D] with the padding removed. A text-only dataset
(data-free DMD) has no latent columns.
"""

from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import torch

LATENT = "vae_latent"
TEXT = "text_embedding"
# image-to-video (FastVideo's i2v schema): the image encoder's features
# [tokens, D] (empty where the model has none), the VAE latent of the first
# frame followed by black frames [C, T, H, W] (un-normalised, as vae_latent;
# its first latent frame is the image's own latent: the Wan VAEs are causal in
# time), and the first frame's pixels [H, W, 3] uint8 for validation
CLIP = "clip_feature"
FIRST_FRAME = "first_frame_latent"
IMAGE = "pil_image"
I2V_PREFIXES = (CLIP, FIRST_FRAME, IMAGE)
# ODE pairs (python -m distill.ode_pairs): the teacher's ODE states at the student's
# sigmas and its clean end, [S + 1, C, T, H, W] in model space, and those S sigmas
ODE = "ode_trajectory"
ODE_SIGMAS = "ode_sigmas"
META_FIELDS = [
    ("id", pa.string()),
    ("file_name", pa.string()),
    ("caption", pa.string()),
    ("media_type", pa.string()),
    ("width", pa.int64()),
    ("height", pa.int64()),
    ("num_frames", pa.int64()),
    ("duration_sec", pa.float64()),
    ("fps", pa.float64()),
]


def tensor_fields(prefix: str) -> List[tuple]:
    return [
        (f"{prefix}_bytes", pa.binary()),
        (f"{prefix}_shape", pa.list_(pa.int64())),
        (f"{prefix}_dtype", pa.string()),
    ]


def schema(with_latents: bool = True, with_ode: bool = False, i2v: bool = False) -> pa.Schema:
    fields = [META_FIELDS[0]] + (tensor_fields(LATENT) if with_latents else []) + tensor_fields(TEXT)
    if i2v:
        fields += [f for prefix in I2V_PREFIXES for f in tensor_fields(prefix)]
    fields += META_FIELDS[1:]
    if with_ode:
        fields += tensor_fields(ODE) + [(ODE_SIGMAS, pa.list_(pa.float64()))]
    return pa.schema(fields)


def required_columns(with_latents: bool, with_ode: bool = False) -> List[str]:
    cols = ["id"] + [name for name, _ in tensor_fields(TEXT)]
    if with_latents:
        cols += [name for name, _ in tensor_fields(LATENT)]
    if with_ode:
        cols += [name for name, _ in tensor_fields(ODE)] + [ODE_SIGMAS]
    return cols


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
          "uint8": torch.uint8}


def encode(t: torch.Tensor) -> Dict[str, object]:
    """A tensor as (bytes, shape, dtype name)."""
    t = t.detach().cpu().contiguous()
    name = str(t.dtype).removeprefix("torch.")
    raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    return {"bytes": raw, "shape": list(t.shape), "dtype": name}


def decode(raw: bytes, shape: List[int], dtype: str) -> torch.Tensor:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} not one of {sorted(DTYPES)}")
    if dtype == "bfloat16":
        flat = torch.from_numpy(np.frombuffer(raw, dtype=np.int16).copy()).view(torch.bfloat16)
    else:
        flat = torch.from_numpy(np.frombuffer(raw, dtype=np.dtype(dtype)).copy())
    return flat.reshape(shape)


def make_row(
    sample_id: str, text: torch.Tensor, caption: str, latent: Optional[torch.Tensor] = None,
    ode: Optional[torch.Tensor] = None, ode_sigmas: Optional[List[float]] = None,
    i2v: Optional[Dict[str, Optional[torch.Tensor]]] = None, **meta
) -> Dict[str, object]:
    """One row in the schema's column names; `i2v` maps CLIP, FIRST_FRAME and IMAGE
    to tensors (None: the empty bytes, shape and dtype FastVideo writes)."""
    row = {"id": sample_id, "caption": caption}
    if ode is not None:
        row[ODE_SIGMAS] = [float(s) for s in ode_sigmas]
    for prefix, tensor in ((TEXT, text), (LATENT, latent), (ODE, ode)):
        if tensor is not None:
            for key, value in encode(tensor).items():
                row[f"{prefix}_{key}"] = value
    for prefix, tensor in (i2v or {}).items():
        stored = encode(tensor) if tensor is not None else {"bytes": b"", "shape": [], "dtype": ""}
        row.update({f"{prefix}_{key}": value for key, value in stored.items()})
    defaults = {"file_name": "", "media_type": "video" if latent is not None else "text", "width": 0, "height": 0,
                "num_frames": 0, "duration_sec": 0.0, "fps": 0.0}
    row.update({k: meta.get(k, v) for k, v in defaults.items()})
    return row
