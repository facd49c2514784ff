"""CLIP as the paper's evaluation and curation use it: OpenAI's ViT-B/32 through open_clip, its preprocessing,
the prompt text it reads, and cosines between features.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from inversion.embedding import InversionError
from inversion.templates import MARKER

log = logging.getLogger(__name__)

CLIP_ARCH = "ViT-B-32"
CLIP_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "clip-vit-b-32.pt"
CLIP_URL = (
    "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt"
)
CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RANDOM = "random"  # --clip-weights random: untrained CLIP, smoke runs only


# --- features and text ----------------------------------------------------------------------------------


def unit_rows(x, name: str = "features") -> torch.Tensor:
    """(N, D) or (D,) features → (N, D) float64 rows of unit length; bad input is a one-line ValueError."""
    x = torch.as_tensor(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2:
        raise ValueError(f"{name} must be (N, D) or (D,) features, got shape {tuple(x.shape)}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    x = x.detach().to(torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or infinite values")
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"{name} has a zero vector (row {int((norms[:, 0] == 0).nonzero()[0])}); cosine is undefined")
    return x / norms


def cosine(a, b, name_a: str = "features a", name_b: str = "features b") -> torch.Tensor:
    """(N, M) float64 cosines between the rows of a and of b (a (D,) vector is one row)."""
    ua, ub = unit_rows(a, name_a), unit_rows(b, name_b)
    if ua.shape[1] != ub.shape[1]:
        raise ValueError(f"{name_a} has {ua.shape[1]} dims but {name_b} has {ub.shape[1]}")
    return ua @ ub.T


def clip_text(prompt: str, words: Sequence[str] = ()) -> str:
    """The prompt as CLIP reads it: S* and the learned words removed (the official `replace("*", "")`), spaces
    collapsed."""
    for w in sorted((w for w in words if w), key=len, reverse=True):
        prompt = prompt.replace(w, "")
    return " ".join(prompt.replace(MARKER, "").split())


# --- the model --------------------------------------------------------------------------------------------------


def clip_preprocess(images: torch.Tensor, size: int = CLIP_SIZE) -> torch.Tensor:
    """Generator output in [−1, 1] (B, 3, H, W) → CLIP input: [0, 1], bicubic short side → size, centre crop,
    CLIP mean/std (the official evaluator's tensor path: torchvision Resize on tensors, no antialias)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    x = (images.float() + 1.0) / 2.0
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(size * long / short)
        new = (size, new_long) if h <= w else (new_long, size)
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=False)
        h, w = x.shape[-2:]
        top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
        x = x[..., top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def read_clip_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """OpenAI's TorchScript archive (ViT-B-32.pt), an open_clip state dict (.pt/.bin) or .safetensors."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            is_script = False
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as z:
                    is_script = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
            if is_script:
                sd = torch.jit.load(str(path), map_location="cpu").state_dict()
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(sd, dict) and "state_dict" in sd:
                    sd = sd["state_dict"]
    except Exception as e:  # archive, pickle and safetensors errors come in many classes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InversionError(f"CLIP weights {path} are not readable ({first}); re-download {CLIP_URL}") from None
    if not isinstance(sd, dict):
        raise InversionError(f"CLIP weights {path} hold no state dict; re-download {CLIP_URL}")
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI archive scalars
        sd.pop(key, None)
    return sd


class CLIPScorer:
    """open_clip's CLIP (OpenAI ViT-B/32 weights by default) → unnormalised image and text features."""

    def __init__(self, model: torch.nn.Module, tokenizer, device: torch.device, weights: str) -> None:
        self.model, self.tokenizer, self.device, self.weights = model.eval(), tokenizer, device, weights

    @classmethod
    def load(
        cls, weights: str | Path | None = None, device: torch.device | str = "cpu", arch: str = CLIP_ARCH
    ) -> CLIPScorer:
        """weights: a file, RANDOM (untrained, for smoke tests) or None (weights/clip-vit-b-32.pt)."""
        random = str(weights) == RANDOM
        path = None if random else Path(weights or CLIP_WEIGHTS)
        if path is not None and not path.is_file():
            raise InversionError(
                f"CLIP {arch} weights not found at {path}; download OpenAI's ViT-B-32.pt from "
                f"{CLIP_URL} to {CLIP_WEIGHTS} (or pass --clip-weights PATH)"
            )
        import open_clip

        if arch not in open_clip.list_models():
            raise InversionError(f"--clip-arch {arch!r} is not an open_clip architecture (the paper's: {CLIP_ARCH})")
        model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=True)  # OpenAI CLIP: QuickGELU
        if path is None:
            log.warning("CLIP has random weights (--clip-weights %s): the metrics are meaningless", RANDOM)
        else:
            missing, unexpected = model.load_state_dict(read_clip_state_dict(path), strict=False)
            if missing or unexpected:
                names = ", ".join((missing or unexpected)[:3])
                raise InversionError(
                    f"CLIP weights {path} do not fit open_clip {arch} "
                    f"({'missing' if missing else 'unexpected'} {names}…); use OpenAI's "
                    f"ViT-B-32.pt from {CLIP_URL}"
                )
        device = torch.device(device)
        return cls(model.to(device), open_clip.get_tokenizer(arch), device, RANDOM if path is None else str(path))

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """Images in [−1, 1] (B, 3, H, W) → (B, D) fp32 CLIP image embeddings."""
        feats = [
            self.model.encode_image(clip_preprocess(images[i : i + chunk].to(self.device))).float()
            for i in range(0, images.shape[0], chunk)
        ]
        return torch.cat(feats).cpu()

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings → (T, D) fp32 CLIP text embeddings."""
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float().cpu()
