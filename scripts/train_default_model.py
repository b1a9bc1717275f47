"""Train the embedded default model (small LLaVA) from scratch on easy-VQA, or fine-tune a saved one.

Seeded and resumable: state goes to ``--work/ckpt.pt`` every ``--save-every`` steps and a rerun with
the same arguments continues from it. The checkpoint kept (from scratch: the best evaluation on the
first ``--eval-limit`` test questions; a fine-tune: its last step, no selection) is written in Hugging
Face format to ``--out`` with ``eval_easy_vqa_test.json`` (the full test split) and ``train_log.jsonl``
(the ``--init`` model's log, then this run's evaluations).

``--eos`` puts the loss on the answer token *and* on the ``</s>`` after it (teacher forcing: the answer
is fed in and the next position must predict ``</s>``), so that generation stops after the one-word
answer; without it the model never learns to end and rambles until ``max_new_tokens``. The saved
generation config then sets ``max_new_tokens`` 8 (1 without ``--eos``), with ``eos_token_id`` and
``pad_token_id``. ``--init DIR`` starts from a saved model (its vocabulary must be the one this
script builds) instead of random weights, with no auxiliary shape/colour loss (that loss is there to
teach a new vision tower shape; a fine-tune keeps the tower it has). A fine-tune's defaults: 1 epoch,
peak learning rate 2e-4, 30 warm-up steps, then cosine decay.

The shipped model is two runs: the from-scratch training (43 minutes on 2 CPU cores, before ``--eos``
existed), then a short EOS fine-tune of it:

    python scripts/train_default_model.py --out headsteer/default_model --work runs/train
    python scripts/train_default_model.py --init headsteer/default_model --eos --out headsteer/default_model \\
        --work runs/finetune-eos --threads 1
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


def batch_inputs(questions, prompt_ids, pad_id, after=None):
    """Left-padded ids and mask of the prompts, each followed by the ids in ``after`` (one list per
    question: the teacher-forced answer) when given."""
    seqs = [prompt_ids(q) for q in questions]
    if after is not None:
        seqs = [torch.cat([s, torch.as_tensor(x, dtype=s.dtype)]) for s, x in zip(seqs, after)]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):] = s
        att[i, n - len(s):] = 1
    return ids, att


@torch.no_grad()
def evaluate(model, q, a, img_idx, pix, prompt_ids, tok, limit=None, bs=256, eos=False):
    """Exact match of the greedy answer token per question type; with ``eos`` also the share of
    questions whose next greedy token after that (predicted) answer is ``</s>``."""
    model.eval()
    n = len(q) if limit is None else min(limit, len(q))
    stats, ends = {}, 0
    for i in range(0, n, bs):
        j = min(i + bs, n)  # the last batch stops at the limit
        qs, ans = q[i:j], a[i:j]
        ids, att = batch_inputs(qs, prompt_ids, tok.pad_token_id)
        out = model(input_ids=ids, attention_mask=att, pixel_values=pix[img_idx[i:j]], logits_to_keep=1)
        pred = out.logits[:, -1].argmax(-1)
        if eos:
            ids, att = batch_inputs(qs, prompt_ids, tok.pad_token_id, after=pred[:, None])
            nxt = model(input_ids=ids, attention_mask=att, pixel_values=pix[img_idx[i:j]], logits_to_keep=1).logits[:, -1]
            ends += int((nxt.argmax(-1) == tok.eos_token_id).sum())
        pred = pred.tolist()
        for pp, aa in zip(pred, ans):
            t = easy_vqa_qtype(aa)
            c, m = stats.get(t, (0, 0))
            stats[t] = (c + int(tok.convert_ids_to_tokens(pp) == aa), m + 1)
    model.train()
    res = {t: c / m for t, (c, m) in stats.items()}
    res["overall"] = sum(c for c, _ in stats.values()) / sum(m for _, m in stats.values())
    res["n"] = n
    if eos:
        res["eos_after_answer"] = ends / n
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="headsteer/default_model")
    ap.add_argument("--work", default="runs/train")
    ap.add_argument("--init", default=None, help="fine-tune this saved model (with its processor) instead of training from scratch")
    ap.add_argument("--eos", action="store_true", help="loss also on the </s> after the answer (teacher forcing)")
    ap.add_argument("--epochs", type=float, default=None, help="default: 8 from scratch, 1 with --init")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate; default: 2e-3 from scratch, 2e-4 with --init")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps; default: 200 from scratch, 30 with --init")
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--aux-weight", type=float, default=0.5)
    ap.add_argument("--eval-limit", type=int, default=1000)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    scratch = {"epochs": 8, "lr": 2e-3, "warmup": 200}
    finetune = {"epochs": 1, "lr": 2e-4, "warmup": 30}
    for k, v in (finetune if args.init else scratch).items():
        if getattr(args, k) is None:
            setattr(args, k, v)

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    import easy_vqa
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    qa_tr, aa_tr, _ = easy_vqa.get_train_questions()
    qa_te, aa_te, _ = easy_vqa.get_test_questions()
    words = words_of(qa_tr + qa_te + aa_tr + aa_te + easy_vqa.get_answers())
    if args.init:
        init = Path(args.init)
        # read before --out (possibly the same folder) is replaced at the end
        init_log = (init / "train_log.jsonl").read_text() if (init / "train_log.jsonl").exists() else ""
        init_eval = json.loads((init / "eval_easy_vqa_test.json").read_text()) if (init / "eval_easy_vqa_test.json").exists() else None
        # the processor is rebuilt by toy.py (its chat template too), so the files written are those a
        # from-scratch run writes; the vocabulary must be the one the model was trained with
        processor = toy.build_processor(words)
        if processor.tokenizer.get_vocab() != AutoProcessor.from_pretrained(init).tokenizer.get_vocab():
            raise SystemExit(f"error: {init}'s vocabulary is not the one this script builds: it is not a model this script trained")
        model = LlavaForConditionalGeneration.from_pretrained(init).to(args.device)
        config = model.config
    else:
        init_log, init_eval = "", None
        processor = toy.build_processor(words)
        config = toy.build_config(len(processor.tokenizer), processor.tokenizer.convert_tokens_to_ids("<image>"),
                                  processor.tokenizer.pad_token_id)
        model = LlavaForConditionalGeneration(config).to(args.device)
    tok = processor.tokenizer
    # What a harness reads when it does not pass its own: stop at </s>, pad with <pad>; a model trained
    # without --eos never ends, so it answers with one token.
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    gc.max_new_tokens = 8 if args.eos else 1
    dev = args.device
    stage = ("eos-finetune" if args.eos else "finetune") if args.init else "scratch"

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
    step, best, elapsed = 0, -1.0, 0.0
    gen = torch.Generator().manual_seed(args.seed)
    ckpt = work / "ckpt.pt"
    if ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        aux.load_state_dict(st["aux"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        step, best = st["step"], st["best"]
        torch.set_rng_state(st["rng"])
        if "flip_rng" in st:  # older checkpoints: the flips of a resumed run were drawn afresh
            gen.set_state(st["flip_rng"])
        elapsed = st.get("elapsed", 0.0)
        print(f"resumed at step {step} (best {best:.4f})", flush=True)

    log = open(work / "log.jsonl", "a")
    # The permutation of an epoch depends only on (seed, epoch), so a resumed run sees the same order.
    model.train()
    t_start, seen = time.time() - elapsed, 0
    while step < total:
        epoch = step // steps_per_epoch
        perm = torch.randperm(len(q_tr), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        j = step % steps_per_epoch
        idx = perm[j * args.batch : (j + 1) * args.batch]
        qs = [q_tr[k] for k in idx.tolist()]
        answers = ans_ids[idx]
        ids, att = batch_inputs(qs, prompt_ids, tok.pad_token_id, after=answers[:, None] if args.eos else None)
        pix = pix_tr[i_tr[idx]]
        # Flips keep shape and colour: free extra images against over-fitting 4,000 pictures.
        flip = torch.rand(len(idx), generator=gen)
        pix = torch.where((flip < 0.5)[:, None, None, None], pix.flip(-1), pix)
        flip = torch.rand(len(idx), generator=gen)
        pix = torch.where((flip < 0.5)[:, None, None, None], pix.flip(-2), pix)
        if args.eos:
            # the last prompt position predicts the answer, the answer's position predicts </s>
            out = model(input_ids=ids.to(dev), attention_mask=att.to(dev), pixel_values=pix.to(dev), logits_to_keep=2)
            loss = F.cross_entropy(out.logits[:, -2].float(), answers.to(dev))
            end_loss = F.cross_entropy(out.logits[:, -1].float(), torch.full_like(answers, tok.eos_token_id).to(dev))
        else:
            out = model(input_ids=ids.to(dev), attention_mask=att.to(dev), pixel_values=pix.to(dev), logits_to_keep=1)
            loss = F.cross_entropy(out.logits[:, -1].float(), answers.to(dev))
            end_loss = torch.zeros(())
        loss_total = loss + end_loss
        aux_loss = torch.zeros(())
        if not args.init:
            pooled = aux(feats["x"].mean(1).float())
            img = i_tr[idx]
            aux_loss = F.cross_entropy(pooled[:, : len(SHAPES)], shape_lab[img].to(dev), ignore_index=-100) + \
                F.cross_entropy(pooled[:, len(SHAPES):], color_lab[img].to(dev), ignore_index=-100)
            loss_total = loss_total + args.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss_total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        seen += len(idx)
        if step % 50 == 0:
            el = time.time() - t_start
            print(f"step {step}/{total} ep {step / steps_per_epoch:.2f} loss {loss.item():.4f} eos {end_loss.item():.4f} aux {aux_loss.item():.3f} lr {sched.get_last_lr()[0]:.2e} {seen / el:.0f} q/s", flush=True)
        if step % args.eval_every == 0 or step == total:
            res = evaluate(model, q_te, a_te, i_te, pix_te, prompt_ids, tok, limit=args.eval_limit, eos=args.eos)
            res.update(step=step, epoch=step / steps_per_epoch, elapsed_s=time.time() - t_start, loss=loss.item(), stage=stage)
            if args.eos:
                res["eos_loss"] = end_loss.item()
            print("eval", json.dumps(res), flush=True)
            log.write(json.dumps(res) + "\n")
            log.flush()
            # from scratch: the best evaluation (a selection on test questions); a fine-tune: its last step
            if res["overall"] > best or args.init:
                best = res["overall"]
                model.save_pretrained(work / "best")
                processor.save_pretrained(work / "best")
        if step % args.save_every == 0 or step == total:
            tmp = work / "ckpt.pt.tmp"
            torch.save({"model": model.state_dict(), "aux": aux.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "step": step, "best": best, "rng": torch.get_rng_state(), "flip_rng": gen.get_state(),
                        "elapsed": time.time() - t_start}, tmp)
            os.replace(tmp, ckpt)

    from transformers import LlavaForConditionalGeneration as M

    best_model = M.from_pretrained(work / "best")
    train_seconds = time.time() - t_start
    final = evaluate(best_model, q_te, a_te, i_te, pix_te, prompt_ids, tok, eos=args.eos)
    final.update(train_seconds=train_seconds, stage=stage)
    if init_eval is not None:
        final["init"] = init_eval  # the figures of the model this run started from
    print("final full test", json.dumps(final), flush=True)
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "best", tmp)
    (tmp / "eval_easy_vqa_test.json").write_text(json.dumps(final, indent=2))
    # the --init model's log, then this run's evaluations (one per step: a resumed run may have logged one twice)
    mine = {}
    for line in (work / "log.jsonl").read_text().splitlines():
        if line.strip():
            mine[json.loads(line)["step"]] = line
    (tmp / "train_log.jsonl").write_text(init_log + "".join(mine[k] + "\n" for k in sorted(mine)))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    print(f"saved {out}", flush=True)


if __name__ == "__main__":
    main()
