"""SAELens's side of the interoperability test (tests/tests/saelens.rs).

  make OUT        SAELens builds, randomises and saves one SAE per architecture under OUT/<arch>/,
                  with inputs and SAELens's own encodings in OUT/<arch>/expected.safetensors.
  encode DIR X O  SAELens loads the SAE folder DIR (written by mechwatch), encodes the rows of
                  tensor "x" in X and writes "feats" and "recon" to O.
"""
import sys

import torch
from safetensors.torch import load_file, save_file
import sae_lens
from sae_lens import (
    SAE,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
)

D_IN, D_SAE = 64, 256


def randomise(sae):
    with torch.no_grad():
        for name, p in sorted(sae.named_parameters()):
            if name == "threshold":
                p.copy_(torch.rand_like(p) * 0.5)
            elif name.startswith("b_") or name == "r_mag":
                p.copy_(torch.randn_like(p) * 0.1)
            else:
                p.copy_(torch.randn_like(p) / D_IN**0.5)


def make(out):
    torch.manual_seed(0)
    saes = {
        "standard": StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE)),
        "standard_norm": StandardSAE(
            StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations="constant_norm_rescale")
        ),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE)),
        "topk": TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=12)),
        "gated": GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE)),
    }
    for name, sae in saes.items():
        randomise(sae)
        sae.save_model(f"{out}/{name}")
    # BatchTopK is trained as such and saved for inference as JumpReLU with one threshold.
    btk = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=12))
    randomise(btk)
    btk.topk_threshold.fill_(0.3)
    btk.save_inference_model(f"{out}/batchtopk")
    x = torch.randn(40, D_IN) * 3
    for name in list(saes) + ["batchtopk"]:
        sae = SAE.load_from_disk(f"{out}/{name}", device="cpu")
        with torch.no_grad():
            feats = sae.encode(x)
            recon = sae.decode(feats)
        save_file({"x": x, "feats": feats, "recon": recon}, f"{out}/{name}/expected.safetensors")
        print(name, type(sae).__name__, "active per row", (feats > 0).sum(-1).float().mean().item())


def encode(sae_dir, x_path, out):
    sae = SAE.load_from_disk(sae_dir, device="cpu")
    x = load_file(x_path)["x"]
    with torch.no_grad():
        feats = sae.encode(x)
        recon = sae.decode(feats)
    save_file({"feats": feats.contiguous(), "recon": recon.contiguous()}, out)
    print(type(sae).__name__, "sae_lens", sae_lens.__version__)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    elif sys.argv[1] == "encode":
        encode(*sys.argv[2:5])
    else:
        sys.exit(f"unknown mode {sys.argv[1]}")
