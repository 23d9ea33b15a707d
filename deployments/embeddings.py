"""Textual-inversion embeddings for one run: added to both of SDXL's tokenizers and text encoders before it,
removed after it (diffusers' `load_textual_inversion` / `unload_textual_inversion`).

Tokens are never left in the vocabulary between runs: a later prompt that happens to contain `<s0>` reads
it as text, as it did before. An SDXL embedding file holds `clip_l` (the first encoder's vectors) and
`clip_g` (the second's), one row per token. Checks run before anything is added, so a refused embedding
changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import StableDiffusionXLPipeline

from deployments.adapter_files import Location, adapter_error


@dataclass(frozen=True)
class EmbeddingVectors:
    tokens: tuple[str, ...]
    clip_l: torch.Tensor
    clip_g: torch.Tensor
    loc: Location


def embedding_vectors(
    state_dict: dict[str, torch.Tensor], tokens: list[str], pipeline: StableDiffusionXLPipeline, loc: Location
) -> EmbeddingVectors:
    """The file's vectors for these tokens; a 422 for a file that is not an SDXL embedding for this model.
    More tokens than vectors: the first ones are used (fal's default names two)."""
    clip_l, clip_g = state_dict.get("clip_l"), state_dict.get("clip_g")
    if clip_l is None or clip_g is None:
        message = "an SDXL embedding holds clip_l and clip_g vectors; this file does not (one for another model?)"
        raise adapter_error(loc, "adapter_incompatible", message)
    widths = (pipeline.text_encoder.config.hidden_size, pipeline.text_encoder_2.config.hidden_size)
    if clip_l.ndim != 2 or clip_g.ndim != 2 or (clip_l.shape[1], clip_g.shape[1]) != widths:
        message = f"the embedding's vectors are not this model's widths ({widths[0]} and {widths[1]})"
        raise adapter_error(loc, "adapter_incompatible", message)
    if clip_l.shape[0] != clip_g.shape[0]:
        raise adapter_error(loc, "adapter_incompatible", "the embedding's clip_l and clip_g differ in length")
    vectors = clip_l.shape[0]
    if len(tokens) < vectors:
        message = f"the embedding has {vectors} vectors: name {vectors} tokens"
        raise adapter_error(loc[:-1] + ["tokens"], "value_error", message)
    return EmbeddingVectors(tuple(tokens[:vectors]), clip_l, clip_g, loc)


def add_tokens(pipeline: StableDiffusionXLPipeline, embeddings: list[EmbeddingVectors]) -> None:
    """Add every embedding's tokens to both tokenizers and text encoders; a 422 (and nothing added) for a token
    that is already in the vocabulary."""
    vocabularies = (pipeline.tokenizer.get_vocab(), pipeline.tokenizer_2.get_vocab())
    for embedding in embeddings:
        taken = [token for token in embedding.tokens if any(token in vocabulary for vocabulary in vocabularies)]
        if taken:
            message = f"{', '.join(taken)} already in the model's vocabulary: choose other tokens"
            raise adapter_error(embedding.loc[:-1] + ["tokens"], "token_in_vocabulary", message)
    try:
        for embedding in embeddings:
            for vectors, tokenizer, encoder in _encoders(pipeline, embedding):
                pipeline.load_textual_inversion(
                    vectors.to(encoder.dtype), token=list(embedding.tokens), tokenizer=tokenizer, text_encoder=encoder
                )
    except BaseException:
        remove_tokens(pipeline, embeddings)  # none of them was in the vocabulary before: take out what is there
        raise


def remove_tokens(pipeline: StableDiffusionXLPipeline, embeddings: list[EmbeddingVectors]) -> None:
    """Take the embeddings' tokens out again: only call it for tokens `add_tokens` added (it checked that none
    was in the vocabulary before)."""
    for embedding in embeddings:
        for _, tokenizer, encoder in _encoders(pipeline, embedding):
            present = [token for token in embedding.tokens if token in tokenizer.get_vocab()]
            if present:
                pipeline.unload_textual_inversion(present, tokenizer=tokenizer, text_encoder=encoder)


def _encoders(pipeline: StableDiffusionXLPipeline, embedding: EmbeddingVectors) -> list[tuple]:
    return [
        (embedding.clip_l, pipeline.tokenizer, pipeline.text_encoder),
        (embedding.clip_g, pipeline.tokenizer_2, pipeline.text_encoder_2),
    ]
