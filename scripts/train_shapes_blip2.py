"""Train the toy ``blip2-shapes`` checkpoint: a small real Blip2ForImageTextRetrieval on synthetic scenes.

BLIP-2's stage-1 retrieval objectives on CPU: ITC (best query per text, learned temperature)
and ITM with one hard negative text per image and one hard negative image per text, sampled
from the ITC similarities as BLIP-2 does. Scenes are generated on the fly from seed stream
``--seed`` (validation uses ``--val-seed``, a disjoint stream), so a run is reproducible from
its arguments. At the end the checkpoint is evaluated on the validation scenes with and
without Q-Pert (ground-truth boxes) and saved with its processor.

Like BLIP-2's web pre-training captions, the training captions need not name every small shape
(``--mention-small``); the benchmark's captions always do, as Flickr30K's fine-grained ones do.
A model trained so under-attends small objects, which is the gap Q-Pert's boxes close.

    python scripts/train_shapes_blip2.py --steps 3000 --itm-start 2600 --mention-small 0.5 --threads 1 \
        --out qpert/assets/blip2-shapes

A second phase starts from a saved checkpoint (``--init-from``; pass the first phase's final
temperature with ``--temp``, since the checkpoint does not hold it) and trains ITM with a chosen
weight on ITC (``--itc-weight``, 0: ITM alone), part of the model (``--train itm-head`` leaves ITC
untouched) and kind of negatives (``--random-negatives``); every run reports ITM's accuracy on
validation pairs. No second phase tried so far makes ITM re-ranking help (TRAINING.md); one of them:

    python scripts/train_shapes_blip2.py --init-from qpert/assets/blip2-shapes --temp 0.065 --seed 1 \
        --itm-start 0 --itc-weight 0.1 --random-negatives 0.5 --lr 3e-4 --warmup 50 --steps 500 \
        --mention-small 0.5 --threads 1 --out /tmp/itm-phase

``--counterfactual-negatives P`` adds near misses on the text side: with probability P an
image's negative text is, instead of one sampled by ITC similarity, its own caption with one attribute
(colour, shape or position) of one named shape changed to another value of the scene vocabulary that
no shape of the image has (so the altered caption is false of it). Default 0: off, and the runs above
reproduce bit for bit (no extra random numbers are drawn). Negative images stay ITC-sampled: the scene
generator cannot render a given object list. ITM then learns to reject the altered captions, but
re-ranking images by it still costs R@1 against ITC alone (runs d1-d4 in TRAINING.md), e.g.:

    python scripts/train_shapes_blip2.py --init-from qpert/assets/blip2-shapes --temp 0.065 --seed 1 \
        --itm-start 0 --itc-weight 0.1 --random-negatives 0.2 --counterfactual-negatives 0.5 --lr 3e-4 \
        --warmup 50 --steps 600 --mention-small 0.5 --threads 1 --out /tmp/itm-counterfactual

Use ``--threads 1`` on a machine whose other cores are busy: PyTorch's CPU threads wait on
each other and two threads competing with another process ran ~15x slower than one.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from transformers import BertTokenizerFast, Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor

import qpert
from qpert.eval.metrics import RetrievalMetrics, retrieval_metrics
from qpert.models import blip2
from qpert.models.processing import pil_image_processor_class
from qpert.models.tiny import SPECIAL_TOKENS
from qpert.synthetic import Scene, SceneConfig, SceneObject, make_scenes, vocabulary
from qpert.synthetic.scenes import COLOURS, POSITIONS, SHAPES, caption

SCENES = SceneConfig()


def shapes_config() -> Blip2Config:
    """Small enough for a few-MB checkpoint and CPU training; 8-px patches on 64-px images."""
    return Blip2Config(
        vision_config=dict(
            hidden_size=96,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=SCENES.image_size,
            patch_size=8,
            attention_dropout=0.0,
            initializer_range=0.02,
        ),  # the default 1e-10 assumes pre-trained weights
        qformer_config=dict(
            hidden_size=96,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            cross_attention_frequency=1,
            vocab_size=len(SPECIAL_TOKENS) + len(vocabulary()),
            max_position_embeddings=48,
            use_qformer_text_input=True,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        text_config=dict(
            model_type="opt",
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            ffn_dim=64,
            vocab_size=len(SPECIAL_TOKENS) + len(vocabulary()),
        ),
        num_query_tokens=8,
        image_text_hidden_size=64,
        use_qformer_text_input=True,
    )


def shapes_processor() -> Blip2Processor:
    """A word-level BERT tokenizer over the scene vocabulary and BLIP's image processor at the scene size."""
    words = SPECIAL_TOKENS + vocabulary()
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    image_processor = pil_image_processor_class("BlipImageProcessor")(
        size={"height": SCENES.image_size, "width": SCENES.image_size}
    )
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(seed: int) -> Blip2ForImageTextRetrieval:
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(shapes_config())
    with torch.no_grad():  # transformers zero-initializes the queries; BLIP-2 draws them like other weights
        model.query_tokens.normal_(0.0, model.config.qformer_config.initializer_range)
    return model


# ------------------------------------------------------------------ training forwards (with gradients)
def encode_images(model: Blip2ForImageTextRetrieval, tokens: Tensor) -> Tensor:
    queries = model.query_tokens.expand(tokens.shape[0], -1, -1)
    out = model.qformer(
        query_embeds=queries,
        encoder_hidden_states=tokens,
        encoder_attention_mask=torch.ones(tokens.shape[:-1], dtype=torch.long),
    ).last_hidden_state
    return F.normalize(model.vision_projection(out), dim=-1)


def encode_texts(model: Blip2ForImageTextRetrieval, ids: Tensor, mask: Tensor) -> Tensor:
    out = model.qformer(
        query_embeds=model.embeddings(input_ids=ids), query_length=0, attention_mask=mask
    ).last_hidden_state
    return F.normalize(model.text_projection(out[:, 0]), dim=-1)


def itm_logits(model: Blip2ForImageTextRetrieval, tokens: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    queries = model.query_tokens.expand(tokens.shape[0], -1, -1)
    full_mask = torch.cat([torch.ones(queries.shape[:-1], dtype=torch.long), mask], 1)
    out = model.qformer(
        query_embeds=model.embeddings(input_ids=ids, query_embeds=queries),
        query_length=queries.shape[1],
        attention_mask=full_mask,
        encoder_hidden_states=tokens,
        encoder_attention_mask=torch.ones(tokens.shape[:-1], dtype=torch.long),
    ).last_hidden_state
    return model.itm_head(out[:, : queries.shape[1]]).mean(dim=1)


def losses(
    model: Blip2ForImageTextRetrieval,
    log_temp: Tensor,
    pixel_values: Tensor,
    ids: Tensor,
    mask: Tensor,
    same: Tensor,
    generator: torch.Generator,
    with_itc: bool = True,
    with_itm: bool = True,
    random_negatives: float = 0.0,
    counterfactual: Optional[tuple[Tensor, Tensor, Tensor]] = None,
) -> tuple[Tensor, Tensor, float]:
    """ITC and ITM losses of one batch and ITM's accuracy; ``same[i, j]``: image i and text j describe the same content.

    Without ``with_itc`` the ITC similarities are computed without gradients, for the hard negatives only.
    ``counterfactual`` = (use, ids, mask): where ``use[i]``, image i's negative text is the altered caption
    ``ids[i]`` (one attribute of one named shape changed) instead of the ITC-sampled one.
    """
    tokens = model.vision_model(pixel_values=pixel_values).last_hidden_state
    with torch.set_grad_enabled(with_itc and torch.is_grad_enabled()):
        image_emb, text_emb = encode_images(model, tokens), encode_texts(model, ids, mask)
        sim = torch.einsum("iqd,td->iqt", image_emb, text_emb).amax(dim=1) / log_temp.exp()
        target = torch.arange(sim.shape[0])
        itc = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2
    if not with_itm:
        return itc, torch.zeros(()), float("nan")
    neg_text, neg_image = negatives(sim.detach(), same, generator, random_negatives)
    neg_ids, neg_mask = ids[neg_text], mask[neg_text]
    if counterfactual is not None:
        use, cf_ids, cf_mask = counterfactual
        neg_ids = torch.where(use[:, None], cf_ids, neg_ids)
        neg_mask = torch.where(use[:, None], cf_mask, neg_mask)
    pair_tokens = torch.cat([tokens, tokens, tokens[neg_image]])
    pair_ids = torch.cat([ids, neg_ids, ids])
    pair_mask = torch.cat([mask, neg_mask, mask])
    labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long()
    logits = itm_logits(model, pair_tokens, pair_ids, pair_mask)
    return itc, F.cross_entropy(logits, labels), (logits.argmax(1) == labels).float().mean().item()


def negatives(sim: Tensor, same: Tensor, generator: torch.Generator, random_fraction: float) -> tuple[Tensor, Tensor]:
    """One negative text per image and one negative image per text.

    BLIP-2 samples them in proportion to ITC similarity (hard negatives). With ``random_fraction`` > 0 each
    is instead drawn uniformly with that probability: in the second-phase runs (TRAINING.md) ITM's loss
    left its prior sooner with half of them uniform than with a fifth.
    """

    def weights(s: Tensor, matching: Tensor) -> Tensor:
        hard = F.softmax(s, dim=1).masked_fill(matching, 0) + 1e-6 * ~matching
        if random_fraction == 0.0:
            return hard
        uniform = (~matching).float()
        return (1 - random_fraction) * hard / hard.sum(1, keepdim=True) + random_fraction * uniform / uniform.sum(
            1, keepdim=True
        )

    neg_text = torch.multinomial(weights(sim, same), 1, generator=generator).squeeze(1)
    neg_image = torch.multinomial(weights(sim.t(), same.t()), 1, generator=generator).squeeze(1)
    return neg_text, neg_image


def web_caption(scene: Scene, rng: np.random.Generator, mention_small: float) -> tuple[str, list[SceneObject]]:
    """A caption like a web alt-text: large shapes always named, each small one with probability ``mention_small``.

    Pre-training on such captions is what leaves BLIP-2 under-attending small objects; the benchmark's
    captions (``scene.captions``) name every shape, as Flickr30K Entities' fine-grained phrases do.
    """
    if mention_small >= 1.0:
        return scene.captions[rng.integers(len(scene.captions))], list(scene.objects)
    named = [o for o in scene.objects if o.size == "large" or rng.random() < mention_small]
    named = named or [scene.objects[rng.integers(len(scene.objects))]]
    return caption(named, rng), named


def counterfactual_caption(scene: Scene, named: list[SceneObject], rng: np.random.Generator) -> str:
    """A caption of ``named`` with one attribute of one of them changed so that it is false of ``scene``.

    The attribute (colour, shape or position) and its new value are drawn uniformly among the changes whose
    (colour, shape, position) is held by no shape of the scene: a near miss, the caption of a scene that
    differs from this one in that one shape's attribute.
    """
    content = {(o.colour, o.shape, o.position) for o in scene.objects}
    options = [
        (i, field, value)
        for i, o in enumerate(named)
        for field, values in (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS))
        for value in values
        if value != getattr(o, field)
        and (
            value if field == "colour" else o.colour,
            value if field == "shape" else o.shape,
            value if field == "position" else o.position,
        )
        not in content
    ]
    i, field, value = options[rng.integers(len(options))]
    altered = list(named)
    altered[i] = replace(named[i], **{field: value})
    return caption(altered, rng)


def batch(
    processor: Blip2Processor,
    seed: int,
    step: int,
    size: int,
    rng: np.random.Generator,
    mention_small: float = 1.0,
    counterfactual: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[tuple[Tensor, Tensor, Tensor]]]:
    """Scenes ``step * size ..`` of the training stream, one random caption each, and which pairs match.

    With ``counterfactual`` > 0 also (use, ids, mask) for ``losses``: per image an altered caption
    (``counterfactual_caption``), used as its ITM negative text with probability ``counterfactual``.
    """
    scenes = make_scenes(seed, size, SCENES, start=step * size)
    ip = processor.image_processor
    images = torch.from_numpy(np.stack([s.image for s in scenes])).float().permute(0, 3, 1, 2) / 255.0
    pixel_values = (images - torch.tensor(ip.image_mean)[:, None, None]) / torch.tensor(ip.image_std)[:, None, None]
    texts, named = zip(*(web_caption(s, rng, mention_small) for s in scenes))
    cf = None
    if counterfactual > 0.0:  # no random numbers drawn otherwise: runs without it stay bit-identical
        altered = [counterfactual_caption(s, list(objs), rng) for s, objs in zip(scenes, named)]
        use = torch.from_numpy(rng.random(len(scenes)) < counterfactual)
        tok = processor.tokenizer(list(texts) + altered, padding="longest", return_tensors="pt")
        n = len(scenes)
        cf = (use, tok.input_ids[n:], tok.attention_mask[n:])
        tok = {"input_ids": tok.input_ids[:n], "attention_mask": tok.attention_mask[:n]}
    else:
        tok = processor.tokenizer(list(texts), padding="longest", return_tensors="pt")
    content = [frozenset((o.colour, o.shape, o.position) for o in s.objects) for s in scenes]
    said = [frozenset((o.colour, o.shape, o.position) for o in objs) for objs in named]
    # text j also describes image i: a complete caption must match exactly, a partial one need only be true of it
    same = torch.tensor([[t == c or (mention_small < 1.0 and t <= c) for t in said] for c in content])
    return pixel_values, tok["input_ids"], tok["attention_mask"], same, cf


# ------------------------------------------------------------------ evaluation with qpert's own pieces
@torch.no_grad()
def evaluate(
    model: Blip2ForImageTextRetrieval,
    processor: Blip2Processor,
    seed: int,
    count: int,
    alphas: tuple[float, ...],
    threshold: float = 0.99,
) -> dict[str, RetrievalMetrics]:
    """ITC T2I/I2T metrics on ``count`` scenes of stream ``seed``: baseline and Q-Pert per alpha (GT boxes)."""
    model.eval()
    scenes = make_scenes(seed, count, SCENES)
    texts = [c for s in scenes for c in s.captions]
    text_to_image = np.repeat(np.arange(len(scenes)), [len(s.captions) for s in scenes])
    max_areas = np.array([s.max_area for s in scenes])
    pixels = processor.image_processor([Image.fromarray(s.image) for s in scenes], return_tensors="pt").pixel_values
    tokens = blip2.image_tokens(model, pixels)
    tok = processor.tokenizer(texts, padding="longest", return_tensors="pt")
    text_emb = blip2.text_embeddings(model, tok.input_ids, tok.attention_mask)
    results = {
        "baseline": retrieval_metrics(
            blip2.itc_scores(blip2.image_embeddings(model, tokens), text_emb).numpy(), text_to_image, max_areas
        )
    }
    for alpha in alphas:
        handle = qpert.attach(model, qpert.QPertConfig(alpha=alpha, weight="constant", threshold=threshold))
        try:
            subs = handle.compute_subspaces(tokens, [s.boxes for s in scenes], [s.image.shape[:2] for s in scenes])
            with handle.objects(subspaces=subs):
                scores = blip2.itc_scores(blip2.image_embeddings(model, tokens), text_emb)
        finally:
            handle.detach()
        results[f"qpert a={alpha:g}"] = retrieval_metrics(scores.numpy(), text_to_image, max_areas)
    return results


@torch.no_grad()
def itm_accuracy(
    model: Blip2ForImageTextRetrieval, processor: Blip2Processor, seed: int, count: int
) -> dict[str, float]:
    """ITM accuracy (%) on ``count`` scenes of stream ``seed``, one benchmark caption each, per kind of pair.

    The matching image, a random other image, and the other image that ITC ranks highest for the text:
    re-ranking ITC's top k needs the last kind rejected, which random negatives alone do not test.
    """
    model.eval()
    scenes = make_scenes(seed, count, SCENES)
    content = [frozenset((o.colour, o.shape, o.position) for o in s.objects) for s in scenes]
    same = torch.tensor([[a == b for b in content] for a in content])
    pixels = processor.image_processor([Image.fromarray(s.image) for s in scenes], return_tensors="pt").pixel_values
    tokens = blip2.image_tokens(model, pixels)
    tok = processor.tokenizer([s.captions[0] for s in scenes], padding="longest", return_tensors="pt")
    itc = blip2.itc_scores(
        blip2.image_embeddings(model, tokens), blip2.text_embeddings(model, tok.input_ids, tok.attention_mask)
    )
    images = {
        "positive": torch.arange(count),
        "random negative": torch.multinomial((~same).float(), 1, generator=torch.Generator().manual_seed(seed)).squeeze(
            1
        ),
        "hard negative": itc.masked_fill(same, -torch.inf).argmax(dim=0),
    }
    accuracy = {}
    for kind, image in images.items():
        said_match = itm_logits(model, tokens[image], tok.input_ids, tok.attention_mask).argmax(1) == 1
        accuracy[kind] = 100 * (said_match if kind == "positive" else ~said_match).float().mean().item()
    return accuracy


def table(results: dict[str, RetrievalMetrics]) -> str:
    rows = [
        "| run | T2I R@1 | T2I R@5 | small T2I R@1 | small T2I R@5 | large T2I R@1 | I2T R@1 | T2I mR@1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results.items():
        t = m.t2i
        counts, r1 = m.bin_counts["t2i"], m.bin_recall["t2i"]["R@1"]
        large = sum(c * r for c, r in zip(counts[1:], r1[1:]) if c) / max(1, sum(counts[1:]))
        rows.append(
            f"| {name} | {t['R@1']:.1f} | {t['R@5']:.1f} | {t['small_R@1']:.1f} | {t['small_R@5']:.1f} "
            f"| {large:.1f} | {m.i2t['R@1']:.1f} | {t['mR@1']:.1f} |"
        )
    return "\n".join(rows)


def trainable(model: Blip2ForImageTextRetrieval, part: str) -> list[torch.nn.Parameter]:
    """The parameters a phase trains; the others are frozen.

    ``itm-head`` leaves ITC exactly as it was: every Q-Former weight is used by ITC's query-only or
    text-only pass as well as by ITM's joint pass (BLIP-2 shares them all), so the head is the only
    part of the model that ITM has to itself.
    """
    for name, param in model.named_parameters():
        param.requires_grad_(part == "all" or name.startswith("itm_head."))
    return [p for p in model.parameters() if p.requires_grad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument(
        "--itm-start",
        type=int,
        default=300,
        help="ITC alone before this step: it leaves the start's plateau (all embeddings equal) faster",
    )
    parser.add_argument("--seed", type=int, default=0, help="training scene stream and initialization")
    parser.add_argument("--val-seed", type=int, default=1_000_001, help="validation scene stream (disjoint)")
    parser.add_argument("--val-count", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=0, help="quick baseline eval on 300 scenes (0: never)")
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0, 8.0], help="Q-Pert scales")
    parser.add_argument(
        "--mention-small",
        type=float,
        default=1.0,
        help="probability that a training caption names each small shape (1: all, as the benchmark)",
    )
    parser.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="a second phase: start from this saved checkpoint instead of a fresh initialization",
    )
    parser.add_argument(
        "--train", choices=("all", "itm-head"), default="all", help="parameters to train; itm-head leaves ITC untouched"
    )
    parser.add_argument("--itc-weight", type=float, default=1.0, help="weight of the ITC loss (0: ITM alone)")
    parser.add_argument(
        "--random-negatives",
        type=float,
        default=0.0,
        help="probability that an ITM negative is drawn uniformly instead of by ITC similarity",
    )
    parser.add_argument(
        "--counterfactual-negatives",
        type=float,
        default=0.0,
        help="probability that an image's ITM negative text is its own caption with one attribute of "
        "one named shape changed (a near miss) instead of one sampled by ITC similarity",
    )
    parser.add_argument(
        "--temp",
        type=float,
        default=0.07,
        help="initial ITC temperature (the checkpoint does not store it; --init-from should pass the "
        "first phase's final value)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="save the checkpoint here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.init_from:
        model = Blip2ForImageTextRetrieval.from_pretrained(args.init_from, use_safetensors=True)
    else:
        model = build_model(args.seed)
    processor = shapes_processor()
    log_temp = torch.nn.Parameter(torch.tensor(math.log(args.temp)), requires_grad=args.train == "all")
    params = trainable(model, args.train)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.ndim >= 2 and "query_tokens" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "query_tokens" not in n)]
    rest += [log_temp] if log_temp.requires_grad else []
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}], lr=args.lr
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    print(
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {sum(p.numel() for p in params)} trained",
        flush=True,
    )

    start = time.time()
    for step in range(args.steps):
        model.train()
        pixel_values, ids, mask, same, cf = batch(
            processor, args.seed, step, args.batch, rng, args.mention_small, args.counterfactual_negatives
        )
        itc, itm, itm_acc = losses(
            model,
            log_temp,
            pixel_values,
            ids,
            mask,
            same,
            generator,
            args.itc_weight > 0,
            step >= args.itm_start,
            args.random_negatives,
            cf,
        )
        optimizer.zero_grad(set_to_none=True)
        (args.itc_weight * itc + itm).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            log_temp.clamp_(math.log(0.01), math.log(0.5))
        if step % 100 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  itc {itc.item():.3f}  itm {itm.item():.3f} (acc {itm_acc:.2f})  "
                f"temp {log_temp.exp().item():.3f}  {time.time() - start:.0f}s",
                flush=True,
            )
        if args.eval_every and step and step % args.eval_every == 0:
            m = evaluate(model, processor, args.val_seed, 300, ())["baseline"].t2i
            print(f"  val300 T2I R@1 {m['R@1']:.1f} R@5 {m['R@5']:.1f} small R@1 {m['small_R@1']:.1f}", flush=True)
    train_time = time.time() - start

    results = evaluate(model, processor, args.val_seed, args.val_count, tuple(args.alphas))
    itm_val = itm_accuracy(model, processor, args.val_seed, args.val_count)
    print(
        f"trained {args.steps} steps in {train_time / 60:.1f} min\n{table(results)}\nITM accuracy (%): "
        + ", ".join(f"{k} {v:.1f}" for k, v in itm_val.items()),
        flush=True,
    )
    if args.out:
        summary = {
            "train_seconds": round(train_time),
            "args": {k: str(v) for k, v in vars(args).items()},
            "temperature": round(log_temp.exp().item(), 4),
            "itm_accuracy": itm_val,
            "validation": {name: m.to_dict() for name, m in results.items()},
        }
        if args.init_from:  # read before saving: --out may be --init-from
            summary["init_from"] = json.loads((args.init_from / "training_log.json").read_text())
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out)
        processor.save_pretrained(args.out)
        (args.out / "training_log.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
