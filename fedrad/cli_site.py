"""`fedrad predict | evaluate | export`: a site uses the model its federation trained. Nothing is sent anywhere.

    fedrad predict  --model runs/demo --site-work runs/demo/sites/site-a --data new-patients --out preds
    fedrad evaluate --model runs/demo --site-work runs/demo/sites/site-a --data data/synthetic/site-a --split test --out ev
    fedrad export   --model runs/demo --site-work runs/demo/sites/site-a --data data/synthetic/site-a --format onnx --out m
    fedrad predict  --exported m --data new-patients --out preds        # from the exported model + its card

The run folder is read as files (`global.npz`/`global.json`, `report.json`'s π_train); the site's
part comes from its own work folder (`fedrad.client.site_model`). This module only wires: it stands
above both roles because it reads the coordinator's saved global model.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("fedrad")
EXAMPLES = {
    "predict": "examples:\n  fedrad predict --model runs/demo --site-work runs/demo/sites/site-a "
               "--data data/synthetic/site-a --out runs/demo/predict-a\n"
               "  fedrad predict --model runs/demo --bn adabn --data new-hospital --out preds --explain\n"
               "  fedrad predict --exported runs/demo/export-a --data data/synthetic/site-a --out preds-onnx",
    "evaluate": "examples:\n  fedrad evaluate --model runs/demo --site-work runs/demo/sites/site-a "
                "--data data/synthetic/site-a --split test --out runs/demo/evaluate-a\n"
                "  fedrad evaluate --exported runs/demo/export-a --data data/synthetic/site-a --split test --out ev",
    "export": "example:\n  fedrad export --model runs/demo --site-work runs/demo/sites/site-a "
              "--data data/synthetic/site-a --format onnx --out runs/demo/export-a",
}


def load_run(folder: Path) -> Any:
    """The run folder's global model (+ π_train from report.json) as a `RunModel`; clear errors."""
    from fedrad.client.site_model import RunModel
    from fedrad.server.global_model import load_global_model

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"run folder {folder} not found; give the --out folder of fedrad simulate (or the "
                                "coordinator's out-dir), which holds global.npz and global.json.")
    glob = load_global_model(folder)
    prior = None
    if (folder / "report.json").is_file():
        prior = json.loads((folder / "report.json").read_text()).get("prior_train")
    return RunModel(folder, glob.run_id, glob.server_round, dict(glob.config), glob.shared, glob.bn_pooled,
                    None if prior is None else float(prior))


@dataclass
class Scorer:
    """What scores a folder: CNN inputs -> (logits, features), the corrections, the card to write."""

    preprocessor: Any
    outputs: Any
    posteriors: Any
    card: dict[str, Any]
    folder: Any  # the data folder, read once
    site: Any = None  # the torch SiteModel (None when scoring from an exported graph)


def build_scorer(args: argparse.Namespace, *, survival_ok: bool = True) -> Scorer:
    """Assemble the site's model from a run (or an exported folder) and read the data folder once.

    A `task = survival` run reads the folder on time + event and gets a survival card
    (`fedrad.client.survival_predict`); `survival_ok = False` (export) refuses it first.
    """
    from fedrad.client.export import exported_outputs, find_exported, sha256_of
    from fedrad.client.model_card import (
        build_card,
        intensity_map,
        posteriors_from_card,
        preprocessor_from_card,
        read_card,
    )
    from fedrad.client.predict import read_site_folder
    from fedrad.client.site_model import assemble, check_scorable
    from fedrad.common.config import RunConfig
    from fedrad.common.preprocess import Preprocessor

    if getattr(args, "exported", None) is not None:
        graph = find_exported(args.exported)
        card = read_card(args.exported)
        preprocessor = preprocessor_from_card(card)
        folder = read_site_folder(args.data, preprocessor)
        card = {**card, "model_sha256": sha256_of(graph), "scored_with": f"{graph.name} (exported)",
                "decision": {"threshold": args.threshold, "on": args.decide_on}}
        return Scorer(preprocessor, exported_outputs(graph), posteriors_from_card(card, args.exported), card, folder)
    if args.model is None:
        raise ValueError("give --model RUN_DIR (the run folder) or --exported DIR (a fedrad export folder).")
    run = load_run(args.model)
    bn = args.bn or ("site" if args.site_work is not None else None)
    if bn is None:
        raise ValueError("give --site-work DIR (the site's own work folder from the run) or, for a site that never "
                         "trained, --bn pooled or --bn adabn.")
    if bn != "site" and args.site_work is not None:
        raise ValueError(f"--bn {bn} is for a site that never trained: leave out --site-work.")
    cfg = RunConfig.from_run_config(run.config)
    check_scorable(cfg, run.folder, survival_ok=survival_ok)  # before any file is read
    site_name = args.site or Path(args.site_work if args.site_work is not None else args.data or "site").name
    match = intensity_map(cfg, run.folder, args.site_work, args.data, site=site_name)
    preprocessor = Preprocessor(spacing_mm=cfg.spacing_mm, fov_mm=cfg.fov_mm, slice_mode=cfg.slice_mode,
                                slab_mm=cfg.slab_mm, intensity_map=match,  # series rows cut as the run cut them
                                target="survival" if cfg.task == "survival" else "label")
    folder = read_site_folder(args.data, preprocessor) if args.data is not None else None
    if folder is None and bn == "adabn":
        raise ValueError("--bn adabn re-estimates BatchNorm on the site's images: give --data.")
    site = assemble(run, work=args.site_work, bn=bn, adapt_images=folder.all_images() if bn == "adabn" else None,
                    site=site_name)
    card = build_card(site, preprocessor, threshold=args.threshold, decide_on=args.decide_on,
                      model_sha256=site.sha256())
    if cfg.task == "survival":
        from fedrad.client.survival_predict import survival_card

        card = survival_card(card, site)
    return Scorer(preprocessor, site.outputs, site.posteriors, card, folder, site)


def _score_survival(scorer: Scorer, args: argparse.Namespace, split: str) -> tuple[Any, Any]:
    """A survival run: every image's risk (the training rows give the risk-group cut), `split`'s written."""
    from fedrad.client.model_card import write_card
    from fedrad.client.survival_predict import score_risks, write_risks

    if getattr(args, "explain", False):
        raise ValueError("--explain (Grad-CAM of the malignancy logit) is for classification runs; this run is "
                         "task = survival.")
    everything = score_risks(scorer.site, scorer.folder)
    scored = everything.only(split, scorer.folder.data.name)
    write_risks(args.out, scored, model_sha256=scorer.card["model_sha256"])
    write_card(scorer.card, args.out)
    return everything, scored


def _score(scorer: Scorer, args: argparse.Namespace, split: str) -> Any:
    from fedrad.client.predict import score_folder, write_predictions
    from fedrad.client.model_card import write_card

    scored = score_folder(scorer.folder, scorer.outputs, scorer.posteriors, split=split)
    prior = scorer.card["prior"]["p_malignant"]
    write_predictions(args.out, scored, threshold=args.threshold, decide_on=args.decide_on,
                      prior=scorer.card["prior_train"] if prior is None else prior,
                      model_sha256=scorer.card["model_sha256"])
    write_card(scorer.card, args.out)
    return scored


def _is_survival(scorer: Scorer) -> bool:
    """A task = survival run's scorer (its card says so; an exported model never is: export refuses those)."""
    return scorer.card.get("task") == "survival"


def cmd_predict(args: argparse.Namespace) -> int:
    from rich.console import Console

    scorer = build_scorer(args)
    if _is_survival(scorer):
        _, scored = _score_survival(scorer, args, args.split)
        groups = "" if np.isnan(scored.cut) else (f"; {int(np.sum(scored.risk > scored.cut))} high-risk (above the "
                                                  f"median training risk {scored.cut:.3g})")
        Console().print(f"{len(scored.images)} images scored (log hazard ratio), {len(scored.skipped)} skipped"
                        f"{groups}; model {scorer.card['model_sha256'][:12]} (run {scorer.card['run_id']}, "
                        f"{scorer.card['batchnorm']}); written: {args.out / 'predictions.csv'}, "
                        f"{args.out / 'model-card.json'}", soft_wrap=True)
        return 0
    scored = _score(scorer, args, args.split)
    console = Console()
    console.print(f"{len(scored.images)} images scored, {len(scored.skipped)} skipped; "
                  f"model {scorer.card['model_sha256'][:12]} (run {scorer.card['run_id']}, {scorer.card['batchnorm']})")
    if args.explain:
        from fedrad.client.gradcam import gradcam_maps, write_overlays

        if scorer.site is None:
            raise ValueError("--explain needs the torch model: use --model/--site-work, not --exported.")
        maps = gradcam_maps(scorer.site.model, scored.x, layer=args.layer)
        write_overlays(args.out, scored.images, scored.x, maps, scored.probabilities["probability_corrected"],
                       layer=args.layer)
        console.print(f"Grad-CAM ({args.layer}): {len(maps)} overlays in {args.out / 'gradcam'}", soft_wrap=True)
    console.print(f"written: {args.out / 'predictions.csv'}, {args.out / 'model-card.json'}", soft_wrap=True)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedrad.client.predict import decision_column
    from fedrad.client.site_evaluation import evaluate_scores, reliability_diagram, write_evaluation

    scorer = build_scorer(args)
    if _is_survival(scorer):
        from fedrad.client.survival_predict import evaluate_risks, write_survival_evaluation

        everything, _ = _score_survival(scorer, args, args.split)
        result = {**evaluate_risks(everything, args.split), "run_id": scorer.card["run_id"],
                  "model_sha256": scorer.card["model_sha256"]}
        write_survival_evaluation(args.out, result, scorer.card, everything, args.split)
        c = "–" if result["c_index"] is None else f"{result['c_index']:.4f}"
        Console().print(f"C-index {c} on {result['n_images']} images ({result['n_events']} events); written: "
                        f"{args.out / 'evaluate.json'}, {args.out / 'evaluate.md'}", soft_wrap=True)
        return 0
    scored = _score(scorer, args, args.split)
    labelled = scored.labels >= 0
    if not labelled.any():
        raise ValueError(f"{args.data}: no labelled image in split {args.split!r}; evaluate needs labels "
                         "(predict scores unlabelled images).")
    probs = {k: v[labelled] for k, v in scored.probabilities.items()}
    column = decision_column(probs, args.decide_on)
    y = scored.labels[labelled]
    result = {"split": args.split, **evaluate_scores(y, probs, probs[column] >= args.threshold,
                                                     [p for p, keep in zip(scored.patients, labelled) if keep],
                                                     threshold=args.threshold, decision_on=column),
              "run_id": scorer.card["run_id"], "model_sha256": scorer.card["model_sha256"]}
    write_evaluation(args.out, result, scorer.card)
    reliability_diagram(y, probs, args.out / "reliability.png",
                        title=f"{scorer.card.get('site') or 'site'} · {args.split} · {int(labelled.sum())} images")
    ci = result["auc_ci95"]
    auc = "–" if result["auc"] is None else f"{result['auc']:.4f}"
    Console().print(f"AUC {auc} (95% CI {'–' if ci is None else f'{ci[0]:.3f}–{ci[1]:.3f}'}), ECE {result['ece']:.3f}, "
                    f"Brier {result['brier']:.3f}; written: {args.out / 'evaluate.json'}, {args.out / 'evaluate.md'}",
                    soft_wrap=True)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedrad.client.export import export_model, sha256_of
    from fedrad.client.model_card import write_card

    args.exported = None
    scorer = build_scorer(args, survival_ok=False)
    size = scorer.preprocessor.size
    if scorer.folder is None:  # no images given: a seeded random batch of the input's shape
        example = np.random.default_rng(0).normal(size=(4, 3, size, size)).astype(np.float32)
    else:
        data = scorer.folder.data
        example = np.concatenate([data.x_test, data.x_train, data.x_unlabelled])[:8]
        if len(example) == 0:
            raise ValueError(f"{args.data}: no readable image to trace the export with.")
    path = export_model(scorer.site, args.out, args.format, example)
    card = {**scorer.card, "exported": {"format": args.format, "file": path.name, "sha256": sha256_of(path),
                                        "outputs": ["logits (N, 2)", "features (N, 1280)"],
                                        "torch_model_sha256": scorer.card["model_sha256"]}}
    write_card(card, args.out)
    Console().print(f"written: {path}, {args.out / 'model-card.json'}", soft_wrap=True)
    return 0


def _model_arguments(p: argparse.ArgumentParser, *, exported: bool = True, data_required: bool = True) -> None:
    p.add_argument("--model", type=Path, default=None, metavar="RUN_DIR",
                   help="the run folder (fedrad simulate --out, or the coordinator's out-dir): global.npz, global.json")
    p.add_argument("--site-work", type=Path, default=None, metavar="DIR",
                   help="this site's work folder from that run (simulate: RUN_DIR/sites/<site>): its BatchNorm, "
                        "calibration, prior and personalised head")
    p.add_argument("--bn", choices=["site", "pooled", "adabn"], default=None,
                   help="BatchNorm: site (default with --site-work), or for a site that never trained: pooled "
                        "(the federation's pooled statistics) or adabn (re-estimated on --data's images)")
    if exported:
        p.add_argument("--exported", type=Path, default=None, metavar="DIR",
                       help="score with a fedrad export folder (model.onnx or model.pt + model-card.json) instead")
    p.add_argument("--data", type=Path, required=data_required, default=None,
                   help="site folder: labels.csv + DICOM (labels may be empty)"
                        + ("" if data_required else "; optional: images to trace and check the export on "
                           "(needed with --bn adabn)"))
    p.add_argument("--site", default=None, help="the site's name in the model card (default: the work folder's name)")
    p.add_argument("--threshold", type=float, default=0.5, help="decision threshold on the probability (default 0.5)")
    p.add_argument("--decide-on", choices=["auto", "corrected", "personalised"], default="auto",
                   help="which probability the decision thresholds: auto = the personalised head where the site "
                        "has one, else the corrected probability")
    p.add_argument("--out", type=Path, required=True, help="output folder (stays at the site)")


def add_site_commands(sub: argparse._SubParsersAction) -> None:
    """Register predict, evaluate and export on the `fedrad` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("predict", help="score a site's DICOM with the site's own model (nothing is sent anywhere)",
                       description="Assembles the site's model from the run (shared layers) and its own work folder "
                                   "(BatchNorm, calibration, prior, personalised head), reads --data like training "
                                   "(bad files skipped with a reason) and writes OUT/predictions.csv, "
                                   "model-card.json and skipped.csv. A task=survival run writes each image's risk "
                                   "(log hazard ratio) and risk group instead.", formatter_class=fmt,
                       epilog=EXAMPLES["predict"])
    _model_arguments(p)
    p.add_argument("--split", choices=["all", "train", "test"], default="all",
                   help="which labels.csv rows to score (train includes unlabelled rows; default all)")
    p.add_argument("--explain", action="store_true",
                   help="Grad-CAM per image: OUT/gradcam/<image>.png (overlay) and .npy (the map)")
    p.add_argument("--layer", default="block15", help="Grad-CAM layer: block15 (default: localised best in the "
                                                      "layer study), block11 (6x6 at 96 px), block13, block16, head")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="AUC with a patient-bootstrap 95%% CI, calibration, sensitivity/specificity",
                       description="Scores a labelled site folder like predict and writes OUT/evaluate.json (auc, "
                                   "auc_ci95, ece, brier, sensitivity, specificity, confusion_matrix, ...), "
                                   "evaluate.md, reliability.png, plus predictions.csv and model-card.json. A "
                                   "task=survival run: c_index, td_auc, integrated_brier and km-risk-groups.png.",
                       formatter_class=fmt, epilog=EXAMPLES["evaluate"])
    _model_arguments(p)
    p.add_argument("--split", choices=["all", "train", "test"], default="test", help="rows to evaluate (default test)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write the site's model as ONNX or TorchScript, with its model card",
                       description="The network (CNN input -> logits, penultimate features) as model.onnx or "
                                   "model.pt, checked against torch to 1e-4, plus model-card.json (exact "
                                   "preprocessing, calibration, prior) and the personalised head. --data gives the "
                                   "images the export is traced and checked on (and AdaBN's, with --bn adabn).",
                       formatter_class=fmt, epilog=EXAMPLES["export"])
    _model_arguments(p, exported=False, data_required=False)
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="default onnx")
    p.set_defaults(func=cmd_export)
