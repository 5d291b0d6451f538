"""What limits layer 1's focus: the network's capacity or what it is taught?

Layer 1 cannot tell tumour from its mimics on the synthetic cohort (by construction), so the best its top-K
can do is to rank suspicious tissue (tumour or mimic) above normal tissue. This probe trains a preset's
layer 1 alone as a per-patch detector on a cohort's training fields of view (read as the bundle reads
them: ``LoadLayer1d``), with a linear head on its patch embeddings, under random quarter turns, and reports
on held-out slides how well the patches are ranked. The targets:

- ``tumour``: each tissue patch's annotation label (tumour overlap of at least ``--label-overlap``), what
  ``L_ann`` teaches ``q`` in training;
- ``jointX``: the same beside layer 1's slide classification (``L_cls[1]``, cross-entropy of each field's
  label: an annotated field without tumour is negative), the detector's loss weighted X against it (the
  default recipe's weight on ``L_ann`` is ``lambda_bwd`` = 0.1 against ``lambda_fwd`` = 1 on ``L_cls``:
  ``joint0.1``);
- ``suspicious``: tumour or mimic (only a synthetic cohort's ``Mimic`` polygons give it): the detector a
  mimic-blind layer 1 could at best become.

Reported per target and seed, on the held-out tissue patches: the AUC of suspicious against normal tissue,
of tumour against normal tissue and of tumour against mimic, and on the held-out positive slides the hit
rate of the plain top-K over all of a slide's fields (some pick on tumour), beside the bound of a perfect
mimic-blind detector (its K picks drawn among the suspicious patches; ``hit_probability``).

    python scripts/probe_layer1_focus.py --train c40/datalist.json --test c20/datalist.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_roc_auc

from smt_monai.benchmark.focus_diagnostic import CATEGORIES, hit_probability, patch_categories
from smt_monai.data.annotations import MIMIC_NAMES, AnnotationOverlap
from smt_monai.data.datalist import load_datalist
from smt_monai.data.dataset import LoadLayer1d
from smt_monai.data.magnification import LayerScale
from smt_monai.engines.focus_outcome import MIMIC as MIMIC_CLASS
from smt_monai.engines.focus_outcome import TUMOUR as TUMOUR_CLASS
from smt_monai.engines.focus_outcome import SlidePatches
from smt_monai.networks import SMT
from smt_monai.networks.normalization import normalize_he

NORMAL, MIMIC, TUMOUR = (CATEGORIES.index(name) for name in ("normal", "mimic", "tumour"))


class Fields(NamedTuple):
    """Layer-1 inputs of a split: ``images`` ``(F, 3, s, s)`` uint8, ``codes`` ``(F, grid**2)`` (the
    ``CATEGORIES`` of ``patch_categories``), ``tissue`` ``(F, grid**2)`` bool, ``slide`` ``(F,)`` and
    ``label`` ``(F,)`` its slide's index and label."""

    images: torch.Tensor
    codes: torch.Tensor
    tissue: torch.Tensor
    slide: np.ndarray
    label: np.ndarray


def network(args: argparse.Namespace) -> SMT:
    return SMT(preset=args.preset, grid=args.grid, patch_size=args.patch_size, layer3_mpp=args.layer3_mpp)


def read_fields(datalist: Path, split: str, args: argparse.Namespace) -> Fields:
    """Every field of view of the split's annotated slides, with the category of each patch
    (``SlidePatches`` and ``patch_categories``, as the focus diagnostic judges picks)."""
    loader = LoadLayer1d(LayerScale.of(network(args)))
    overlaps = {TUMOUR_CLASS: AnnotationOverlap(), MIMIC_CLASS: AnnotationOverlap(MIMIC_NAMES)}
    images, codes, tissue, slides, labels = [], [], [], [], []
    entries = [e for e in load_datalist(datalist, split, str(datalist.parent)) if e.get("annotation")]
    for index, entry in enumerate(entries):
        view = loader(entry)
        if view["error"]:
            raise SystemExit(f"{entry['image']}: {view['error']}")
        annotations = {name: o.annotation(str(entry["annotation"])) for name, o in overlaps.items()}
        fields = view["image"].permute(0, 2, 3, 1).numpy()
        patches = SlidePatches.of(fields, view["box"].numpy(), args.grid, annotations)
        count = len(view["box"])
        images.append(view["image"])
        codes.append(torch.as_tensor(patch_categories(patches, 0, args.label_overlap).reshape(count, -1)))
        tissue.append(torch.as_tensor(patches.tissue[0].reshape(count, -1)))
        slides += [index] * count
        labels += [int(entry["label"])] * count
    return Fields(torch.cat(images), torch.cat(codes), torch.cat(tissue), np.array(slides), np.array(labels))


def train_detector(
    fields: Fields, target: str, args: argparse.Namespace, seed: int
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Layer 1 and a linear head on its patch embeddings, trained on ``target`` (see the module docstring)."""
    torch.manual_seed(seed)
    layer = network(args).layer1
    head = torch.nn.Linear(layer.head.in_features, 1)
    optimizer = torch.optim.AdamW([*layer.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.05)
    weight = float(target[len("joint") :]) if target.startswith("joint") else None
    grid = args.grid
    for _ in range(args.epochs):
        for rows in torch.randperm(len(fields.images)).split(args.batch_size):
            turns = int(torch.randint(4, ()))
            out = layer(torch.rot90(normalize_he(fields.images[rows]), turns, (2, 3)))
            embeddings = out.patch_embeddings.unflatten(1, (grid, grid))
            logits = head(torch.rot90(embeddings, -turns, (1, 2)).flatten(1, 2)).squeeze(-1)
            codes, tissue = fields.codes[rows], fields.tissue[rows].float()
            positive = (codes > NORMAL) if target == "suspicious" else (codes == TUMOUR)
            terms = F.binary_cross_entropy_with_logits(logits, positive.float(), reduction="none")
            loss = (terms * tissue).sum() / tissue.sum().clamp(min=1)
            if weight is not None:
                loss = weight * loss + F.cross_entropy(out.logits, (codes == TUMOUR).any(1).long())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return layer, head


@torch.no_grad()
def measure(layer: torch.nn.Module, head: torch.nn.Module, fields: Fields, k: int) -> dict[str, float]:
    """Patch AUCs on tissue patches and the top-``k`` hit rate on positive slides, with its bound."""
    layer.eval()
    scores = torch.cat(
        [head(layer(normalize_he(chunk)).patch_embeddings).squeeze(-1) for chunk in fields.images.split(32)]
    ).numpy()
    codes, tissue = fields.codes.numpy(), fields.tissue.numpy()

    def auc(positive: np.ndarray, negative: np.ndarray) -> float:
        keep = tissue & (positive | negative)
        if positive[keep].all() or not positive[keep].any():
            return float("nan")
        truth = torch.as_tensor(positive[keep], dtype=torch.float)
        return float(compute_roc_auc(torch.as_tensor(scores[keep]), truth))

    hits, bound = [], []
    for slide in np.unique(fields.slide[fields.label > 0]):
        rows = fields.slide == slide
        ranked = np.where(tissue[rows], scores[rows], -np.inf).ravel()
        slide_codes, slide_tissue = codes[rows].ravel(), tissue[rows].ravel()
        hits.append(bool((slide_codes[np.argsort(-ranked)[:k]] == TUMOUR).any()))
        on_tumour = int(((slide_codes == TUMOUR) & slide_tissue).sum())
        bound.append(hit_probability(on_tumour, int(((slide_codes == MIMIC) & slide_tissue).sum()), k))
    return {
        "suspicious_vs_normal_auc": auc(codes > NORMAL, codes == NORMAL),
        "tumour_vs_normal_auc": auc(codes == TUMOUR, codes == NORMAL),
        "tumour_vs_mimic_auc": auc(codes == TUMOUR, codes == MIMIC),
        "hit_rate": float(np.mean(hits)) if hits else float("nan"),
        "mimic_blind_bound": float(np.mean(bound)) if bound else float("nan"),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="datalist whose training split trains")
    parser.add_argument("--test", type=Path, required=True, help="datalist whose testing split is measured")
    parser.add_argument("--targets", nargs="+", default=["tumour", "joint1", "joint0.1", "suspicious"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--label-overlap", type=float, default=0.01, help="layer-2 regions' (train.yaml)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--layer3-mpp", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, test = read_fields(args.train, "training", args), read_fields(args.test, "testing", args)
    results = []
    for target in args.targets:
        for seed in args.seeds:
            figures = measure(*train_detector(train, target, args, seed), test, args.k)
            results.append({"target": target, "seed": seed, **figures})
            print(json.dumps(results[-1]), flush=True)
    if args.json:
        settings = {
            key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()
        }
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
