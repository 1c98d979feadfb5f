"""Pretraining of the tiny stand-ins, so that a stage-1 run has something to align.

MiniGPT-4's premise is a pretrained frozen LLM and a pretrained frozen vision tower joined by one
trained projection. Random stand-ins break it twice: a random LLaMA predicts nothing a projection
could steer, and a random frozen Q-Former erases the image (BERT's 0.02 init at width 64 leaves its
cross-attention a whisper next to the LayerNormed queries: its output hardly varies across images).

This stage restores the premise the way BLIP-2 gets its Q-Former ready for a language model, with
one difference: the tiny LLaMA learns alongside, since it is the stand-in of a model that was
pretrained on text (and images) long before. On synthetic scenes from seeds no run uses
(`SCENE_SEED_BASE` + the bundle's seed):

- the frozen random ViT's output already carries the image (most of its variance is between
  images); its features are computed once for a pool of scenes;
- the Q-Former (restarted from PyTorch's fan-in init), a throwaway linear projection and the LLaMA
  train together on the stage-1 objective itself: [BOS][image slots][caption + end_sym], captions
  cleaned as stage 1 cleans them, sequences built by the training code's `SequenceBuilder`;
- a quarter of each batch goes through a *fresh random projection* drawn as `nn.Linear` draws its
  initial state, with the same caption loss: the LLaMA learns that such prefixes say nothing;
- then the LLaMA alone (Q-Former and projection fixed) learns it thoroughly: half of each batch
  through fresh random projections, each paired with another image under the same projection and
  caption, and the two next-token distributions pulled together (symmetric KL). A real LLM has
  learnt to draw nothing from context that carries no information; without this, the tiny LLaMA
  reads a random prefix as confident, wrong attributes, and a stage-1 run at its initial projection
  scores a scene's own caption up to ~1.2 % better or worse than another's, depending on the draw.

The projection is discarded: a stage-1 run starts from a fresh one, as MiniGPT-4 starts from
BLIP-2's Q-Former. The trained tensors replace the random ones in the same files and layouts (the
HF LLaMA folder, the BLIP-2 `{"model": ...}` keys), so loaders see nothing new. Seeded, with a
fixed thread count: the same seed gives the same files on the same machine.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Dict, List, Tuple

if TYPE_CHECKING:
    import torch

    from mgpt4_dist.config import JobConfig
    from mgpt4_dist.models.minigpt4 import MiniGPT4
    from mgpt4_dist.models.qformer import QFormer
    from mgpt4_dist.models.sequence import SequenceBuilder

log = logging.getLogger(__name__)

# Recorded with the bundle (and in the cache key): changing any of it rebuilds cached stand-ins.
# Measured on 2 cores (issue 14's note): ~110 s in all. With 400 first-stage steps the stand-ins carry
# colours but hardly shapes; a third or more of random-projection rows there made the Q-Former output
# collapse. The second stage takes a stage-1 run's own-vs-other caption loss gap at its initial
# projection from 0.86 % rms over projection draws to 0.16 % (0.44 % without the consistency term).
PRETRAIN_RECIPE: Dict[str, object] = {
    "version": 2,
    "steps": 800,
    "batch": 32,
    "lr": 2e-3,
    "scene_pool": 1024,
    "random_projection_rows": 8,  # of each batch
    "ignore_steps": 800,
    "ignore_lr": 3e-3,
    "ignore_random_rows": 16,  # of each batch, plus as many partner rows
    "ignore_consistency": 1.0,
    "threads": 2,
}
SCENE_SEED_BASE = 1_000_002  # + the bundle seed: scenes that no run trains or evaluates on
FEATURE_CHUNK = 64


def across_image_spread(features_BQH: "torch.Tensor") -> float:
    """Share of the features' variance that is between images: per (token, channel) variance over
    the batch, averaged, over the variance of all values. ~0 when the output ignores the image."""
    total = features_BQH.float().var(unbiased=False)
    between = features_BQH.float().var(dim=0, unbiased=False).mean()
    return float(between / total)


def _scene_pool(seed: int, count: int, img_size: int, clean: bool) -> Tuple["torch.Tensor", List[str]]:
    """Images through JPEG and the training transform, as a run reads its shards; captions cleaned
    as the run cleans them."""
    import torch

    from mgpt4_dist.data.text import blip_caption
    from mgpt4_dist.data.transforms import build_image_transform, decode_image
    from mgpt4_dist.tiny.scenes import encode_jpeg, synthetic_scenes

    transform = build_image_transform(img_size)
    images, captions = [], []
    for _, image, _, caption in synthetic_scenes(count, seed=seed):
        images.append(transform(decode_image(encode_jpeg(image))))
        captions.append(blip_caption(caption) if clean else caption)
    return torch.stack(images), captions


def _random_projection(like: "torch.nn.Linear", generator: "torch.Generator") -> Tuple["torch.Tensor", "torch.Tensor"]:
    """A projection drawn as a stage-1 run draws its initial one (`init_llama_proj`), from `generator`."""
    from mgpt4_dist.models.minigpt4 import draw_linear_init

    return draw_linear_init(like.out_features, like.in_features, generator)


def pretrain_stand_ins(cfg: "JobConfig", seed: int, progress: bool = False) -> Dict[str, float]:
    """Train the Q-Former file and LLaMA folder that `cfg.model` names, in place (see the module
    docstring); `cfg` is the tiny config pointed at a random bundle. Returns what was measured."""
    import torch

    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(int(PRETRAIN_RECIPE["threads"]))
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG streams stay as they were
            report = _pretrain(cfg, seed, progress)
    finally:
        torch.set_num_threads(threads)
    report["seconds"] = round(time.perf_counter() - start, 1)
    log.info("pretrained the tiny stand-ins in %.0f s: Q-Former output across-image spread %.1f%% -> %.1f%%, "
             "caption loss %.3f", report["seconds"], 100 * report["qformer_spread_random"],
             100 * report["qformer_spread_pretrained"], report["caption_loss"])
    return report


def _pretrain(cfg: "JobConfig", seed: int, progress: bool) -> Dict[str, float]:
    import torch
    import torch.nn.functional as F

    from mgpt4_dist.models.llm import load_llm, load_tokenizer
    from mgpt4_dist.models.minigpt4 import MiniGPT4, build_vision_towers
    from mgpt4_dist.models.sequence import SequenceBuilder

    steps, batch, lr, pool = (int(PRETRAIN_RECIPE[k]) if k != "lr" else float(PRETRAIN_RECIPE[k])
                              for k in ("steps", "batch", "lr", "scene_pool"))
    random_rows = int(PRETRAIN_RECIPE["random_projection_rows"])
    vit, qformer, _ = build_vision_towers(cfg.model, seed=seed)
    llm = load_llm(cfg.model.llm_path, dtype=torch.float32, attn_impl="sdpa")
    tokenizer = load_tokenizer(cfg.model.llm_path)
    torch.manual_seed(seed)
    model = MiniGPT4(vit, qformer, llm)  # its llama_proj is the throwaway projection
    sequences = SequenceBuilder(tokenizer, model.num_image_tokens, cfg.data.max_txt_len, cfg.data.end_sym)

    images, captions = _scene_pool(SCENE_SEED_BASE + seed, pool, cfg.model.vit.img_size, cfg.data.clean_captions)
    with torch.no_grad():
        vit_tokens = torch.cat([vit(images[k:k + FEATURE_CHUNK]) for k in range(0, pool, FEATURE_CHUNK)])
        probe = vit_tokens[:FEATURE_CHUNK]
        report = {"qformer_spread_random": across_image_spread(qformer(probe))}
    del images

    # The random file's BERT init (std 0.02) makes the cross-attention negligible at width 64;
    # training starts from PyTorch's fan-in init, under which the image comes through.
    for module in qformer.bert.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    trained = [qformer, model.llama_proj, llm]
    for module in trained:
        module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW([p for m in trained for p in m.parameters()], lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    order = torch.Generator().manual_seed(seed)
    loss_value = float("nan")
    for step in range(steps):
        rows = torch.randint(0, pool, (batch,), generator=order)
        features_BQH = qformer(vit_tokens[rows])
        text = sequences([captions[r] for r in rows.tolist()])
        # Rows [0, random_rows) see a fresh random projection, the others the trained one.
        weight, bias = _random_projection(model.llama_proj, order)
        embeds_BQD = torch.cat([F.linear(features_BQH[:random_rows], weight, bias),
                                model.llama_proj(features_BQH[random_rows:])])
        loss = model.loss_terms_of_embeds(embeds_BQD, text).loss
        _optimizer_step(optimizer, schedule, loss)
        loss_value = loss.item()
        if progress and (step % 100 == 0 or step == steps - 1):
            log.info("pretraining the tiny Q-Former and LLaMA: step %d/%d, caption loss %.3f", step + 1, steps,
                     loss_value)
    qformer.eval().requires_grad_(False)
    model.llama_proj.requires_grad_(False)
    with torch.no_grad():
        report["qformer_spread_pretrained"] = across_image_spread(qformer(probe))
        features = torch.cat([qformer(vit_tokens[k:k + FEATURE_CHUNK]) for k in range(0, pool, FEATURE_CHUNK)])
    report["caption_loss"] = loss_value
    report["caption_loss_after_ignoring"] = _ignore_random_prefixes(model, sequences, features, captions, order,
                                                                    progress)
    llm.eval().requires_grad_(False)
    llm.save_pretrained(cfg.model.llm_path)
    _write_qformer_weights(qformer, cfg.model.qformer_checkpoint)
    return report


def _ignore_random_prefixes(model: "MiniGPT4", sequences: "SequenceBuilder", features_NQH: "torch.Tensor",
                            captions: List[str], generator: "torch.Generator", progress: bool) -> float:
    """Second stage: the LLaMA alone, Q-Former and throwaway projection fixed. Half of each batch goes
    through fresh random projections (one per row) and is also scored on a *partner* row: the same
    caption and projection with another image. The symmetric KL between the two rows' next-token
    distributions is added to the caption loss: a prefix that carries no information must not move
    the prediction, whatever image it came from. Returns the last caption loss."""
    import torch

    from mgpt4_dist.models.sequence import IGNORE_INDEX

    steps, lr, weight = (int(PRETRAIN_RECIPE["ignore_steps"]), float(PRETRAIN_RECIPE["ignore_lr"]),
                         float(PRETRAIN_RECIPE["ignore_consistency"]))
    batch, random_rows = int(PRETRAIN_RECIPE["batch"]), int(PRETRAIN_RECIPE["ignore_random_rows"])
    llm = model.llm
    optimizer = torch.optim.AdamW(llm.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    caption_loss = float("nan")
    for step in range(steps):
        rows = torch.randint(0, features_NQH.shape[0], (batch,), generator=generator)
        partners = torch.randint(0, features_NQH.shape[0], (random_rows,), generator=generator)
        drawn = [_random_projection(model.llama_proj, generator) for _ in range(random_rows)]
        weight_RDH, bias_RD = torch.stack([w for w, _ in drawn]), torch.stack([b for _, b in drawn])

        def randomly_projected(features_RQH):
            return torch.einsum("rqh,rdh->rqd", features_RQH, weight_RDH) + bias_RD[:, None]

        features_BQH = features_NQH[rows]
        embeds = torch.cat([randomly_projected(features_BQH[:random_rows]),
                            model.llama_proj(features_BQH[random_rows:]),
                            randomly_projected(features_NQH[partners])])
        texts = [captions[r] for r in rows.tolist()]
        text = sequences(texts + texts[:random_rows])  # partners: the random rows' captions
        hidden_BTD = llm.model(inputs_embeds=model.embed_sequence(embeds, text), use_cache=False).last_hidden_state
        log_probs_BTV = torch.log_softmax(llm.lm_head(hidden_BTD[:, :-1]).float(), dim=-1)
        targets_BT = text.labels_BT[:, 1:]
        scored_BT = targets_BT != IGNORE_INDEX
        token_nll_BT = -log_probs_BTV.gather(-1, targets_BT.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss = token_nll_BT[:batch][scored_BT[:batch]].mean()
        a_RTV, b_RTV = log_probs_BTV[:random_rows], log_probs_BTV[batch:]
        kl_RT = (a_RTV.exp() * (a_RTV - b_RTV)).sum(-1) + (b_RTV.exp() * (b_RTV - a_RTV)).sum(-1)
        _optimizer_step(optimizer, schedule, loss + weight * kl_RT[scored_BT[:random_rows]].mean())
        caption_loss = loss.item()
        if progress and (step % 100 == 0 or step == steps - 1):
            log.info("teaching the tiny LLaMA to ignore uninformative prefixes: step %d/%d, caption loss %.3f",
                     step + 1, steps, caption_loss)
    return caption_loss


def _optimizer_step(optimizer: "torch.optim.Optimizer", schedule: "torch.optim.lr_scheduler.LRScheduler",
                    loss: "torch.Tensor") -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    schedule.step()


def _write_qformer_weights(qformer: "QFormer", path: str) -> None:
    """Trained tensors under the BLIP-2 file's own keys; keys MiniGPT-4 does not read stay as written."""
    import torch

    from mgpt4_dist.models.weights import qformer_state_from_blip2

    blip2 = torch.load(path, weights_only=True)
    trained = qformer.state_dict()
    state = dict(blip2["model"])
    for key, value in state.items():
        ours, _ = qformer_state_from_blip2({key: value})
        for our_key in ours:  # at most one
            state[key] = trained[our_key].detach().clone().to(value.dtype)
    torch.save({**blip2, "model": state}, path)
