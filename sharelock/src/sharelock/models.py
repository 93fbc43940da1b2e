"""ShareLock heads: a trainable text projection into the frozen vision space, identity + L2 norm on the image side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from funai_common.weights import load_safetensors
from sharelock.config import read_json

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"
REFERENCE_TEMPLATE = "A photo of a {}"


class ProjectionHead(nn.Module):
    """`num_layers - 1` blocks of Linear -> BatchNorm1d -> ReLU -> Dropout, then a Linear to `output_dim`.

    `num_layers=0` is the identity. With `normalize` the output rows are divided by their L2 norm (no epsilon, as in
    the reference). Input (B, input_dim) -> output (B, output_dim) (or (B, input_dim) for the identity).
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        hidden_dim: int = 4096,
        num_layers: int = 4,
        dropout: float = 0.2,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        self.input_dim, self.num_layers, self.normalize = input_dim, num_layers, normalize
        self.output_dim = output_dim if num_layers > 0 else input_dim
        layers: list[nn.Module] = []
        width = input_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden_dim
        if num_layers > 0:
            layers.append(nn.Linear(width, output_dim))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x)
        return x / x.norm(dim=-1, keepdim=True) if self.normalize else x


class ShareLock(nn.Module):
    """Dual encoder heads on frozen features: `forward(v (B, vision_dim), t (B, text_dim)) -> (z_v, z_t)`, unit rows
    by default.

    With `vision_layers=0` the vision head is identity + L2 norm and the embedding dimension is `vision_dim`, whatever
    `embedding_dim` says (the reference rule); with `text_layers=0` it is `text_dim`; otherwise `embedding_dim`
    (default `vision_dim`).
    `vision_normalize` / `text_normalize` (keyword-only, default True as the reference's `normalize: True`) switch
    off the L2 normalisation of a head's output: the loss and the zero-shot logits then use raw dot products.
    Frozen backbones can be attached with `attach_encoders` so that `encode_image` / `encode_text` accept raw
    images and strings; they are not part of the state dict.
    """

    def __init__(
        self,
        vision_dim: int,
        text_dim: int,
        text_layers: int = 4,
        hidden_dim: int = 4096,
        vision_layers: int = 0,
        embedding_dim: int | None = None,
        dropout: float = 0.2,
        *,
        vision_normalize: bool = True,
        text_normalize: bool = True,
    ) -> None:
        super().__init__()
        self.vision_dim, self.text_dim = vision_dim, text_dim
        # the reference rule: an identity head fixes the embedding dimension to its input width
        if vision_layers == 0:
            self.embedding_dim = vision_dim
        elif text_layers == 0:
            self.embedding_dim = text_dim
        else:
            self.embedding_dim = embedding_dim or vision_dim
        if vision_layers == 0 and text_layers == 0 and vision_dim != text_dim:
            raise ValueError(f"two identity heads need vision_dim == text_dim, got {vision_dim} and {text_dim}")
        self.config = dict(
            vision_dim=vision_dim,
            text_dim=text_dim,
            text_layers=text_layers,
            hidden_dim=hidden_dim,
            vision_layers=vision_layers,
            embedding_dim=embedding_dim,
            dropout=dropout,
            vision_normalize=vision_normalize,
            text_normalize=text_normalize,
        )
        self.vision_head = ProjectionHead(
            vision_dim, self.embedding_dim, hidden_dim, vision_layers, dropout, normalize=vision_normalize
        )
        self.text_head = ProjectionHead(
            text_dim, self.embedding_dim, hidden_dim, text_layers, dropout, normalize=text_normalize
        )
        self.__dict__["_encoders"] = {}

    def forward(self, vision_features: torch.Tensor, text_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vision_head(vision_features), self.text_head(text_features)

    def _in_eval(self, fn, *args):
        was_training = self.training
        self.eval()
        try:
            return fn(*args)
        finally:
            self.train(was_training)

    def zero_shot_logits(self, vision_features: torch.Tensor, class_text_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarities (N, C) between image features (N, vision_dim) and class features (C, text_dim) (plain
        dot products of the head outputs when a head is unnormalised).

        Computed in eval mode (BatchNorm running statistics, no dropout), no logit scale; class i is row i.
        """
        return self._in_eval(
            lambda v, t: self.vision_head(v) @ self.text_head(t).t(), vision_features, class_text_features
        )

    # ----------------------------------------------------------------------------------------- inference API
    def attach_encoders(
        self,
        vision_encoder: nn.Module | None = None,
        image_transform: Any = None,
        language_model: nn.Module | None = None,
        tokenizer: Any = None,
        text_batch_size: int = 64,
    ) -> ShareLock:
        """Attach frozen backbones so `encode_image` / `encode_text` accept images and strings. Returns self."""
        if image_transform is None:
            from sharelock.data import eval_transform

            image_transform = eval_transform()
        self._encoders.update(
            vision=vision_encoder,
            transform=image_transform,
            language=language_model,
            tokenizer=tokenizer,
            text_batch_size=text_batch_size,
        )
        return self

    def _device(self) -> torch.device:
        return next(self.parameters(), torch.zeros(())).device

    @torch.no_grad()
    def encode_image(self, images: Any) -> torch.Tensor:
        """Image embeddings (N, D), unit rows unless `vision_normalize=False`, from vision features (N, vision_dim), a
        preprocessed batch (N, 3, H, W), or PIL image(s) (preprocessed with the reference eval transform)."""
        if isinstance(images, torch.Tensor) and images.ndim == 2:
            feats = images
        else:
            encoder = self._encoders.get("vision")
            if encoder is None:
                raise RuntimeError("encode_image on images needs a vision encoder: call attach_encoders(...) first")
            if not isinstance(images, torch.Tensor):
                items = images if isinstance(images, list | tuple) else [images]
                images = torch.stack([self._encoders["transform"](im.convert("RGB")) for im in items])
            dev = next(encoder.parameters()).device
            feats = encoder(images.to(dev)).float()
        return self._in_eval(self.vision_head, feats.to(self._device()))

    @torch.no_grad()
    def encode_text(self, texts: Any) -> torch.Tensor:
        """Text embeddings (N, D), unit rows unless `text_normalize=False`, from LLM features (N, text_dim) or strings
        (last-token LLM features)."""
        if isinstance(texts, torch.Tensor):
            feats = texts
        else:
            model, tok = self._encoders.get("language"), self._encoders.get("tokenizer")
            if model is None or tok is None:
                raise RuntimeError("encode_text on strings needs a language model: call attach_encoders(...) first")
            from sharelock.features import last_token_features

            texts = [texts] if isinstance(texts, str) else list(texts)
            feats = last_token_features(model, tok, texts, batch_size=self._encoders["text_batch_size"])
        return self._in_eval(self.text_head, feats.to(self._device()))

    @torch.no_grad()
    def zero_shot_classifier(
        self, class_names: Sequence[str] | torch.Tensor, templates: Sequence[str] = (REFERENCE_TEMPLATE,)
    ) -> torch.Tensor:
        """Class prototypes (C, D), unit rows: per class, the mean over templates of the normalised text embeddings,
        renormalised (CLIP-style ensembling; with one template this is the reference prototype). `class_names` may also
        be precomputed class text features (C, text_dim). Logits for images: `encode_image(x) @ classifier.T`.
        With `text_normalize=False` the prototypes are the plain mean of the raw text embeddings (no renormalising)."""
        if isinstance(class_names, torch.Tensor):
            return self.encode_text(class_names)
        if isinstance(templates, str):
            templates = [templates]
        total = None
        for template in templates:
            emb = self.encode_text([format_prompt(template, name) for name in class_names])
            total = emb if total is None else total + emb
        return self.ensemble(total / len(templates))

    def ensemble(self, mean_embedding: torch.Tensor) -> torch.Tensor:
        """Prototypes from the per-class mean of the template embeddings (C, D): renormalised unless the text head
        is unnormalised (`text_normalize=False`), whose raw embeddings are used as they are."""
        return F.normalize(mean_embedding, dim=-1) if self.text_head.normalize else mean_embedding


def from_reference_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename official ShareLock weights to this package's names.

    `vision_projector.projection.<i>.*` -> `vision_head.layers.<i>.*` and `language_projector.projection.<i>.*` ->
    `text_head.layers.<i>.*` (the Sequential indices are the same), with or without a leading `model.`, e.g. the
    `state_dict` of the FunAILab/ShareLock Lightning checkpoints (`sharelock-convert` reads those). Any other key is
    an error naming it."""
    renames = {
        "vision_projector.projection.": "vision_head.layers.",
        "language_projector.projection.": "text_head.layers.",
    }
    out, unknown = {}, []
    for key, value in state_dict.items():
        name = key.removeprefix("model.")
        old = next((old for old in renames if name.startswith(old)), None)
        if old is None:
            unknown.append(key)
        else:
            out[renames[old] + name[len(old) :]] = value
    if unknown:
        raise ValueError(
            f"not ShareLock projection weights (vision_projector.projection.* / language_projector.projection.*): "
            f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}"
        )
    return out


def format_prompt(template: str, name: str) -> str:
    """Fill a prompt template: `{}` or `{c}` is replaced by the class name."""
    return template.replace("{c}", name).replace("{}", name)


def step_folders(checkpoints: Path) -> list[Path]:
    """The ``step_<N>`` folders of ``checkpoints`` by step number (by name, step_1000000 came before step_999999);
    temporary (``step_N.tmpPID``) and stray folders are no steps."""
    found = [p for p in Path(checkpoints).glob("step_*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a checkpoint path, or from a run directory (best, else latest)."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return path
    ckpts = path / "checkpoints"
    if (ckpts / "best" / MODEL_FILE).is_file():
        return ckpts / "best"
    steps = step_folders(ckpts)
    if steps:
        return steps[-1]
    raise FileNotFoundError(
        f"no ShareLock checkpoint at {path}: expected {MODEL_FILE} there or a run dir with checkpoints/"
    )


def load_model(path: str | Path, device: str | torch.device = "cpu", load_backbones: bool = False) -> ShareLock:
    """Load trained heads from a checkpoint or run directory; with `load_backbones` also attach the frozen vision and
    language models recorded in the checkpoint (names/paths from the feature stores used for training)."""
    ckpt = resolve_checkpoint(path)
    meta = read_json(ckpt / META_FILE)
    model = ShareLock(**meta["model"])
    model.load_state_dict(load_safetensors(ckpt / MODEL_FILE))
    model.to(device).eval()
    if load_backbones:
        from sharelock.features import build_language_encoder, build_vision_encoder

        backbones = meta.get("backbones", {})
        vision = build_vision_encoder(backbones["vision"]).to(device) if backbones.get("vision") else None
        language, tokenizer = (
            build_language_encoder(backbones["text"], device) if backbones.get("text") else (None, None)
        )
        model.attach_encoders(vision, None, language, tokenizer)
    return model
