"""FUNGIExtractor: embeddings + projected per-sample gradients of self-supervised objectives, for any frozen model."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fungi.gradients import call_model, default_layer, get_linear, gradient_shape, per_sample_gradients
from fungi.models import Backbone, build_backbone
from fungi.objectives import DEFAULT_OBJECTIVES, OBJECTIVES, build_objective, resolved_options
from fungi.projection import l2_normalize, project, random_projection
from fungi.runs import read_tensors_and_meta

FORMAT_VERSION = 1
DENSE_PROJECTION_LIMIT = 1 << 28  # entries; ViT-S (57M) and ViT-B (454M int8) -> ViT-S cached as float


def _first(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _label(item):
    return item[1] if isinstance(item, (tuple, list)) and len(item) > 1 else -1


class FUNGIExtractor(nn.Module):
    """FUNGI features of a frozen model: concat(e/||e||, g_kl/||g_kl||, g_dino/||g_dino||, g_simclr/||g_simclr||).

    ``model``: an nn.Module mapping inputs to embeddings (n, E), a ``Backbone``, or a name for ``build_backbone``.
    ``layer``: dotted name of the target nn.Linear (default: the last attention output projection). ``objectives``:
    subset of ('kl', 'dino', 'simclr', 'deepcluster'), default the first three, with optional per-objective options
    in ``objective_options``. ``seed`` fixes the heads, the +-1 projection (one matrix shared by all objectives), the
    negative bank and the k-means prototypes. ``dtype`` bfloat16 runs the model under autocast. Image inputs: a
    (B, C, H, W) preprocessed tensor or a list of PIL images; text: a list of strings (needs a tokenizer); audio:
    (B, T, F) spectrograms.
    """

    def __init__(
        self,
        model: nn.Module | Backbone | str,
        layer: str | None = None,
        objectives: Sequence[str] = DEFAULT_OBJECTIVES,
        seed: int = 42,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        objective_options: Mapping[str, Mapping] | None = None,
        max_views_per_pass: int = 256,
        max_length: int = 512,
        pretrained: bool = True,
    ):
        super().__init__()
        backbone = build_backbone(model, pretrained=pretrained) if isinstance(model, str) else model
        if not isinstance(backbone, Backbone):
            backbone = Backbone(backbone)
        self.backbone = backbone
        self.model = backbone.model.to(device).eval().requires_grad_(False)
        self.layer = layer or default_layer(self.model)
        self.linear = get_linear(self.model, self.layer)
        unknown = set(objectives) - set(OBJECTIVES)
        if unknown:
            raise ValueError(f"unknown objectives {sorted(unknown)}; expected a subset of {OBJECTIVES}")
        self.objective_names = tuple(objectives)
        self.objective_options = {k: dict(v) for k, v in (objective_options or {}).items()}
        self.seed, self.device, self.dtype = seed, torch.device(device), dtype
        self.max_views_per_pass, self.max_length = max_views_per_pass, max_length
        self.embed_dim: int | None = None
        self.objectives = nn.ModuleDict()
        self._transform = None
        self._dense: torch.Tensor | None = None

    # ----------------------------------------------------------------- construction from the seed
    def build(self, embed_dim: int) -> None:
        """Heads and projection for embedding size E, drawn from the seed (idempotent)."""
        if self.embed_dim == embed_dim:
            return
        if self.embed_dim is not None:
            raise ValueError(f"embedding size changed from {self.embed_dim} to {embed_dim}")
        self.embed_dim = embed_dim
        gen = torch.Generator().manual_seed(self.seed)
        for name in self.objective_names:
            options = self.objective_options.get(name, {})
            self.objectives[name] = build_objective(name, embed_dim, gen, **options).to(self.device)
        out_dim, in_dim = gradient_shape(self.linear)  # in_dim counts the bias column when there is one
        projection = random_projection(embed_dim, out_dim * in_dim, self.seed).to(torch.int8)
        self.register_buffer("projection", projection.to(self.device))  # no host-to-device copy per batch

    @property
    def feature_dim(self) -> int:
        """Output size: (1 + number of objectives) * E."""
        return (1 + len(self.objective_names)) * (self.embed_dim or 0)

    # ----------------------------------------------------------------- inputs
    def transform(self, image):
        """The model's inference transform (resize, center crop, normalise; see ``Backbone``) for one PIL image ->
        (C, S, S)."""
        if self._transform is None:
            from torchvision.transforms import v2

            b = self.backbone
            self._transform = v2.Compose(
                [
                    v2.Resize(b.resize_size, interpolation=v2.InterpolationMode(b.interpolation)),
                    v2.CenterCrop(b.input_size),
                    v2.ToImage(),
                    v2.ToDtype(torch.float32, scale=True),
                    v2.Normalize(b.mean, b.std),
                ]
            )
        return self._transform(image.convert("RGB"))

    def prepare(self, inputs):
        """Batch -> model-ready inputs: tensor on the device, or a list of strings for text."""
        if isinstance(inputs, torch.Tensor):
            return inputs.to(self.device)
        inputs = list(inputs)
        if inputs and isinstance(inputs[0], str):
            return inputs
        if inputs and isinstance(inputs[0], torch.Tensor):
            return torch.stack(inputs).to(self.device)
        return torch.stack([self.transform(im) for im in inputs]).to(self.device)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise a flat list of strings (padding to the longest, truncation at ``max_length``: 512 by default, the
        BERT / T5 limit, so texts are whole as in the reference, which does not truncate)."""
        if self.backbone.tokenizer is None:
            raise ValueError("text inputs need a tokenizer: pass a Backbone with tokenizer=...")
        enc = self.backbone.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items()}

    def _views_to_model(self, views):
        """Objective views -> (B, V, ...) tensor or mapping of tensors for ``per_sample_gradients``."""
        if isinstance(views, list):
            batch, num = len(views), len(views[0])
            enc = self.tokenize([t for sample in views for t in sample])
            return {k: v.reshape(batch, num, *v.shape[1:]) for k, v in enc.items()}
        return views

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    # ----------------------------------------------------------------- features
    @torch.no_grad()
    def embed(self, inputs) -> torch.Tensor:
        """Raw embeddings (B, E) float32 of prepared inputs."""
        x = self.tokenize(inputs) if isinstance(inputs, list) else inputs
        with self._autocast():
            return call_model(self.model, x).float()

    def gradients(self, name: str, inputs) -> torch.Tensor:
        """Per-sample gradients (B, O, I+1), (B, O, I) without bias, of objective ``name`` on prepared inputs, in
        chunks of whole samples."""
        objective = self.objectives[name]
        num_views = len(objective.views(inputs[:1], self.seed)[0])
        chunk = max(1, self.max_views_per_pass // num_views)
        out = []
        for start in range(0, len(inputs), chunk):
            views = self._views_to_model(objective.views(inputs[start : start + chunk], self.seed))
            with self._autocast():
                out.append(per_sample_gradients(self.model, self.layer, views, objective))
        return torch.cat(out)

    def projection_matrix(self) -> torch.Tensor:
        """The +-1 projection for matmuls: a cached float32 copy when it is small (<= 1 GiB), else the int8 buffer
        (converted chunk by chunk inside ``project``)."""
        if self.projection.numel() > DENSE_PROJECTION_LIMIT:
            return self.projection
        if self._dense is None or self._dense.device != self.projection.device:
            self._dense = self.projection.float()
        return self._dense

    def blocks(self, images) -> dict[str, torch.Tensor]:
        """L2-normalised blocks of a batch: {'embeddings': (B, E), 'kl': (B, E), 'dino': ..., 'simclr': ...}."""
        x = self.prepare(images)
        emb = self.embed(x)
        self.build(emb.shape[1])
        out = {"embeddings": l2_normalize(emb)}
        if self.objective_names:
            # one pass over the projection matrix for all objectives
            grads = torch.cat([self.gradients(name, x).flatten(1) for name in self.objective_names])
            projected = project(grads, self.projection_matrix()).split(emb.shape[0])
            out.update({name: l2_normalize(p) for name, p in zip(self.objective_names, projected)})
        return out

    def forward(self, images) -> torch.Tensor:
        """FUNGI features (B, (1 + K) * E): embedding block first, then the objectives in the given order."""
        return torch.cat(list(self.blocks(images).values()), dim=1)

    def _batches(self, dataset, batch_size: int, desc: str, indices: Sequence[int] | None = None):
        indices = list(range(len(dataset))) if indices is None else list(indices)
        for start in tqdm(range(0, len(indices), batch_size), desc=desc, leave=False):
            items = [dataset[i] for i in indices[start : start + batch_size]]
            yield [_first(it) for it in items], [_label(it) for it in items]

    def extract_blocks(self, dataset, batch_size: int = 16) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """All blocks for a dataset of images/texts or (input, label) pairs -> ({name: (N, E)}, labels (N,))."""
        blocks: dict[str, list[torch.Tensor]] = {}
        labels = []
        for inputs, ys in self._batches(dataset, batch_size, "fungi"):
            for name, value in self.blocks(inputs).items():
                blocks.setdefault(name, []).append(value.cpu())
            labels += ys
        return {k: torch.cat(v) for k, v in blocks.items()}, torch.as_tensor(labels, dtype=torch.long)

    def extract(self, dataset, batch_size: int = 16) -> torch.Tensor:
        """FUNGI features (N, (1 + K) * E) of a dataset, with a progress bar."""
        blocks, _ = self.extract_blocks(dataset, batch_size)
        return torch.cat(list(blocks.values()), dim=1)

    # ----------------------------------------------------------------- training-set state, save / load
    @torch.no_grad()
    def setup(self, dataset, batch_size: int = 16) -> None:
        """Fit what comes from the training set (seeded): the SimCLR negative bank (``num_negatives`` random items)
        and the DeepCluster prototypes (k-means of every item's assignment crops)."""
        if not {"simclr", "deepcluster"} & set(self.objective_names):
            return
        first = self.prepare([_first(dataset[0])])
        self.build(self.embed(first).shape[1])
        num_prototypes = self.objectives["deepcluster"].num_prototypes if "deepcluster" in self.objectives else 0
        if len(dataset) < num_prototypes:
            raise ValueError(
                f"deepcluster.num_prototypes={num_prototypes} exceeds the {len(dataset)} training items (k-means "
                "needs one item per prototype): lower deepcluster.num_prototypes"
            )
        if "simclr" in self.objective_names:
            simclr = self.objectives["simclr"]
            gen = torch.Generator().manual_seed(self.seed)
            indices = torch.randperm(len(dataset), generator=gen)[: simclr.num_negatives].tolist()
            bank = [
                simclr.encode(self._embed_views(simclr.views(self.prepare(inputs), self.seed, negative=True)))
                for inputs, _ in self._batches(dataset, batch_size, "negatives", indices)
            ]
            simclr.negatives = torch.cat(bank).flatten(0, 1)
        if "deepcluster" in self.objective_names:
            deepcluster = self.objectives["deepcluster"]
            latents = [
                deepcluster.encode(self._embed_views(deepcluster.assignment_views(self.prepare(inputs), self.seed)))
                for inputs, _ in self._batches(dataset, batch_size, "prototypes")
            ]
            deepcluster.fit(torch.cat(latents), torch.Generator().manual_seed(self.seed))

    def _embed_views(self, views) -> torch.Tensor:
        """Embeddings (B, V, E) float32 of objective views, without autograd."""
        views = self._views_to_model(views)
        first = next(iter(views.values())) if isinstance(views, Mapping) else views
        batch, num = first.shape[:2]
        flat = {k: v.flatten(0, 1) for k, v in views.items()} if isinstance(views, Mapping) else views.flatten(0, 1)
        with self._autocast():
            return call_model(self.model, flat).float().view(batch, num, -1)

    def describe(self) -> dict:
        """What determines the features (saved with the state)."""
        return {
            "format_version": FORMAT_VERSION,
            "layer": self.layer,
            "objectives": list(self.objective_names),
            "objective_options": self.objective_options,
            "seed": self.seed,
            "embed_dim": self.embed_dim,
        }

    def save(self, path: str | Path, backbone: dict | None = None) -> None:
        """Heads, projection (int8), negative bank and prototypes to one safetensors file (metadata: ``describe()``,
        and ``backbone``, a description of the model that ``load`` compares, e.g. fungi-extract's model keys)."""
        from safetensors.torch import save_file

        if self.embed_dim is None:
            raise RuntimeError("nothing to save yet: call the extractor or setup() first")
        tensors = {
            k: v.detach().cpu().contiguous() for k, v in self.objectives.state_dict(prefix="objectives.").items()
        }
        tensors["projection"] = self.projection.cpu().contiguous()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        meta = {**self.describe(), **({"backbone": backbone} if backbone else {})}
        save_file(tensors, str(tmp), metadata={"fungi": json.dumps(meta)})
        tmp.replace(path)

    def load(self, path: str | Path, backbone: dict | None = None) -> FUNGIExtractor:
        """Restore a state written by ``save``. The layer, the objectives and their options (defaults filled in) must
        match this extractor: features computed with other temperatures, views or head sizes would not be comparable
        with those of the saved state, so a mismatch is a ValueError naming the options; so is a ``backbone``
        description that differs from the one saved with the state (when both are given). The saved seed is adopted."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"FUNGI state {path} does not exist (write one with FUNGIExtractor.save)")
        tensors, meta = read_tensors_and_meta(path)
        for key in ("layer", "objectives"):
            mine = self.describe()[key]
            if meta.get(key) != mine:
                raise ValueError(f"{path}: saved {key} {meta.get(key)!r} does not match this extractor's {mine!r}")
        saved_options = meta.get("objective_options", {})
        diffs = []
        for name in self.objective_names:
            saved = resolved_options(name, saved_options.get(name))
            mine = resolved_options(name, self.objective_options.get(name))
            diffs += [f"{name}.{k}: saved {saved.get(k)!r}, here {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if diffs:
            raise ValueError(f"{path}: objective options differ from this extractor's: {'; '.join(diffs)}")
        saved_backbone = meta.get("backbone") or {}
        if backbone and saved_backbone:  # the negatives and prototypes are this model's features
            diffs = [
                f"{k}: saved {saved_backbone.get(k)!r}, here {v!r}"
                for k, v in backbone.items()
                if saved_backbone.get(k) != v
            ]
            if diffs:
                raise ValueError(f"{path}: written for another model: {'; '.join(diffs)}")
        out_dim, in_dim = gradient_shape(self.linear)
        if tensors["projection"].shape[1] != out_dim * in_dim:  # the copy below was a RuntimeError on sizes
            raise ValueError(
                f"{path}: saved for a {self.layer} gradient of {tensors['projection'].shape[1]} values, this model's "
                f"has {out_dim * in_dim}: the state belongs to another model (model / model_kwargs)"
            )
        self.seed = int(meta["seed"])
        self.embed_dim = None
        self.objectives = nn.ModuleDict()
        self.build(int(meta["embed_dim"]))
        for name, obj in self.objectives.items():  # buffers sized by the training set: negatives, prototypes
            for key, _ in obj.named_buffers(recurse=False):
                setattr(obj, key, tensors[f"objectives.{name}.{key}"].to(self.device))
        self.objectives.load_state_dict(
            {k[len("objectives.") :]: v for k, v in tensors.items() if k.startswith("objectives.")}
        )
        self.projection.copy_(tensors["projection"])
        self._dense = None
        return self

    def extra_repr(self) -> str:
        """Layer, objectives, seed and embedding size for the module's repr."""
        return f"layer={self.layer!r}, objectives={self.objective_names}, seed={self.seed}, embed_dim={self.embed_dim}"
