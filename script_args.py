"""Command-line flags shared by ``infer.py`` and ``save_latent.py``, and the choices ``latents.py`` uses too.
Standard library only: the scripts parse their arguments before importing torch, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse

LATENT_FORMATS = ("npy", "nii.gz", "pt")
NORMALISATIONS = ("none", "global", "channel")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def script_parser(description: str, output_dir: str) -> argparse.ArgumentParser:
    """A parser showing ``description`` (the script's docstring) as written, with the flags both scripts share
    (``--output_dir`` defaults to ``output_dir``)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model_checkpoint", required=True, help="best_model.pt / last.pt, or a MAISI state dict"
    )
    parser.add_argument("--output_dir", default=output_dir)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"])
    parser.add_argument("--batch_size", type=positive_int, default=2, help="volumes per forward pass")
    parser.add_argument(
        "--num_workers", type=int, default=2, help="DataLoader processes that preprocess volumes"
    )
    parser.add_argument("--seed", type=int, default=0, help="base seed of sampled latents")
    parser.add_argument(
        "--strict", action="store_true", help="inputs off the model's grid or not skull-stripped are errors"
    )
    maisi = parser.add_argument_group("MAISI state dict (a bare state dict carries no config)")
    maisi.add_argument("--maisi_channels", type=int, nargs="+", help="e.g. 64 128 256")
    maisi.add_argument("--maisi_num_res_blocks", type=int, nargs="+", help="e.g. 2 2 2")
    maisi.add_argument("--maisi_latent_channels", type=int, default=4)
    maisi.add_argument("--maisi_norm_num_groups", type=int, default=32)
    maisi.add_argument("--maisi_attention_levels", type=int, nargs="+", help="0/1 per level (default all 0)")
    return parser
