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

Use ``--threads 1`` on a machine whose other cores are busy: PyTorch's CPU threads wait on
each other and two threads competing with another process ran ~15x slower than one.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from transformers import BertTokenizerFast, Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor, BlipImageProcessor

import qpert
from qpert.eval.metrics import RetrievalMetrics, retrieval_metrics
from qpert.models import blip2
from qpert.models.tiny import SPECIAL_TOKENS
from qpert.synthetic import Scene, SceneConfig, SceneObject, make_scenes, vocabulary
from qpert.synthetic.scenes import caption

SCENES = SceneConfig()


def shapes_config() -> Blip2Config:
    """Small enough for a few-MB checkpoint and CPU training; 8-px patches on 64-px images."""
    return Blip2Config(
        vision_config=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                           image_size=SCENES.image_size, patch_size=8, attention_dropout=0.0,
                           initializer_range=0.02),  # the default 1e-10 assumes pre-trained weights
        qformer_config=dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                            cross_attention_frequency=1, vocab_size=len(SPECIAL_TOKENS) + len(vocabulary()),
                            max_position_embeddings=48, use_qformer_text_input=True, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0),
        text_config=dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                         vocab_size=len(SPECIAL_TOKENS) + len(vocabulary())),
        num_query_tokens=8,
        image_text_hidden_size=64,
        use_qformer_text_input=True,
    )


def shapes_processor() -> Blip2Processor:
    """A word-level BERT tokenizer over the scene vocabulary and BLIP's image processor at the scene size."""
    words = SPECIAL_TOKENS + vocabulary()
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    image_processor = BlipImageProcessor(size={"height": SCENES.image_size, "width": SCENES.image_size})
    return Blip2Processor(image_processor=image_processor, tokenizer=tokenizer)


def build_model(seed: int) -> Blip2ForImageTextRetrieval:
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(shapes_config())
    with torch.no_grad():  # transformers zero-initializes the queries; BLIP-2 draws them like other weights
        model.query_tokens.normal_(0.0, model.config.qformer_config.initializer_range)
    return model


# ------------------------------------------------------------------ training forwards (with gradients)
def encode_images(model: Blip2ForImageTextRetrieval, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
    tokens = model.vision_model(pixel_values=pixel_values).last_hidden_state
    queries = model.query_tokens.expand(tokens.shape[0], -1, -1)
    out = model.qformer(query_embeds=queries, encoder_hidden_states=tokens,
                        encoder_attention_mask=torch.ones(tokens.shape[:-1], dtype=torch.long)).last_hidden_state
    return tokens, F.normalize(model.vision_projection(out), dim=-1)


def encode_texts(model: Blip2ForImageTextRetrieval, ids: Tensor, mask: Tensor) -> Tensor:
    out = model.qformer(query_embeds=model.embeddings(input_ids=ids), query_length=0,
                        attention_mask=mask).last_hidden_state
    return F.normalize(model.text_projection(out[:, 0]), dim=-1)


def itm_logits(model: Blip2ForImageTextRetrieval, tokens: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    queries = model.query_tokens.expand(tokens.shape[0], -1, -1)
    full_mask = torch.cat([torch.ones(queries.shape[:-1], dtype=torch.long), mask], 1)
    out = model.qformer(query_embeds=model.embeddings(input_ids=ids, query_embeds=queries),
                        query_length=queries.shape[1], attention_mask=full_mask, encoder_hidden_states=tokens,
                        encoder_attention_mask=torch.ones(tokens.shape[:-1], dtype=torch.long)).last_hidden_state
    return model.itm_head(out[:, : queries.shape[1]]).mean(dim=1)


def losses(model: Blip2ForImageTextRetrieval, log_temp: Tensor, pixel_values: Tensor, ids: Tensor, mask: Tensor,
           same: Tensor, generator: torch.Generator, with_itm: bool = True) -> tuple[Tensor, Tensor]:
    """ITC and ITM losses of one batch; ``same[i, j]``: image i and text j describe the same content."""
    tokens, image_emb = encode_images(model, pixel_values)
    text_emb = encode_texts(model, ids, mask)
    sim = torch.einsum("iqd,td->iqt", image_emb, text_emb).amax(dim=1) / log_temp.exp()
    target = torch.arange(sim.shape[0])
    itc = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2
    if not with_itm:
        return itc, torch.zeros(())
    with torch.no_grad():  # hard negatives, as in BLIP-2: sampled in proportion to ITC similarity
        weights_i2t = F.softmax(sim, dim=1).masked_fill(same, 0) + 1e-6 * ~same
        weights_t2i = F.softmax(sim.t(), dim=1).masked_fill(same.t(), 0) + 1e-6 * ~same.t()
        neg_text = torch.multinomial(weights_i2t, 1, generator=generator).squeeze(1)
        neg_image = torch.multinomial(weights_t2i, 1, generator=generator).squeeze(1)
    pair_tokens = torch.cat([tokens, tokens, tokens[neg_image]])
    pair_ids = torch.cat([ids, ids[neg_text], ids])
    pair_mask = torch.cat([mask, mask[neg_text], mask])
    labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long()
    itm = F.cross_entropy(itm_logits(model, pair_tokens, pair_ids, pair_mask), labels)
    return itc, itm


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


def batch(processor: Blip2Processor, seed: int, step: int, size: int, rng: np.random.Generator,
          mention_small: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Scenes ``step * size ..`` of the training stream, one random caption each, and which pairs match."""
    scenes = make_scenes(seed, size, SCENES, start=step * size)
    ip = processor.image_processor
    images = torch.from_numpy(np.stack([s.image for s in scenes])).float().permute(0, 3, 1, 2) / 255.0
    pixel_values = (images - torch.tensor(ip.image_mean)[:, None, None]) / torch.tensor(ip.image_std)[:, None, None]
    texts, named = zip(*(web_caption(s, rng, mention_small) for s in scenes))
    tok = processor.tokenizer(list(texts), padding="longest", return_tensors="pt")
    content = [frozenset((o.colour, o.shape, o.position) for o in s.objects) for s in scenes]
    said = [frozenset((o.colour, o.shape, o.position) for o in objs) for objs in named]
    # text j also describes image i: a complete caption must match exactly, a partial one need only be true of it
    same = torch.tensor([[t == c or (mention_small < 1.0 and t <= c) for t in said] for c in content])
    return pixel_values, tok.input_ids, tok.attention_mask, same


# ------------------------------------------------------------------ evaluation with qpert's own pieces
@torch.no_grad()
def evaluate(model: Blip2ForImageTextRetrieval, processor: Blip2Processor, seed: int, count: int,
             alphas: tuple[float, ...], threshold: float = 0.99) -> dict[str, RetrievalMetrics]:
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
    results = {"baseline": retrieval_metrics(blip2.itc_scores(blip2.image_embeddings(model, tokens), text_emb).numpy(),
                                             text_to_image, max_areas)}
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


def table(results: dict[str, RetrievalMetrics]) -> str:
    rows = ["| run | T2I R@1 | T2I R@5 | small T2I R@1 | small T2I R@5 | large T2I R@1 | I2T R@1 | T2I mR@1 |",
            "|---|---|---|---|---|---|---|---|"]
    for name, m in results.items():
        t = m.t2i
        counts, r1 = m.bin_counts["t2i"], m.bin_recall["t2i"]["R@1"]
        large = sum(c * r for c, r in zip(counts[1:], r1[1:]) if c) / max(1, sum(counts[1:]))
        rows.append(f"| {name} | {t['R@1']:.1f} | {t['R@5']:.1f} | {t['small_R@1']:.1f} | {t['small_R@5']:.1f} "
                    f"| {large:.1f} | {m.i2t['R@1']:.1f} | {t['mR@1']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--itm-start", type=int, default=300,
                        help="ITC alone before this step: it leaves the start's plateau (all embeddings equal) faster")
    parser.add_argument("--seed", type=int, default=0, help="training scene stream and initialization")
    parser.add_argument("--val-seed", type=int, default=1_000_001, help="validation scene stream (disjoint)")
    parser.add_argument("--val-count", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=0, help="quick baseline eval on 300 scenes (0: never)")
    parser.add_argument("--alphas", type=float, nargs="*", default=[0.5, 1.0, 2.0, 4.0, 8.0], help="Q-Pert scales")
    parser.add_argument("--mention-small", type=float, default=1.0,
                        help="probability that a training caption names each small shape (1: all, as the benchmark)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="save the checkpoint here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = build_model(args.seed), shapes_processor()
    log_temp = torch.nn.Parameter(torch.tensor(math.log(0.07)))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "query_tokens" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "query_tokens" not in n)] + [log_temp]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": rest, "weight_decay": 0.0}],
                                  lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / args.warmup) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.steps))))
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters", flush=True)

    start = time.time()
    for step in range(args.steps):
        model.train()
        pixel_values, ids, mask, same = batch(processor, args.seed, step, args.batch, rng, args.mention_small)
        itc, itm = losses(model, log_temp, pixel_values, ids, mask, same, generator, step >= args.itm_start)
        optimizer.zero_grad(set_to_none=True)
        (itc + itm).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            log_temp.clamp_(math.log(0.01), math.log(0.5))
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  itc {itc.item():.3f}  itm {itm.item():.3f}  temp {log_temp.exp().item():.3f}  "
                  f"{time.time() - start:.0f}s", flush=True)
        if args.eval_every and step and step % args.eval_every == 0:
            m = evaluate(model, processor, args.val_seed, 300, ())["baseline"].t2i
            print(f"  val300 T2I R@1 {m['R@1']:.1f} R@5 {m['R@5']:.1f} small R@1 {m['small_R@1']:.1f}", flush=True)
    train_time = time.time() - start

    results = evaluate(model, processor, args.val_seed, args.val_count, tuple(args.alphas))
    print(f"trained {args.steps} steps in {train_time / 60:.1f} min\n{table(results)}", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.out)
        processor.save_pretrained(args.out)
        summary = {"train_seconds": round(train_time), "args": {k: str(v) for k, v in vars(args).items()},
                   "validation": {name: m.to_dict() for name, m in results.items()}}
        (args.out / "training_log.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
