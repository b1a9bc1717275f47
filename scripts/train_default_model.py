"""Train the embedded default model (small LLaVA) from scratch on easy-VQA.

Seeded and resumable: state goes to ``--work/ckpt.pt`` every ``--save-every`` steps and a rerun with
the same arguments continues from it. The best checkpoint (selected on the first ``--eval-limit`` test
questions; the full test split is reported at the end) is written in Hugging Face format to ``--out``.

    python scripts/train_default_model.py --out headsteer/default_model --work runs/train
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import time
from pathlib import Path

import _checkout  # noqa: F401  (refuses to run against another tree's headsteer)
import numpy as np
import torch
import torch.nn.functional as F

from headsteer import toy
from headsteer.data import easy_vqa_qtype


def words_of(strings):
    out = set()
    for s in strings:
        out.update(re.findall(r"\w+|[^\w\s]+", s.lower()))
    return out


SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")


def image_labels(answers, img_idx, n_images):
    """Shape and colour class per image (-100 when no question names it), for the auxiliary loss."""
    shape = torch.full((n_images,), -100)
    color = torch.full((n_images,), -100)
    for a, i in zip(answers, img_idx.tolist()):
        if a in SHAPES:
            shape[i] = SHAPES.index(a)
        elif a in COLORS:
            color[i] = COLORS.index(a)
    return shape, color


def load_split(split, processor):
    import easy_vqa
    from PIL import Image

    if split == "train":
        q, a, ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
    else:
        q, a, ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    order = sorted(paths)
    index = {k: i for i, k in enumerate(order)}
    pix = []
    for i in range(0, len(order), 500):
        ims = [Image.open(paths[k]).convert("RGB") for k in order[i : i + 500]]
        pix.append(processor.image_processor(ims, return_tensors="pt")["pixel_values"])
    pix = torch.cat(pix)
    return q, a, torch.tensor([index[i] for i in ids]), pix


class PromptIds:
    """Token ids of each distinct prompt, computed once (the image expansion never changes)."""

    def __init__(self, processor, dummy_pixels_image):
        self.p = processor
        self.dummy = dummy_pixels_image
        self.cache = {}

    def __call__(self, question):
        if question not in self.cache:
            text = toy.PROMPT.format(question=question)
            self.cache[question] = self.p(images=self.dummy, text=text, return_tensors="pt")["input_ids"][0]
        return self.cache[question]


def batch_inputs(questions, prompt_ids, pad_id):
    seqs = [prompt_ids(q) for q in questions]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = s
        att[i, n - len(s):] = 1
    return ids, att


@torch.no_grad()
def evaluate(model, q, a, img_idx, pix, prompt_ids, tok, limit=None, bs=256):
    model.eval()
    n = len(q) if limit is None else min(limit, len(q))
    stats = {}
    for i in range(0, n, bs):
        j = min(i + bs, n)  # the last batch stops at the limit
        qs, ans = q[i:j], a[i:j]
        ids, att = batch_inputs(qs, prompt_ids, tok.pad_token_id)
        out = model(input_ids=ids, attention_mask=att, pixel_values=pix[img_idx[i:j]], logits_to_keep=1)
        pred = out.logits[:, -1].argmax(-1).tolist()
        for pp, aa in zip(pred, ans):
            t = easy_vqa_qtype(aa)
            c, m = stats.get(t, (0, 0))
            stats[t] = (c + int(tok.convert_ids_to_tokens(pp) == aa), m + 1)
    model.train()
    res = {t: c / m for t, (c, m) in stats.items()}
    res["overall"] = sum(c for c, _ in stats.values()) / sum(m for _, m in stats.values())
    res["n"] = n
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="headsteer/default_model")
    ap.add_argument("--work", default="runs/train")
    ap.add_argument("--epochs", type=float, default=8)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--eval-limit", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    import easy_vqa
    from transformers import LlavaForConditionalGeneration

    qa_tr, aa_tr, _ = easy_vqa.get_train_questions()
    qa_te, aa_te, _ = easy_vqa.get_test_questions()
    processor = toy.build_processor(words_of(qa_tr + qa_te + aa_tr + aa_te + easy_vqa.get_answers()))
    tok = processor.tokenizer
    config = toy.build_config(len(tok), tok.convert_tokens_to_ids("<image>"), tok.pad_token_id)
    model = LlavaForConditionalGeneration(config).to(args.device)
    dev = args.device

    t0 = time.time()
    q_tr, a_tr, i_tr, pix_tr = load_split("train", processor)
    q_te, a_te, i_te, pix_te = load_split("test", processor)
    from PIL import Image

    prompt_ids = PromptIds(processor, Image.new("RGB", (64, 64)))
    ans_ids = torch.tensor(tok.convert_tokens_to_ids(a_tr))
    shape_lab, color_lab = image_labels(a_tr, i_tr, len(pix_tr))
    # Auxiliary heads on the pooled projector output: a direct signal for the vision tower to
    # learn shape (colour is easy, shape is not: without it shape accuracy sat at chance for
    # two epochs). They are not part of the saved model.
    aux = torch.nn.Linear(config.text_config.hidden_size, len(SHAPES) + len(COLORS)).to(args.device)
    feats = {}
    model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: feats.__setitem__("x", o))
    print(f"data loaded in {time.time() - t0:.1f}s: {len(q_tr)} train / {len(q_te)} test questions", flush=True)

    steps_per_epoch = len(q_tr) // args.batch
    total = int(args.epochs * steps_per_epoch)
    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in n_ or "embed" in n_ else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay + list(aux.parameters()), "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < args.warmup:
            return (step + 1) / args.warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - args.warmup) / max(1, total - args.warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    step, best = 0, -1.0
    ckpt = work / "ckpt.pt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        aux.load_state_dict(st["aux"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        step, best = st["step"], st["best"]
        torch.set_rng_state(st["rng"])
        print(f"resumed at step {step} (best {best:.4f})", flush=True)

    log = open(work / "log.jsonl", "a")
    gen = torch.Generator().manual_seed(args.seed)
    # The permutation of an epoch depends only on (seed, epoch), so a resumed run sees the same order.
    model.train()
    t_start, seen = time.time(), 0
    while step < total:
        epoch = step // steps_per_epoch
        perm = torch.randperm(len(q_tr), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        j = step % steps_per_epoch
        idx = perm[j * args.batch : (j + 1) * args.batch]
        qs = [q_tr[k] for k in idx.tolist()]
        ids, att = batch_inputs(qs, prompt_ids, tok.pad_token_id)
        pix = pix_tr[i_tr[idx]]
        # Flips keep shape and colour: free extra images against over-fitting 4,000 pictures.
        flip = torch.rand(len(idx), generator=gen)
        pix = torch.where((flip < 0.5)[:, None, None, None], pix.flip(-1), pix)
        flip = torch.rand(len(idx), generator=gen)
        pix = torch.where((flip < 0.5)[:, None, None, None], pix.flip(-2), pix)
        out = model(input_ids=ids.to(dev), attention_mask=att.to(dev), pixel_values=pix.to(dev), logits_to_keep=1)
        loss = F.cross_entropy(out.logits[:, -1].float(), ans_ids[idx].to(dev))
        pooled = aux(feats["x"].mean(1).float())
        img = i_tr[idx]
        aux_loss = F.cross_entropy(pooled[:, : len(SHAPES)], shape_lab[img].to(dev), ignore_index=-100) + \
            F.cross_entropy(pooled[:, len(SHAPES):], color_lab[img].to(dev), ignore_index=-100)
        loss_total = loss + args.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        seen += len(idx)
        if step % 50 == 0:
            el = time.time() - t_start
            print(f"step {step}/{total} ep {step / steps_per_epoch:.2f} loss {loss.item():.4f} aux {aux_loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} {seen / el:.0f} q/s", flush=True)
        if step % args.eval_every == 0 or step == total:
            res = evaluate(model, q_te, a_te, i_te, pix_te, prompt_ids, tok, limit=args.eval_limit)
            res.update(step=step, epoch=step / steps_per_epoch, elapsed_s=time.time() - t_start, loss=loss.item())
            print("eval", json.dumps(res), flush=True)
            log.write(json.dumps(res) + "\n")
            log.flush()
            if res["overall"] > best:
                best = res["overall"]
                model.save_pretrained(work / "best")
                processor.save_pretrained(work / "best")
        if step % args.save_every == 0 or step == total:
            tmp = work / "ckpt.pt.tmp"
            torch.save({"model": model.state_dict(), "aux": aux.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "best": best, "rng": torch.get_rng_state()}, tmp)
            os.replace(tmp, ckpt)

    from transformers import LlavaForConditionalGeneration as M

    best_model = M.from_pretrained(work / "best")
    final = evaluate(best_model, q_te, a_te, i_te, pix_te, prompt_ids, tok)
    final["train_seconds"] = time.time() - t_start
    print("final full test", json.dumps(final), flush=True)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "best", tmp)
    (tmp / "eval_easy_vqa_test.json").write_text(json.dumps(final, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"saved {out}", flush=True)


if __name__ == "__main__":
    main()
