"""Build a FrozenVLM by name: real checkpoints (Hugging Face id or local path) or tiny random models for CPU tests.

Names: `tiny-blip2`, `tiny-llava`, `tiny-paligemma` (random weights, word-level tokenizer built locally from the
codec vocabulary and the class names), anything else is `from_pretrained` with `kind` in blip2 | llava | paligemma,
or an OpenFlamingo checkpoint with kind `openflamingo` (needs the optional `open_flamingo` package).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from funai_common.weights import load_state_dict

from .boxes import GridCodec
from .prompts import eval_prompt, training_text
from .vlm import HALF, IMAGE_TOKEN, FrozenVLM

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", IMAGE_TOKEN, "<|endofchunk|>")
RELATIVE_WORDS = ("left", "right", "top", "bottom", "middle", "center", "above", "below", "on", "the", "in", "front")


def word_tokenizer(names: Iterable[str], codec: GridCodec, extra_words: Sequence[str] = RELATIVE_WORDS):
    """A small byte-level word tokenizer (PreTrainedTokenizerFast) covering the prompts, names and box strings.

    Built offline: the vocabulary is every pre-token of the training sentences; BOS "</s>" is prepended like OPT.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    corpus = []
    all_cells = [[0, 0, i, i] for i in range(codec.grid)] + [
        [i, i, codec.grid - 1, codec.grid - 1] for i in range(codec.grid)
    ]
    for name in list(names) + list(extra_words):
        corpus.append(eval_prompt(name))
        for reconstruct in (True, False):
            corpus.append(training_text(name, codec.encode([0, 0, 1, 1]), ".", reconstruct))
    corpus += [" [" + ",".join(codec.vocabulary) + "]", " ." + " ".join(codec.vocabulary)]
    corpus += [training_text("x", codec.encode(c), ".", r) for c in all_cells for r in (True, False)]
    corpus += [" " + w for w in extra_words] + ["." + v for v in codec.vocabulary]
    # texts ending in a bare end token (BLIP-2, no period); appended last so that earlier ids stay put
    corpus += [training_text("x", codec.encode(c), "", r) for c in all_cells for r in (True, False)]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for text in corpus:
        for piece, _ in pre.pre_tokenize_str(text):
            vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=[IMAGE_TOKEN, "<|endofchunk|>"],
    )


def tiny_blip2(tokenizer, image_size: int = 224, patch_size: int = 14, width: int = 32, query_tokens: int = 8):
    """A randomly initialised Blip2ForConditionalGeneration small enough for CPU tests (OPT language model)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    vision = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        initializer_range=0.02,  # the config default 1e-10 (a checkpoint convention) would make the tower output ~0
    )
    qformer = dict(
        hidden_size=width,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * width,
        encoder_hidden_size=width,
        vocab_size=64,
        max_position_embeddings=64,
        initializer_range=0.1,  # at 0.02 the image moves the tiny Q-Former's output by ~0.2 %: the VLM is blind
    )
    text = dict(
        model_type="opt",
        vocab_size=len(tokenizer),
        hidden_size=2 * width,
        word_embed_proj_dim=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        ffn_dim=4 * width,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():  # transformers zero-initialises the queries (identical queries); LAVIS draws N(0, 0.02)
        model.query_tokens.normal_(0.0, 0.02)
    return model


def tiny_llava(tokenizer, image_size: int = 56, patch_size: int = 14, width: int = 32):
    """A randomly initialised LlavaForConditionalGeneration (CLIP vision + Llama) for CPU tests."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=width,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2 * width,
        intermediate_size=4 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config)


def tiny_paligemma(tokenizer, image_size: int = 56, patch_size: int = 14, width: int = 32):
    """A randomly initialised PaliGemmaForConditionalGeneration (SigLIP vision + Gemma) for CPU tests."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration, SiglipVisionConfig

    num_tokens = (image_size // patch_size) ** 2
    vision = SiglipVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=2 * width,
        num_image_tokens=num_tokens,
    )
    text = GemmaConfig(
        vocab_size=len(tokenizer),
        hidden_size=2 * width,
        intermediate_size=4 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=width,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projection_dim=2 * width,
    )
    return PaliGemmaForConditionalGeneration(config)


def _wrap(model, tokenizer, kind: str, image_size: int) -> FrozenVLM:
    """Read token counts and widths from a transformers model's config."""
    cfg = model.config
    vcfg = cfg.vision_config
    patches = (image_size // vcfg.patch_size) ** 2
    if kind == "blip2":
        return FrozenVLM(
            model,
            tokenizer,
            kind,
            image_size,
            patches + 1,
            vcfg.hidden_size,
            cfg.image_token_index,
            cfg.num_query_tokens,
            tokenizer.eos_token,
            interpolate_pos_encoding=image_size != vcfg.image_size,
        )
    if kind == "llava":
        n = patches + (1 if cfg.vision_feature_select_strategy == "full" else 0)
        return FrozenVLM(
            model,
            tokenizer,
            kind,
            image_size,
            n,
            vcfg.hidden_size,
            cfg.image_token_index,
            n,
            tokenizer.eos_token,
            image_after_bos=True,
        )
    if kind == "paligemma":
        return FrozenVLM(
            model,
            tokenizer,
            kind,
            image_size,
            patches,
            vcfg.hidden_size,
            cfg.image_token_index,
            patches,
            tokenizer.eos_token,
            mean=HALF,
            std=HALF,
        )
    raise ValueError(f"unknown VLM kind {kind!r}; expected blip2, llava, paligemma or openflamingo")


TINY = {"tiny-blip2": ("blip2", tiny_blip2, 224), "tiny-llava": ("llava", tiny_llava, 56)}
TINY["tiny-paligemma"] = ("paligemma", tiny_paligemma, 56)


def build_vlm(
    name: str,
    kind: str = "blip2",
    class_names: Iterable[str] = (),
    codec: GridCodec | None = None,
    dtype: str = "float32",
    seed: int = 0,
    image_size: int | None = None,
    tiny_options: dict | None = None,
) -> FrozenVLM:
    """Load (or, for `tiny-*`, build with random weights) and freeze a VLM; see the module docstring for names.

    `tiny_options` go to the tiny builder (patch_size, width, ...)."""
    codec = codec or GridCodec()
    if name in TINY:
        kind, builder, default_size = TINY[name]
        size = image_size or default_size
        tokenizer = word_tokenizer(class_names, codec)
        torch.manual_seed(seed)
        model = builder(tokenizer, image_size=size, **(tiny_options or {}))
        return _wrap(model, tokenizer, kind, size).freeze()
    torch_dtype = getattr(torch, dtype)
    if kind == "openflamingo":
        return _load_openflamingo(name, torch_dtype)
    from transformers import AutoTokenizer

    classes = {"blip2": "Blip2ForConditionalGeneration", "llava": "LlavaForConditionalGeneration"}
    classes["paligemma"] = "PaliGemmaForConditionalGeneration"
    if kind not in classes:
        raise ValueError(f"unknown VLM kind {kind!r}; expected one of {sorted(classes)} or openflamingo")
    import transformers

    try:
        model = getattr(transformers, classes[kind]).from_pretrained(name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as err:  # a missing folder, a misspelt id, or offline without a cached copy: one line, not a trace
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise FileNotFoundError(
            f"model.name={name!r} is neither a local checkpoint folder nor a Hugging Face id available here ({reason})"
        ) from err
    if kind == "blip2" and model.config.image_token_index is None:
        raise ValueError(f"{name}: BLIP-2 config has no image_token_index; use a checkpoint revision that has one")
    size = image_size or model.config.vision_config.image_size
    return _wrap(model, tokenizer, kind, size).freeze()


def _load_openflamingo(name: str, dtype: torch.dtype) -> FrozenVLM:
    """OpenFlamingo-3B (ViT-L/14 + MPT-1B) with `name` a local checkpoint.pt (needs the `open_flamingo` package)."""
    try:
        from open_flamingo import create_model_and_transforms
    except ImportError as err:
        raise ImportError(
            "kind=openflamingo needs the optional package: pip install 'funai-pin[openflamingo]'"
        ) from err
    model, _, tokenizer = create_model_and_transforms(
        clip_vision_encoder_path="ViT-L-14",
        clip_vision_encoder_pretrained="openai",
        lang_encoder_path="anas-awadalla/mpt-1b-redpajama-200b-dolly",
        tokenizer_path="anas-awadalla/mpt-1b-redpajama-200b-dolly",
        cross_attn_every_n_layers=1,
    )
    model.load_state_dict(load_state_dict(name), strict=False)
    model.to(dtype)
    vlm = FrozenVLM(model, tokenizer, "openflamingo", 224, 256, 1024, None, 0, "<|endofchunk|>")
    return vlm.freeze()
