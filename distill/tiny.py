"""The tiny SDXL pipeline: the project's embedded default teacher for CPU tests and demos.

Every component has SDXL-Base-1.0's structure at toy widths, with seeded random weights, so the whole pipeline
(two CLIP text encoders, tokenizers, VAE, U-Net, Euler scheduler) loads with
`StableDiffusionXLPipeline.from_pretrained(folder)` and samples a 64x64 image in about a second on a CPU.
Nothing is downloaded: the tokenizer's vocabulary and merges are written here.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from distill.files import widen_to_umask
from distill.students import sdxl_base_unet_config
from distill.teachers import SDXL_SCHEDULER_CONFIG, pipeline_folder_problem

TINY_DIR_ENV = "KOALA_TINY_DIR"  # overrides default_tiny_pipeline_dir()
TEXT_HIDDEN = 32  # width of each tiny text encoder; the U-Net's cross-attention sees both, concatenated
TEXT_LAYERS = 2
TEXT_HEADS = 4
TEXT_FFN = 64  # MLP width inside each CLIP layer
POOLED_DIM = 32  # text_encoder_2's projection_dim: the pooled embedding the U-Net gets as "text_embeds"
TIME_EMBED_DIM = 8  # addition_time_embed_dim: sinusoidal width of each of the 6 SDXL size/crop numbers
N_TIME_IDS = 6  # SDXL micro-conditioning: original (h, w), crop (top, left), target (h, w)
MAX_TOKENS = 77  # CLIP's context length; the tokenizer fails to encode without it set explicitly
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
PAD_2 = "!"  # SDXL's tokenizer_2 pads with "!" (OpenCLIP's convention), tokenizer 1 with EOS
N_MERGES = 400  # BPE merges learned from _MERGE_CORPUS (more merges: shorter token sequences, larger vocab)

# SDXL rescales its latents to about unit std (scaling_factor 0.13025); the tiny VAE needs its own factor.
# Measured with `measure_vae_scaling_factor` on 7 photos shipped with scikit-image (astronaut, coffee,
# chelsea, rocket, immunohistochemistry, hubble_deep_field, retina), bicubic-resized to 64x64, mapped to
# [-1, 1] and encoded with latent_dist.sample() as SDXL training does: latent std 0.99 for seed 0 (0.99-1.08
# for seeds 0-3), so the factor is 1.0. The random encoder's posterior std is about 1 and dominates: the
# posterior means alone have std 0.21-0.29. tests/test_tiny_pipeline.py re-measures it.
VAE_SCALING_FACTOR = 1.0

# Common caption English; the tokenizer's merges are learned from it so captions need fewer tokens.
_MERGE_CORPUS = """
a photo of the an and with in on at by for from to of is are this that its it as over under near
picture image photograph painting drawing illustration render portrait landscape closeup close up view
man woman person people child children girl boy dog cat bird horse cow sheep car bus train street road city
house building tree trees forest mountain mountains river lake sea ocean beach sky clouds sun sunset sunrise
night light dark red blue green yellow white black orange purple pink brown gray grey gold silver colorful
small large big little old young beautiful detailed high quality realistic style art digital oil watercolor
standing sitting walking running playing holding wearing looking background foreground table chair room
window door water snow rain field grass flowers flower garden food plate bowl cup coffee bread fruit apple
shirt dress hat glasses hair face eyes smiling happy together group two three several many one top front side
the the the a a a of of of and and in in with with on on photo photo an image
"""


def tiny_unet_config() -> dict[str, Any]:
    """SDXL-Base's U-Net config at toy widths (about 4.5M parameters, latent 32x32 -> 64x64 images)."""
    cfg = sdxl_base_unet_config()
    cfg.update(
        block_out_channels=[32, 64, 128],
        layers_per_block=2,
        transformer_layers_per_block=[1, 2, 4],
        attention_head_dim=[2, 4, 8],  # diffusers' legacy name: the number of heads per stage
        norm_num_groups=8,
        cross_attention_dim=2 * TEXT_HIDDEN,
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=POOLED_DIM + N_TIME_IDS * TIME_EMBED_DIM,
        sample_size=32,
    )
    return cfg


def default_tiny_pipeline_dir() -> Path:
    """Where the project caches the tiny pipeline: $KOALA_TINY_DIR, else <repo>/outputs/tiny_sdxl."""
    env = os.environ.get(TINY_DIR_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "outputs" / "tiny_sdxl"


def is_complete_pipeline(folder: str | Path) -> bool:
    """True when `folder` holds model_index.json and every SDXL component's config and weights."""
    return pipeline_folder_problem(folder) is None


# ------------------------------------------------------------------------------------------------ tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _learn_merges(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned greedily from a word list, CLIP-style (the last symbol carries "</w>")."""
    counts = collections.Counter(words)
    seqs = {w: [*w[:-1], w[-1] + "</w>"] for w in counts}
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:], strict=False):
                pairs[(a, b)] += counts[w]
        if not pairs:
            break
        # Highest count first; ties broken alphabetically so the result does not depend on dict order.
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def tiny_vocab_and_merges(n_merges: int = N_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary layout at toy size: 256 byte symbols, their "</w>" forms, merges, BOS, EOS."""
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = _learn_merges(_MERGE_CORPUS.split(), n_merges)
    tokens += [a + b for a, b in merges]
    tokens += [BOS, EOS]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def write_tokenizer_files(folder: str | Path, n_merges: int = N_MERGES) -> Path:
    """Write vocab.json and merges.txt (CLIP's file formats) into `folder`; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tiny_vocab_and_merges(n_merges)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    # CLIPTokenizer skips the first line of merges.txt (a version header).
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return folder


def _tokenizer(files: Path, pad_token: str) -> CLIPTokenizer:
    return CLIPTokenizer(
        vocab=str(files / "vocab.json"),
        merges=str(files / "merges.txt"),
        pad_token=pad_token,
        model_max_length=MAX_TOKENS,
    )


# ------------------------------------------------------------------------------------------------- components


def _text_config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=TEXT_FFN,
        projection_dim=POOLED_DIM,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=TEXT_HEADS,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the pooled embedding is read at the first EOS
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_vae(scaling_factor: float = VAE_SCALING_FACTOR) -> AutoencoderKL:
    """A 2-block AutoencoderKL: 3 -> 4 channels, spatial factor 2 (64px image <-> 32px latent)."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        force_upcast=True,
    )


def tiny_components(seed: int = 0, tokenizer_files: str | Path | None = None) -> dict[str, Any]:
    """All seven SDXL pipeline components with seeded random weights (same seed -> identical weights)."""
    with tempfile.TemporaryDirectory() as tmp:
        files = write_tokenizer_files(tokenizer_files or tmp)
        tokenizer = _tokenizer(files, EOS)
        tokenizer_2 = _tokenizer(files, PAD_2)
    # Each model gets its own seed so that changing one component's shape leaves the others' weights alone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config())
        torch.manual_seed(seed + 1)
        vae = tiny_vae()
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(_text_config(tokenizer))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2))
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    )


def build_tiny_pipeline(folder: str | Path, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny SDXL pipeline to `folder` (save_pretrained layout) and return the folder.

    Idempotent: a folder that already holds a complete pipeline is returned untouched unless `overwrite`. The
    pipeline is saved into a temporary sibling folder and renamed into place, so an interrupted build never
    leaves a folder that looks complete. If another process finishes first, its folder is kept.
    """
    folder = Path(folder)
    if is_complete_pipeline(folder) and not overwrite:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tokenizer_files = write_tokenizer_files(tmp / "_tokenizer_src")
        pipe = StableDiffusionXLPipeline(**tiny_components(seed, tokenizer_files))
        pipe.save_pretrained(tmp)
        # tokenizer.json is what transformers 5 saves; the source files keep older loaders working too.
        for part in ("tokenizer", "tokenizer_2"):
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(tokenizer_files / name, tmp / part / name)
        shutil.rmtree(tokenizer_files)
        (tmp / "tiny_build.json").write_text(json.dumps({"seed": seed, "builder": "distill.tiny"}) + "\n")
        widen_to_umask(tmp)
        if folder.exists():
            if not overwrite and is_complete_pipeline(folder):  # another process won the race
                return folder
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            folder.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            tmp.rename(folder)
        except OSError:
            if not is_complete_pipeline(folder):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@torch.no_grad()
def measure_vae_scaling_factor(vae: AutoencoderKL, images: torch.Tensor, seed: int = 0) -> float:
    """1 / std of the VAE's sampled latents for images in [-1, 1], shape (B, 3, H, W)."""
    generator = torch.Generator().manual_seed(seed)
    latents = vae.encode(images.to(vae.dtype)).latent_dist.sample(generator)
    return float(1.0 / latents.float().std())
